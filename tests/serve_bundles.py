"""Tiny bundles for the serve tests: trained and exported once per test session, then copied and edited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from sasrec_serve import bundle as B

# The shared tiny model (conftest's tiny configuration: 20 items, L=8, d=16, 2 blocks): the cycle sku1 -> sku2 -> ...
# -> sku20 -> sku1, learnt in 20 epochs of 6 steps (HR@1 = 1 on its test items from ~epoch 8 on; tests/test_api.py
# relies on it having learnt the cycle). Validation ranks seen items too: the cycle repeats, and a validation that
# excluded them would saturate (NDCG 1) epochs before the model knows the cycle, and keep those weights.
TINY_EPOCHS = 20
_fitted: dict = {}  # run directory (one per test session) -> the estimator fitted there


def tiny_events():
    """The cycle data set with string ids ("sku1" ... "sku20"), so that raw ids are strings end to end."""
    from tests.conftest import tiny_cycle

    df = tiny_cycle()
    df["item_id"] = "sku" + df["item_id"].astype(str)
    return df


def tiny_fit(tmp_path_factory):
    """(estimator, run directory): the 20-item, L=8, d=16 model of the "sku" cycle, trained, evaluated and saved as
    `sasrec-jax train` leaves a run. Built once in the session's base temp directory and reused."""
    from sasrec_jax import SASRec
    from tests.conftest import TINY_MODEL, TINY_TRAIN

    run = tmp_path_factory.getbasetemp() / "tiny" / "run"
    if run not in _fitted:
        kw = dict(epochs=TINY_EPOCHS, patience=0, exclude_seen=False, progress=False, verbose=False)
        model = SASRec(**TINY_MODEL, **TINY_TRAIN, **kw)
        model.fit(tiny_events(), run_dir=run)
        model.evaluate()
        model.save(run)  # metrics.json beside the checkpoint
        _fitted[run] = model
    return _fitted[run], run


def tiny_run(tmp_path_factory) -> Path:
    """The run directory of `tiny_fit` (built once per test session)."""
    return tiny_fit(tmp_path_factory)[1]


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
