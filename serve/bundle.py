"""ONNX bundle files and their integrity checks, with numpy and onnxruntime only (no JAX, no sasrec_jax)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
ENCODER = "encoder.onnx"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEMS = "items.json"
POPULAR = "popular.json"
CONFIG = "config.json"
SHORTLIST = "shortlist_int8.onnx"  # optional: int8 approximate scores → top-S candidates (large catalogues)
REQUIRED = (MODEL, ENCODER, ITEM_EMBEDDINGS, ITEMS, POPULAR, CONFIG)

# The graphs' contract: name -> (ONNX element type, shape with "batch" symbolic; L, V1 = V + 1, D from the manifest)
SIGNATURES = {
    MODEL: {
        "inputs": {"item_ids": ("tensor(int32)", ["batch", "L"])},
        "outputs": {"scores": ("tensor(float)", ["batch", "V1"])},
    },
    ENCODER: {
        "inputs": {"item_ids": ("tensor(int32)", ["batch", "L"])},
        "outputs": {"session_embedding": ("tensor(float)", ["batch", "D"])},
    },
}


def window_graph(window: int) -> str:
    """File name of the scores graph for sessions of at most `window` items (see manifest "windows")."""
    return f"model_L{window}.onnx"


def windows(manifest: dict) -> list[int]:
    """The scores graphs' windows, smallest first; the last is max_len (model.onnx). A window graph gives the
    full graph's scores for any session that fits it, since positions are counted from the newest item."""
    extra = sorted(int(w) for w in manifest.get("windows", []) if int(w) < int(manifest["max_len"]))
    return [*extra, int(manifest["max_len"])]


def scores_graph(manifest: dict, window: int) -> str:
    return MODEL if window == int(manifest["max_len"]) else window_graph(window)


class BundleError(Exception):
    """A bundle is missing a file, fails its checksums, or its graphs do not match the manifest."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(bundle_dir: str | Path) -> dict:
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory not found: {bundle_dir}")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a sasrec-jax bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != BUNDLE_FORMAT:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise BundleError(f"{path} has format_version {got!r}; this reader supports {BUNDLE_FORMAT}")
    return manifest


def verify_checksums(bundle_dir: str | Path, manifest: dict) -> None:
    """Every file the manifest lists exists and has its sha256; every required file is listed."""
    bundle_dir = Path(bundle_dir)
    files = manifest.get("files", {})
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise BundleError(f"{bundle_dir}/{MANIFEST} does not list {missing}")
    for name, expected in files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{bundle_dir} is missing {name}")
        got = sha256_file(path)
        if got != expected["sha256"]:
            raise BundleError(f"checksum mismatch for {name}: expected {expected['sha256'][:16]}…, got {got[:16]}…")


def expected_shape(shape: list, manifest: dict) -> list:
    sizes = {"L": manifest["max_len"], "V1": manifest["num_items"] + 1, "D": manifest["dim"]}
    return [sizes.get(s, s) if s != "batch" else None for s in shape]


def verify_signature(session, name: str, manifest: dict, max_len: int | None = None) -> None:
    """The graph's declared inputs/outputs match the contract (names, element types, fixed dims)."""
    sig = SIGNATURES.get(name, SIGNATURES[MODEL])  # window graphs share the scores graph's contract
    for kind, declared in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        got = {d.name: d for d in declared}
        if set(got) != set(sig[kind]):
            raise BundleError(f"{name} declares {kind} {sorted(got)}, expected {sorted(sig[kind])}")
        for io_name, (dtype, shape) in sig[kind].items():
            meta = {**manifest, "max_len": max_len or manifest["max_len"]}
            want = expected_shape(shape, meta)
            d = got[io_name]
            have = [s if isinstance(s, int) else None for s in d.shape]
            if d.type != dtype or have != want:
                raise BundleError(f"{name}: {io_name} is {d.type} {d.shape}, expected {dtype} {want}")


def check_bundle(bundle_dir: str | Path) -> dict:
    """Checksums, then every graph loaded by onnxruntime and checked against its declared signature."""
    import onnxruntime as ort

    manifest = read_manifest(bundle_dir)
    verify_checksums(bundle_dir, manifest)
    graphs = [(ENCODER, None)] + [(scores_graph(manifest, w), w) for w in windows(manifest)]
    for name, window in graphs:
        if name not in manifest["files"]:
            raise BundleError(f"{MANIFEST} lists window {window} but not its graph {name}")
        try:
            session = ort.InferenceSession(str(Path(bundle_dir) / name), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for invalid graphs
            raise BundleError(f"onnxruntime cannot load {name}: {e}") from None
        verify_signature(session, name, manifest, max_len=window)
    if manifest.get("shortlist"):
        try:
            session = ort.InferenceSession(str(Path(bundle_dir) / SHORTLIST), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BundleError(f"onnxruntime cannot load {SHORTLIST}: {e}") from None
        verify_shortlist(session, manifest)
    return manifest


def verify_shortlist(session, manifest: dict) -> None:
    ins, outs = session.get_inputs(), session.get_outputs()
    ok = (
        [i.name for i in ins] == ["session_embedding"]
        and ins[0].type == "tensor(float)"
        and ins[0].shape[1:] == [manifest["dim"]]
        and [o.name for o in outs] == ["candidates"]
        and outs[0].type == "tensor(int64)"
    )
    if not ok:
        got = [(i.name, i.type, i.shape) for i in ins] + [(o.name, o.type, o.shape) for o in outs]
        raise BundleError(f"{SHORTLIST} does not have the shortlist signature: {got}")
