"""Export: a tiny trained run becomes a verified bundle; parity, symbolic batch, tampering, Node.js, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime, jax2onnx) is not installed")
ort = pytest.importorskip("onnxruntime")

from sasrec_export import ExportError, export_bundle  # noqa: E402
from sasrec_serve.bundle import BundleError, check_bundle  # noqa: E402

from sasrec_jax import SASRec, cli  # noqa: E402

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture
def run_dir(tiny_run_dir) -> Path:
    """The session's shared tiny run (conftest): read only, copied where a test edits it."""
    return tiny_run_dir


@pytest.fixture
def bundle(tiny_bundle_dir) -> Path:
    return tiny_bundle_dir


def windows(vocab, sessions, max_len: int) -> np.ndarray:
    """Left-padded [N, max_len] index windows of the most recent known items (what the predictor feeds a graph)."""
    seq = np.zeros((len(sessions), max_len), np.int32)
    for r, session in enumerate(sessions):
        idx = vocab.indices(session)
        recent = idx[idx > 0][-max_len:]
        seq[r, max_len - len(recent) :] = recent
    return seq


def test_bundle_contents_and_manifest(bundle):
    names = {p.name for p in bundle.iterdir()}
    assert {
        "model.onnx",
        "encoder.onnx",
        "item_embeddings.npy",
        "items.json",
        "popular.json",
        "config.json",
        "manifest.json",
    } <= names
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["max_len"] == 8 and m["num_items"] == 20 and m["dim"] == 16 and m["opset"] == 23
    assert set(m["files"]) == names - {"manifest.json"}  # every file, sidecars included, is checksummed
    assert m["versions"]["jax2onnx"] and m["versions"]["onnx"] and m["versions"]["jax"]
    assert "test" in m["metrics"]
    p = m["parity"]["model.onnx:optimized"]
    assert p["max_abs_diff"] <= 1e-4 and p["top10_agreement"] == 1.0 and m["parity"]["sequences"] >= 256
    assert json.loads((bundle / "items.json").read_text())[:2] == ["sku1", "sku10"]
    assert len(json.loads((bundle / "popular.json").read_text())["items"]) == 20
    table = np.load(bundle / "item_embeddings.npy", allow_pickle=False)
    assert table.shape == (21, 16) and table.dtype == np.float32


def test_metadata_props_describe_the_graph(bundle):
    props = {p.key: p.value for p in onnx.load(str(bundle / "model.onnx"), load_external_data=False).metadata_props}
    meta = json.loads(props["sasrec_jax.bundle"])
    assert meta["max_len"] == 8 and meta["num_items"] == 20 and meta["input"] == "item_ids"
    assert json.loads(props["sasrec_jax.model"])["dim"] == 16


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_symbolic_batch_matches_the_model(bundle, run_dir, batch):
    est = SASRec.load(run_dir)
    rng = np.random.default_rng(batch)
    sessions = [[f"sku{i}" for i in rng.integers(1, 21, size=rng.integers(1, 9))] for _ in range(batch)]
    seq, _ = est.windows(sessions)
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    scores = sess.run(["scores"], {"item_ids": seq})[0]
    assert scores.shape == (batch, 21)
    np.testing.assert_allclose(scores[:, 1:], est.score_items(sessions), atol=1e-4)
    enc = ort.InferenceSession(str(bundle / "encoder.onnx"), providers=["CPUExecutionProvider"])
    emb = enc.run(["session_embedding"], {"item_ids": seq})[0]
    table = np.load(bundle / "item_embeddings.npy")
    np.testing.assert_allclose(emb @ table[1:].T, scores[:, 1:], atol=1e-4)


