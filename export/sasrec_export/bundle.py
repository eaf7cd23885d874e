"""Checkpoint → verified, self-describing ONNX bundle (written to a temp directory, checked, then renamed)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from sasrec_serve import bundle as B
from sasrec_serve.ids import PAD

from sasrec_jax import checkpoint, files, logs
from sasrec_jax.errors import SasrecError


class ExportError(SasrecError):
    """The model cannot be exported, or the exported graphs disagree with the JAX model."""


PARITY_ATOL = 1e-4
PARITY_TOP_K = 10
DEFAULT_CHECK_SEQUENCES = 256
# Extra scores graphs for short sessions (the predictor runs the smallest that fits): most live sessions are
# far shorter than L, and the transformer's cost grows with the window (measured in benchmarks/).
DEFAULT_WINDOWS = (16, 64)
# From this catalogue size on, the bundle also holds an int8 shortlist graph (export/shortlist.py): the float32
# table is then too large to read per request (1M × 64 = 256 MB), and window graphs, each holding a copy of
# it, are left out by default.
SHORTLIST_MIN_ITEMS = 50_000
DEFAULT_SHORTLIST = 256
SHORTLIST_MIN_AGREEMENT = 0.99


def _versions() -> dict:
    out: dict[str, str | None] = {}  # None: not installed
    for pkg in ("sasrec-jax", "jax", "jaxlib", "flax", "jax2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _convert(fn, max_len: int, path: Path, output_name: str, opset: int) -> None:
    import jax
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # jax2onnx's IR warns about untyped shape constants
    spec = [jax.ShapeDtypeStruct(("batch", max_len), jnp.int32)]  # int32: an int64 spec ends as int32 anyway
    try:
        to_onnx(
            fn,
            spec,
            opset=opset,
            return_mode="file",
            output_path=str(path),
            input_names=["item_ids"],
            output_names=[output_name],
            normalization_mode="prefer_native",
            model_name="sasrec",
        )
    except Exception as e:  # jax2onnx signals an unsupported primitive with several exception types
        raise ExportError(f"jax2onnx could not convert {path.name}: {type(e).__name__}: {e}") from None


def _set_metadata(path: Path, props: dict) -> None:
    """Key facts inside the .onnx itself, for services that only ever see that file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))


def table_initializer(paths: list[Path], table_VxD: np.ndarray) -> str | None:
    """The name of the initializer that holds the item table, unchanged, in every one of `paths`, or None.

    The predictor passes its memory-mapped item_embeddings.npy to onnxruntime under this name, so that the
    graphs share one table instead of each keeping a copy (a float32 table is 256 MB at 1M items × 64)."""
    import onnx
    from onnx import numpy_helper

    common = None
    for path in paths:
        model = onnx.load(str(path))
        names = {
            init.name
            for init in model.graph.initializer
            if tuple(init.dims) == table_VxD.shape and np.array_equal(numpy_helper.to_array(init), table_VxD)
        }
        common = names if common is None else common & names
    return min(common) if common else None


