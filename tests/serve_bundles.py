"""Tiny bundles for the serve tests: trained and exported once per test session, then copied and edited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from sasrec_serve import bundle as B


def tiny_run(tmp_path_factory) -> Path:
    """A 20-item, L=8, d=16 model of the cycle sku1 -> sku2 -> … trained, evaluated and saved as
    `sasrec-jax train` leaves a run. Built once in the session's base temp directory and reused."""
    run = tmp_path_factory.getbasetemp() / "tiny" / "run"
    if (run / "metrics.json").is_file():
        return run
    from sasrec_jax import SASRec
    from tests.conftest import cycle_frame

    df = cycle_frame()
    df["item_id"] = "sku" + df["item_id"].astype(str)
    kw = dict(max_len=8, dim=16, num_heads=2, num_blocks=2, epochs=3, batch_size=32, lr=1e-2, warmup_steps=5)
    model = SASRec(**kw, progress=False, verbose=False).fit(df, run_dir=run)
    model.evaluate()
    model.save(run)  # metrics.json beside the checkpoint
    return run


def tiny_bundle(tmp_path_factory) -> Path:
    """`tiny_run` exported to a bundle beside it (built once per test session)."""
    run = tiny_run(tmp_path_factory)
    bundle = run.parent / "bundle"
    if not (bundle / B.MANIFEST).is_file():
        from sasrec_export import export_bundle

        export_bundle(run, bundle, log=lambda *_: None)
    return bundle


def derive_bundle(src: Path, dst: Path, *, items=None, popular=None, embeddings=None, manifest=None) -> Path:
    """A copy of `src` with some files replaced and the manifest's checksums brought up to date."""
    shutil.copytree(src, dst)
    if items is not None:
        (dst / B.ITEMS).write_text(json.dumps(items))
    if popular is not None:
        (dst / B.POPULAR).write_text(json.dumps(popular))
    if embeddings is not None:
        np.save(dst / B.ITEM_EMBEDDINGS, np.asarray(embeddings, np.float32), allow_pickle=False)
    m = json.loads((dst / B.MANIFEST).read_text())
    m.update(manifest or {})
    for name, entry in m["files"].items():
        entry["sha256"], entry["bytes"] = B.sha256_file(dst / name), (dst / name).stat().st_size
    (dst / B.MANIFEST).write_text(json.dumps(m, indent=2))
    return dst
