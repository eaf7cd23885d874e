"""ONNX bundle files and their integrity checks, with numpy and onnxruntime only (no JAX, no sasrec_jax).

A bundle is one directory: manifest.json lists every other file by plain name with its sha256. Errors
(BundleError) name files relative to the bundle and never carry a host path, a checksum or a file's contents,
so the HTTP service can pass them to a client; callers that know the path (the CLI, the server log) add it.
"""

from __future__ import annotations

import hashlib
import json
import re
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
MAX_MANIFEST_BYTES = 16 << 20  # a real one is a few kB; this bounds what a hostile one can make us parse
MAX_MANIFEST_DEPTH = 32  # nesting of its JSON (a real one has 5 levels)

# A file the manifest lists: a plain name in the bundle directory, so no entry can reach outside it
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

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
    max_len = manifest["max_len"]
    return [*sorted({w for w in manifest.get("windows") or [] if w < max_len}), max_len]


def scores_graph(manifest: dict, window: int) -> str:
    return MODEL if window == manifest["max_len"] else window_graph(window)


class BundleError(Exception):
    """A bundle is missing a file, fails its checksums or its schema, or its graphs do not match the manifest."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_plain_file_name(name) -> bool:
    """A file name in the bundle directory itself: no '/', '\\', '..', NUL, drive or absolute path."""
    return isinstance(name, str) and _FILE_NAME.fullmatch(name) is not None and ".." not in name


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _positive_int(value) -> bool:
    return type(value) is int and value > 0


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion (a hostile manifest may nest deeply)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_MANIFEST_DEPTH:
                stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def validate_manifest(manifest) -> dict:
    """The manifest's schema, checked before any file it lists is opened; raises BundleError with one line
    naming the field. Returns the manifest."""

    def bad(field: str, problem: str) -> BundleError:
        return BundleError(f"{MANIFEST}: {field} {problem}")

    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST} must hold a JSON object, got {type(manifest).__name__}")
    if _depth(manifest) > MAX_MANIFEST_DEPTH:
        raise BundleError(f"{MANIFEST} is nested more than {MAX_MANIFEST_DEPTH} levels deep")
    version = manifest.get("format_version")
    if type(version) is not int or version != BUNDLE_FORMAT:
        raise bad("format_version", f"is {_short(version)}; this reader supports {BUNDLE_FORMAT}")
    for key in ("max_len", "num_items", "dim"):
        if not _positive_int(manifest.get(key)):
            raise bad(key, f"must be a positive integer, got {_short(manifest.get(key))}")
    extra = manifest.get("windows")
    if extra is not None and (not isinstance(extra, list) or not all(_positive_int(w) for w in extra)):
        raise bad("windows", f"must be a list of positive integers, got {_short(extra)}")
    if "pad_id" in manifest and (type(manifest["pad_id"]) is not int or manifest["pad_id"] != 0):
        raise bad("pad_id", f"must be 0, got {_short(manifest['pad_id'])}")

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("files", 'must be an object of file name -> {"sha256": "<64 hex digits>"}')
    for name, entry in files.items():
        if not is_plain_file_name(name):
            raise bad("files", f"lists {_short(name)}, which is not a plain file name inside the bundle")
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise bad(f"files[{name!r}].sha256", "must be 64 lowercase hex digits")
        size = entry.get("bytes", 0)  # informative; the checksum is what counts
        if type(size) is not int or size < 0:
            raise bad(f"files[{name!r}].bytes", f"must be an integer >= 0, got {_short(size)}")

    shortlist = manifest.get("shortlist")
    if shortlist is not None and not (
        isinstance(shortlist, dict) and shortlist.get("graph") == SHORTLIST and _positive_int(shortlist.get("size"))
    ):
        raise bad("shortlist", f'must be null or {{"graph": "{SHORTLIST}", "size": <positive integer>}}')
    table = manifest.get("item_table")
    if table is not None:
        name, graphs = (table.get("initializer"), table.get("graphs")) if isinstance(table, dict) else (None, None)
        listed = isinstance(graphs, list) and all(isinstance(g, str) and g in files for g in graphs)
        if not (name and isinstance(name, str) and listed):
            raise bad("item_table", 'must be null or {"initializer": <name>, "graphs": [<graphs listed in files>]}')

    needed = [*REQUIRED, *(window_graph(w) for w in windows(manifest)[:-1]), *([SHORTLIST] if shortlist else [])]
    missing = [name for name in needed if name not in files]
    if missing:
        raise bad("files", f"does not list {', '.join(missing)}")
    return manifest


def read_manifest_and_digest(bundle_dir: str | Path) -> tuple[dict, str]:
    """The validated manifest and the sha256 of the bytes it was parsed from (the model's id)."""
    path = Path(bundle_dir) / MANIFEST
    # one message whether the directory is missing or holds no manifest: a reload request learns nothing more
    # about the file system than that it named no bundle
    if not path.is_file():
        raise BundleError(f"no {MANIFEST}: not a sasrec-jax bundle directory")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        raw = path.read_bytes()
    except OSError as e:
        raise BundleError(f"{MANIFEST} cannot be read: {e.strerror}") from None
    return validate_manifest(parse_json(raw, MANIFEST)), hashlib.sha256(raw).hexdigest()


def parse_json(raw: bytes, name: str):
    """A bundle's JSON file, parsed so that whatever it holds can be sent back in a JSON answer: NaN and
    Infinity (not JSON, but Python writes them) become null, and a lone surrogate ("\\ud800", which no UTF-8
    answer can carry) is refused."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=lambda _: None)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{name} is not valid JSON: {str(e)[:200]}") from None
    if b"\\u" in raw:  # only an escape can make a surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            raise BundleError(f"{name} holds a lone surrogate (an unpaired \\ud800-\\udfff escape)") from None
    return value


def read_manifest(bundle_dir: str | Path) -> dict:
    return read_manifest_and_digest(bundle_dir)[0]


def verify_checksums(bundle_dir: str | Path, manifest: dict) -> None:
    """Every file the (validated) manifest lists is a regular file of the bundle directory with its sha256."""
    bundle_dir = Path(bundle_dir)
    real_dir = bundle_dir.resolve()
    for name, entry in manifest["files"].items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{name} is missing")
        if path.resolve().parent != real_dir:
            raise BundleError(f"{name} is a link to a file outside the bundle")
        try:
            got = sha256_file(path)
        except OSError as e:
            raise BundleError(f"{name} cannot be read: {e.strerror}") from None
        if got != entry["sha256"]:
            raise BundleError(f"checksum mismatch for {name}")


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
    """Everything a service will need, verified as the predictor verifies it, since it is the predictor that
    does it: the manifest's schema, the checksums, items.json, popular.json and the item table, then every
    graph of the bundle loaded by onnxruntime, checked against its signature and run on probe sessions (finite
    outputs). Returns the manifest; raises BundleError."""
    from sasrec_serve.predictor import Predictor  # here, not at the top: the predictor imports this module

    predictor = Predictor.load(bundle_dir)
    predictor.load_every_graph()
    return predictor.manifest


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