def test_shorter_window_graph_is_exact_for_short_sessions(run_dir, bundle, tmp_path):
    short = tmp_path / "short"
    export_bundle(run_dir, short, max_len=4, log=lambda *_: None)
    full = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    part = ort.InferenceSession(str(short / "model.onnx"), providers=["CPUExecutionProvider"])
    seq8 = np.zeros((3, 8), np.int32)
    seq8[0, -1], seq8[1, -3:], seq8[2, -4:] = 5, [1, 2, 3], [9, 10, 11, 12]
    np.testing.assert_allclose(
        part.run(None, {"item_ids": seq8[:, -4:]})[0], full.run(None, {"item_ids": seq8})[0], atol=1e-5
    )


def test_window_graphs_in_one_bundle_and_the_predictor_picks_the_smallest(run_dir, bundle, tmp_path):
    """A bundle with scores graphs for windows 2 and 5 beside the full L = 8 one: every session length gives
    the full graph's scores, through the smallest graph that fits it."""
    from sasrec_serve import Predictor

    multi = tmp_path / "multi"
    assert cli.main(["export", str(run_dir), "--out", str(multi), "--windows", "5,2,99"]) == 0
    manifest = check_bundle(multi)
    assert manifest["windows"] == [2, 5]  # sorted; a window >= L adds nothing
    assert {"model_L2.onnx", "model_L5.onnx"} <= set(manifest["files"])
    assert set(manifest["parity"]) >= {"model_L2.onnx:optimized", "model_L5.onnx:unoptimized"}
    pred = Predictor.load(multi)
    assert pred.windows == [2, 5, 8]
    assert pred.loaded_graphs == ["model_L2.onnx", "model_L5.onnx", "model.onnx"]  # the encoder on first use
    assert [pred.window_for(n) for n in (0, 1, 2, 3, 5, 6, 8, 50)] == [2, 2, 2, 5, 5, 8, 8, 8]
    full = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in range(1, 9):
        sessions = [[f"sku{i}" for i in rng.integers(1, 21, size=m)] for m in (n, max(1, n - 1))]
        seq8 = windows(pred.vocab, sessions, 8)
        want = full.run(None, {"item_ids": seq8})[0][:, 1:]
        np.testing.assert_allclose(pred.score_items(sessions), want, atol=1e-5)
    # the bundle without extra windows keeps working as before
    assert Predictor.load(bundle).windows == [8]


def test_int8_shortlist_bundle_recommends_like_the_float32_scores(run_dir, tmp_path):
    """`--shortlist S` adds the int8 graph; the predictor's top-k through it (exact re-rank) equals the top-k of
    the full float32 scores, with exclusions; when exclusions leave fewer than k candidates it takes the full
    path, and sampling / normalised scores always do."""
    from sasrec_serve import Predictor

    out = tmp_path / "sl"
    assert cli.main(["export", str(run_dir), "--out", str(out), "--shortlist", "8", "--windows", "none"]) == 0
    manifest = check_bundle(out)
    assert manifest["shortlist"] == {"graph": "shortlist_int8.onnx", "size": 8} and manifest["windows"] == []
    assert manifest["parity"]["shortlist_int8.onnx"]["top10_identical"] >= 0.99
    pred = Predictor.load(out)
    # the scores graph (~1× the float32 table more in onnxruntime) stays unloaded until a call needs it
    assert pred.loaded_graphs == ["encoder.onnx", "shortlist_int8.onnx"]
    sessions = [["sku1", "sku2"], ["sku7"], ["sku15", "sku16", "sku17"], ["nope"], []]
    assert [len(r) for r in pred.recommend_batch(sessions, k=3)] == [3] * 5
    assert pred.loaded_graphs == ["encoder.onnx", "shortlist_int8.onnx"]
    full = pred.score_items(sessions)
    assert pred.loaded_graphs == ["model.onnx", "encoder.onnx", "shortlist_int8.onnx"]
    for k, exclude in ((3, []), (5, ["sku3", "sku9"]), (15, [])):  # k=15 > S: the full path
        recs = pred.recommend_batch(sessions, k=k, exclude=exclude)
        for r, (session, rec) in enumerate(zip(sessions, recs)):
            if rec.fallback:
                assert r >= 3
                continue
            s = full[r].astype(np.float64)
            idx = pred.vocab.indices(session + exclude)
            banned = idx[idx > 0] - 1
            s[banned] = -np.inf
            want = [pred.vocab.ids[j] for j in np.argsort(-s, kind="stable")[:k]]
            assert list(rec.items) == want
            np.testing.assert_allclose(rec.scores, s[np.argsort(-s, kind="stable")[:k]], atol=1e-5)
    with pytest.raises(ExportError, match="shortlist"):
        export_bundle(run_dir, tmp_path / "bad", shortlist=-1)