def check_sequences(estimator, num: int, max_len: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """[num, max_len] windows for the parity check: real sessions when the run's data can be re-read, padded
    with random sessions of every length from 1 to max_len (length 1 and full length always included)."""
    rng = np.random.default_rng(seed)
    rows = []
    try:
        estimator.reload_data()
        test = estimator.split.test
        pick = rng.choice(len(test), size=min(num // 2, len(test)), replace=False)
        rows.append(test.take(np.sort(pick)).padded(max_len))
    except SasrecError:
        pass  # no data at hand (in-memory fit, moved files): random sessions only
    n_random = num - sum(len(r) for r in rows)
    lengths = rng.integers(1, max_len + 1, size=n_random)
    lengths[:2] = [1, max_len]
    rand = np.zeros((n_random, max_len), np.int32)
    for i, n in enumerate(lengths):
        rand[i, max_len - n :] = rng.integers(1, estimator.vocab.size + 1, size=n)
    n_real = num - n_random
    rows.append(rand)
    return np.concatenate(rows).astype(np.int32), n_real


def parity(session, reference: np.ndarray, seq: np.ndarray, output: str, top_k: int) -> dict:
    """Max abs difference and top-k agreement between onnxruntime and the JAX reference outputs."""
    got = session.run([output], {"item_ids": seq})[0]
    diff = np.abs(got.astype(np.float64) - reference)
    diff[~np.isfinite(diff)] = np.inf  # NaN or infinity on either side is the worst disagreement, never a pass
    worst = int(np.unravel_index(np.argmax(diff), diff.shape)[0])
    out: dict[str, float | None] = {"max_abs_diff": float(diff.max()), "worst_row": worst, "rows": len(seq)}
    out["nonfinite"] = int((~np.isfinite(got)).sum() + (~np.isfinite(reference)).sum())
    if top_k:
        k = min(top_k, reference.shape[1] - 1)
        ref_top = np.argsort(-reference, axis=1, kind="stable")[:, :k]
        got_top = np.argsort(-got, axis=1, kind="stable")[:, :k]
        same = (ref_top == got_top).all(axis=1)
        # a swap of two items whose JAX scores differ by less than the tolerance is a tie, not a disagreement
        for r in np.flatnonzero(~same):
            tied = np.abs(reference[r, ref_top[r]] - reference[r, got_top[r]]).max() <= PARITY_ATOL
            same[r] = tied and set(ref_top[r]) == set(got_top[r])
        out[f"top{k}_agreement"] = float(same.mean())
        out["first_disagreeing_row"] = int(np.flatnonzero(~same)[0]) if (~same).any() else None
    return out


@dataclass(frozen=True)
class Plan:
    """What a bundle holds: the window of its graphs, the shorter window graphs, the shortlist size (0: none)."""

    max_len: int
    windows: list[int]
    shortlist: int

    @property
    def table_graphs(self) -> list[str]:
        return [B.MODEL, B.ENCODER, *(B.window_graph(w) for w in self.windows)]


def export_bundle(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int = 23,
    max_len: int | None = None,
    windows: tuple[int, ...] | None = None,
    shortlist: int | None = None,
    overwrite: bool = False,
    check_count: int = DEFAULT_CHECK_SEQUENCES,
    log=logs.info,
) -> dict:
    """Exports RUN_DIR's best checkpoint to BUNDLE_DIR and verifies it; returns the manifest.

    `max_len` may be shorter than the model's window: positions are right-aligned, so the graph gives the
    model's exact scores for every session of at most that many items. For the same reason the bundle also
    holds scores graphs for the shorter `windows` (default DEFAULT_WINDOWS; `()` for none), each verified on
    sessions that fit it against the full model. `shortlist` = S > 0 adds the int8 shortlist graph (default:
    DEFAULT_SHORTLIST from SHORTLIST_MIN_ITEMS items on, where `windows` then defaults to none); its top-10 must
    equal the float32 top-10 on SHORTLIST_MIN_AGREEMENT of the check sequences.

    Steps: check the destination, load the run (refusing non-finite weights), plan the graphs, convert them,
    write the data files, verify onnxruntime against JAX, write the manifest, check the bundle as a service
    would, and only then publish it in place of any old one."""
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    _check_destination(out_dir, overwrite)
    est = _load_run(run_dir)
    plan = _plan(est, max_len, windows, shortlist)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(out_dir)
    for p in files.remove_stale(out_dir.parent, out_dir.name):  # exports killed before publishing
        log(f"removed {p.name}, left behind by an export that was interrupted")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=files.temp_prefix(out_dir.name)))
    try:
        module = est.module
        export_seconds = _convert_graphs(module, plan, tmp, opset)
        table_name = _write_data_files(est, run_dir, plan, tmp)
        report, seq, n_real = _verify(est, module, plan, tmp, check_count)
        _write_graph_metadata(est.model_config, plan, tmp)
        manifest = _manifest(est, plan, opset, table_name, run_dir)
        manifest["parity"] = {"sequences": len(seq), "real_sessions": n_real, "atol": PARITY_ATOL, **report}
        manifest["export_seconds"] = round(export_seconds, 2)
        manifest["versions"] = _versions()
        manifest["files"] = {
            p.name: {"sha256": B.sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
            if p.is_file()  # includes any .onnx.data sidecar
        }
        files.write_json(tmp / B.MANIFEST, manifest)
        B.check_bundle(tmp)  # what a service will do on load, before anything is published
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f["bytes"] for f in manifest["files"].values())
    main = report[f"{B.MODEL}:optimized"]
    top = next(k for k in main if k.endswith("_agreement"))  # top10, or topV-1 below 11 items
    log(
        f"exported {out_dir} ({size / 1e6:.1f} MB) in {export_seconds:.1f} s; parity: max abs diff "
        f"{main['max_abs_diff']:.2e}, {top.split('_')[0]} agreement {main[top]:.0%} on {len(seq)} sequences"
    )
    return manifest


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a directory: name a new bundle directory")
    if any(out_dir.iterdir()) and not (out_dir / B.MANIFEST).is_file():
        raise ExportError(
            f"{out_dir} is not empty and is not a bundle (no {B.MANIFEST}): it is left untouched; name a new "
            "bundle directory"
        )
    if not overwrite:
        raise ExportError(f"{out_dir} already exists: pass --overwrite to replace it")


def _load_run(run_dir: Path):
    from sasrec_jax import SASRec

    est = SASRec.load(run_dir)  # the same restore path training and evaluation use
    bad = checkpoint.nonfinite(est.params)
    if bad is not None:
        raise ExportError(
            f"the weights in {run_dir} hold NaN or infinity ({bad}): nothing was exported. Train again (e.g. with a "
            "lower --lr)"
        )
    return est


def _plan(est, max_len: int | None, windows, shortlist: int | None) -> Plan:
    cfg = est.model_config
    L = max_len or cfg.max_len
    if not 1 <= L <= cfg.max_len:
        raise ExportError(f"--max-len must be in 1..{cfg.max_len} (the model's window), got {L}")
    large = est.vocab.size >= SHORTLIST_MIN_ITEMS
    shortlist = (DEFAULT_SHORTLIST if large else 0) if shortlist is None else shortlist
    if isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < 0:
        raise ExportError(f"--shortlist must be an integer >= 0, got {shortlist!r}")
    requested = (() if large else DEFAULT_WINDOWS) if windows is None else tuple(windows)
    bad = [w for w in requested if not isinstance(w, int) or isinstance(w, bool) or w < 1]
    if bad:
        raise ExportError(f"--windows must be positive integers, got {bad}")
    return Plan(L, sorted({w for w in requested if w < L}), shortlist)  # a window >= L adds nothing


def _convert_graphs(module, plan: Plan, tmp: Path, opset: int) -> float:
    """The scores, encoder, window and shortlist graphs; returns the seconds taken."""
    t0 = time.perf_counter()
    _convert(lambda seq: module(seq), plan.max_len, tmp / B.MODEL, "scores", opset)
    _convert(lambda seq: module.encode(seq), plan.max_len, tmp / B.ENCODER, "session_embedding", opset)
    for w in plan.windows:
        _convert(lambda seq: module(seq), w, tmp / B.window_graph(w), "scores", opset)
    table = np.asarray(module.item_table(), dtype=np.float32)
    np.save(tmp / B.ITEM_EMBEDDINGS, table, allow_pickle=False)
    if plan.shortlist:
        _write_shortlist(table, plan.shortlist, tmp / B.SHORTLIST)
    return time.perf_counter() - t0


def _write_data_files(est, run_dir: Path, plan: Plan, tmp: Path) -> str | None:
    """items.json, popular.json and config.json; returns the graphs' item-table initializer name, if shared."""
    table = np.load(tmp / B.ITEM_EMBEDDINGS)
    table_name = table_initializer([tmp / g for g in plan.table_graphs], table)
    # every popular item the run recorded, so the predictor's fallback is the estimator's
    popular = [[est.vocab.decode([i])[0], c] for i, c in est.data_info.get("popular", [])]
    files.write_json(tmp / B.ITEMS, est.vocab.to_json())
    files.write_json(tmp / B.POPULAR, {"items": [p[0] for p in popular], "counts": [p[1] for p in popular]})
    run_cfg = checkpoint.read_config(run_dir)
    files.write_json(tmp / B.CONFIG, {k: v for k, v in run_cfg.items() if k != "items"})
    return table_name


def _verify(est, module, plan: Plan, tmp: Path, check_count: int) -> tuple[dict, np.ndarray, int]:
    """onnxruntime against the jitted JAX model, optimised and unoptimised graphs alike; raises on a failure."""
    import jax
    import jax.numpy as jnp
    import onnxruntime as ort

    L = plan.max_len
    seq, n_real = check_sequences(est, check_count, L)

    def reference(seq_NxL: np.ndarray) -> np.ndarray:  # the model on its own window, as training scores it
        full = np.zeros((len(seq_NxL), est.model_config.max_len), np.int32)
        full[:, full.shape[1] - seq_NxL.shape[1] :] = seq_NxL
        return est.score_windows(full).astype(np.float64)

    ref_scores = reference(seq)
    ref_emb = np.asarray(jax.jit(lambda s: module.encode(s))(jnp.asarray(seq)), dtype=np.float64)
    checks = [(B.MODEL, "scores", ref_scores, seq, PARITY_TOP_K), (B.ENCODER, "session_embedding", ref_emb, seq, 0)]
    for w in plan.windows:  # sessions that fit the window, against the full model on the full window
        seq_w, _ = check_sequences(est, check_count, w, seed=w)
        checks.append((B.window_graph(w), "scores", reference(seq_w), seq_w, PARITY_TOP_K))
    report = {}
    for level_name, level in (
        ("optimized", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        ("unoptimized", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
    ):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        for name, output, ref, seq_in, k in checks:
            sess = ort.InferenceSession(str(tmp / name), opts, providers=["CPUExecutionProvider"])
            report[f"{name}:{level_name}"] = parity(sess, ref, seq_in, output, k)
    if plan.shortlist:
        report[B.SHORTLIST] = _shortlist_parity(tmp, ref_emb, ref_scores, seq)
    _check_parity(report, seq)
    return report, seq, n_real


def _write_graph_metadata(cfg, plan: Plan, tmp: Path) -> None:
    from sasrec_jax.config import to_dict

    meta = {
        "format_version": B.BUNDLE_FORMAT,
        "max_len": plan.max_len,
        "num_items": cfg.num_items,
        "dim": cfg.dim,
        "pad_id": PAD,
        "input": "item_ids",
        "model_output": "scores",
        "encoder_output": "session_embedding",
    }
    for name in (B.MODEL, B.ENCODER):
        _set_metadata(tmp / name, {"sasrec_jax.bundle": meta, "sasrec_jax.model": to_dict(cfg)})
    for w in plan.windows:
        meta_w = {**meta, "max_len": w, "note": f"exact scores for sessions of at most {w} items"}
        _set_metadata(tmp / B.window_graph(w), {"sasrec_jax.bundle": meta_w, "sasrec_jax.model": to_dict(cfg)})


def _manifest(est, plan: Plan, opset: int, table_name: str | None, run_dir: Path) -> dict:
    cfg, L, V = est.model_config, plan.max_len, est.vocab.size

    def scores_graph(width: int, note: str) -> dict:
        return {
            "inputs": {"item_ids": {"dtype": "int32", "shape": ["batch", width]}},
            "outputs": {"scores": {"dtype": "float32", "shape": ["batch", V + 1]}},
            "note": note,
        }

    return {
        "format_version": B.BUNDLE_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "max_len": L,
        "model_max_len": cfg.max_len,
        "num_items": V,
        "dim": cfg.dim,
        "opset": opset,
        "pad_id": PAD,
        "windows": plan.windows,
        "shortlist": {"graph": B.SHORTLIST, "size": min(plan.shortlist, V + 1)} if plan.shortlist else None,
        # the graphs' initializer equal to item_embeddings.npy: a service may pass that file in its place
        "item_table": {"initializer": table_name, "graphs": plan.table_graphs} if table_name else None,
        "graphs": {
            B.MODEL: scores_graph(L, "column 0 of scores is padding (always -1e9); column i is items.json[i - 1]"),
            B.ENCODER: {
                "inputs": {"item_ids": {"dtype": "int32", "shape": ["batch", L]}},
                "outputs": {"session_embedding": {"dtype": "float32", "shape": ["batch", cfg.dim]}},
                "note": "scores = session_embedding @ item_embeddings.npy.T",
            },
            **{
                B.window_graph(w): scores_graph(
                    w,
                    f"= model.onnx's scores for sessions of at most {w} items (the last {w} columns of its input); "
                    "positions count from the newest item",
                )
                for w in plan.windows
            },
        },
        "input_contract": "item indices 1..num_items (items.json order), left-padded with 0, newest last; "
        "sessions longer than max_len keep their most recent max_len items",
        "metrics": _read_metrics(run_dir),
    }


def _write_shortlist(table_VxD: np.ndarray, size: int, path: Path) -> None:
    import onnx

    from sasrec_export.shortlist import build_shortlist_graph

    model = build_shortlist_graph(table_VxD, size)
    if table_VxD.size > 1 << 30:  # protobuf's 2 GB limit: the int8 table goes to a sidecar
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def _shortlist_parity(tmp: Path, ref_emb: np.ndarray, ref_scores: np.ndarray, seq: np.ndarray) -> dict:
    """Top-10 through the int8 shortlist + exact re-rank vs the JAX model's float32 top-10."""
    import onnxruntime as ort
    from sasrec_serve.shortlist import ShortlistScorer

    sess = ort.InferenceSession(str(tmp / B.SHORTLIST), providers=["CPUExecutionProvider"])
    table = np.load(tmp / B.ITEM_EMBEDDINGS)
    got, _ = ShortlistScorer(sess, table).top_k(ref_emb.astype(np.float32), PARITY_TOP_K)
    want = np.argsort(-ref_scores, axis=1, kind="stable")[:, : got.shape[1]]
    same = np.array([set(g) == set(w) for g, w in zip(got, want)])
    bad = np.flatnonzero(~same)
    return {
        "top10_identical": float(same.mean()),
        "rows": len(seq),
        "first_disagreeing_row": int(bad[0]) if len(bad) else None,
        "min_agreement": SHORTLIST_MIN_AGREEMENT,
    }


def _check_parity(report: dict, seq: np.ndarray) -> None:
    sl = report.get(B.SHORTLIST)
    if sl is not None:
        if sl["top10_identical"] < SHORTLIST_MIN_AGREEMENT:
            items = seq[sl["first_disagreeing_row"]][seq[sl["first_disagreeing_row"]] > 0].tolist()
            raise ExportError(
                f"the int8 shortlist keeps the float32 top-10 on only {sl['top10_identical']:.1%} of sequences "
                f"(< {SHORTLIST_MIN_AGREEMENT:.0%}): export with a larger --shortlist. First differing sequence: "
                f"{items}. The bundle was not published."
            )
    for key, r in report.items():
        if key == B.SHORTLIST:
            continue
        problems = []
        if r.get("nonfinite"):
            problems.append(f"{r['nonfinite']} outputs are NaN or infinite")
        if not r["max_abs_diff"] <= PARITY_ATOL:  # written so that NaN fails
            problems.append(f"max abs difference {r['max_abs_diff']:.3g} > {PARITY_ATOL}")
        for key_k in (k for k in r if k.endswith("_agreement")):  # top10, or topV-1 below 11 items
            if not r[key_k] >= 1.0:
                problems.append(f"{key_k.split('_')[0]} differs on {1 - r[key_k]:.1%} of sequences")
        if problems:
            row = r["worst_row"] if r.get("first_disagreeing_row") is None else r["first_disagreeing_row"]
            items = seq[row][seq[row] > 0].tolist()
            raise ExportError(
                f"parity check failed for {key}: {'; '.join(problems)}. Worst sequence (item indices): {items}. "
                "The bundle was not published."
            )


def _read_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _recover(out_dir: Path) -> None:
    """Puts back the bundle an export killed inside `_publish` had moved aside (between its two renames)."""
    if out_dir.exists():
        return
    for old in out_dir.parent.glob(f".{out_dir.name}.tmp-*/old"):
        if (old / B.MANIFEST).is_file():
            os.replace(old, out_dir)
            return


def _publish(tmp: Path, out_dir: Path) -> None:
    """Moves the verified bundle into place; an existing bundle is swapped out only after that succeeds."""
    tmp.chmod(0o755)  # mkdtemp makes 0700 directories; a service may run as another user
    for f in tmp.iterdir():
        f.chmod(0o644)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=files.temp_prefix(out_dir.name))) / "old"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