def test_check_detects_tampering(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    assert check_bundle(copy)["num_items"] == 20
    items = json.loads((copy / "items.json").read_text())
    items[0], items[1] = items[1], items[0]
    (copy / "items.json").write_text(json.dumps(items))
    with pytest.raises(BundleError, match="checksum mismatch for items.json"):
        check_bundle(copy)
    assert cli.main(["export", "--check", str(copy)]) == 2


def test_refusals_and_errors(run_dir, bundle, tmp_path, monkeypatch, capsys):
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(run_dir, bundle)
    assert cli.main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(run_dir, no_ckpt)
    shutil.rmtree(no_ckpt / "checkpoint")
    assert cli.main(["export", str(no_ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    shutil.copytree(run_dir, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["model"]["dim"] = 32
    (wrong / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["export", str(wrong), "--out", str(tmp_path / "x")]) == 2
    assert "does not match this model's config" in capsys.readouterr().err
    with pytest.raises(ExportError, match="max-len"):
        export_bundle(run_dir, tmp_path / "y", max_len=99)
    with pytest.raises(ExportError, match="windows must be positive"):
        export_bundle(run_dir, tmp_path / "y", windows=(0, 4))
    with pytest.raises(SystemExit):
        cli.main(["export", str(run_dir), "--out", str(tmp_path / "y"), "--windows", "4,x"])
    assert "comma-separated" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_parity_failure_publishes_nothing(run_dir, tmp_path, monkeypatch):
    import sasrec_export.bundle as eb

    monkeypatch.setattr(eb, "PARITY_ATOL", 0.0)
    with pytest.raises(ExportError, match="parity check failed .* Worst sequence"):
        export_bundle(run_dir, tmp_path / "z", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []  # no half bundle, no temp directory


def test_unconvertible_model_names_the_problem(run_dir, tmp_path, monkeypatch):
    import jax2onnx

    def refuse(*args, **kwargs):
        raise NotImplementedError("No plugin registered for primitive 'erf_inv'")

    monkeypatch.setattr(jax2onnx, "to_onnx", refuse)
    with pytest.raises(ExportError, match="could not convert model.onnx.*erf_inv"):
        export_bundle(run_dir, tmp_path / "w", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def _node_ready() -> bool:
    if not shutil.which("node") or not shutil.which("npm"):
        if os.environ.get("CI"):
            pytest.fail("node and npm are required in CI for the Node.js parity test")
        pytest.skip("node/npm not installed")
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        # onnxruntime-node's postinstall fetches optional GPU binaries from a host outside the registry;
        # the CPU binaries ship in the package itself, so scripts are skipped.
        proc = subprocess.run(
            ["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    return True


def test_nodejs_gets_the_same_top10(bundle):
    _node_ready()
    rng = np.random.default_rng(3)
    seq = np.zeros((16, 8), np.int32)
    for r in range(16):
        n = rng.integers(1, 9)
        seq[r, 8 - n :] = rng.integers(1, 21, size=n)
    req = {"model": str(bundle / "model.onnx"), "batch": 16, "length": 8, "ids": seq.ravel().tolist(), "k": 10}
    proc = subprocess.run(
        ["node", str(NODE_DIR / "topk.js")], input=json.dumps(req), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["inputs"] == ["item_ids"] and out["outputs"] == ["scores"]
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    scores = sess.run(None, {"item_ids": seq})[0]
    python_top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert out["top"] == python_top.tolist()
