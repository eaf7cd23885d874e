"""Training: a learnable cycle, loss decrease, NaN guard, exact resume, losses, and 2-device sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from sasrec_jax import checkpoint, data, train
from sasrec_jax.config import ModelConfig, TrainConfig
from sasrec_jax.errors import CheckpointError, TrainingError
from tests.conftest import cycle_frame

TINY = dict(max_len=8, dim=16, num_heads=2, num_blocks=1, dropout=0.0)


def split_of(df):
    seqs = data.from_interactions(df)
    return seqs, data.leave_one_out(seqs)


def fit(df, run_dir=None, resume=False, **train_kw):
    seqs, split = split_of(df)
    mc = ModelConfig(num_items=seqs.vocab.size, **TINY)
    tc = TrainConfig(**{"lr": 1e-2, "batch_size": 32, "epochs": 3, "warmup_steps": 5, **train_kw})
    return train.fit(mc, tc, split, run_dir=run_dir, resume=resume, progress=False, log=lambda *_: None), split, mc


def cycle_test_hr1(result, split, mc) -> float:
    """HR@1 of a fit's kept weights on the cycle's test items (seen items not excluded: the cycle repeats)."""
    from sasrec_jax import evaluate

    score = train.make_scorer(result.graphdef, train.Placement.create())(result.params)
    ranking = evaluate.rank(score, split.test, mc.num_items, mc.max_len, batch_size=64, exclude_seen=False)
    return ranking.summary(mc.num_items)["HR@1"]


@pytest.mark.parametrize("windows", ["last", "all"])
def test_learns_a_deterministic_cycle(windows):
    result, split, mc = fit(cycle_frame(), epochs=20, patience=0, exclude_seen=False, train_windows=windows)
    assert cycle_test_hr1(result, split, mc) > 0.95


def test_learns_the_cycle_with_length_buckets():
    # max_len 32 over 12-item users: every batch is cut to width 16 (buckets 32/16/8)
    seqs, split = split_of(cycle_frame())
    mc = ModelConfig(num_items=seqs.vocab.size, **{**TINY, "max_len": 32})
    tc = TrainConfig(
        lr=1e-2, batch_size=32, epochs=20, warmup_steps=5, patience=0, exclude_seen=False, length_buckets=3
    )
    assert set(train.Batcher.create(*split.train.training_rows(32), 32, tc.length_buckets).width_N) == {16}
    result = train.fit(mc, tc, split, progress=False, log=lambda *_: None)
    assert cycle_test_hr1(result, split, mc) > 0.95


def test_bucket_widths():
    assert train.bucket_widths(200, 3) == (200, 100, 50)
    assert train.bucket_widths(50, 3) == (50, 25, 13)
    assert train.bucket_widths(50, 9) == (50, 25, 13)  # no width below MIN_WIDTH = 8
    assert train.bucket_widths(8, 3) == (8,)
    assert train.bucket_widths(200, 1) == (200,)


def _rows_of_lengths(lengths, max_len):
    """Left-padded rows; row i ends with the unique item 1000 + i, and its targets are its inputs shifted."""
    inputs = np.zeros((len(lengths), max_len), np.int32)
    targets = np.zeros_like(inputs)
    for i, n in enumerate(lengths):
        if n:
            inputs[i, -n:] = np.arange(n) + 1
            inputs[i, -1] = 1000 + i
            targets[i, -n:] = np.arange(n) + 2
    return inputs, targets


def test_batcher_yields_every_row_once_cut_to_the_narrowest_width_that_holds_it():
    lengths = np.random.default_rng(0).integers(1, 33, size=203)
    inputs, targets = _rows_of_lengths(lengths, 32)
    batcher = train.Batcher.create(inputs, targets, 16, buckets=3)  # widths 32, 16, 8
    seen = {}
    batches = list(batcher.batches(seed=1, epoch=3))
    assert len(batches) == batcher.steps_per_epoch
    for b in batches:
        width = b.inputs_BxL.shape[1]
        assert width in (32, 16, 8) and b.inputs_BxL.shape[0] == 16 and b.targets_BxL.shape == b.inputs_BxL.shape
        for row, tgt in zip(b.inputs_BxL[: b.num_sequences], b.targets_BxL[: b.num_sequences]):
            i = int(row[-1]) - 1000
            full_row, full_tgt = inputs[i], targets[i]
            assert i not in seen
            seen[i] = width
            np.testing.assert_array_equal(row, full_row[-width:])  # the cut keeps the newest columns
            np.testing.assert_array_equal(tgt, full_tgt[-width:])
            assert not full_row[:-width].any() and not full_tgt[:-width].any()  # only padding was dropped
            assert width == min(w for w in (8, 16, 32) if w >= lengths[i])  # and the narrowest width that fits
    assert sorted(seen) == list(range(len(lengths)))
    again = [b.inputs_BxL for b in batcher.batches(seed=1, epoch=3)]
    assert all(np.array_equal(a, b.inputs_BxL) for a, b in zip(again, batches))  # order depends on (seed, epoch)
    other = [b.inputs_BxL for b in batcher.batches(seed=1, epoch=4)]
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(other, again))


def test_one_bucket_keeps_full_width_batches_in_the_plain_shuffled_order():
    inputs, targets = _rows_of_lengths(np.arange(40) % 10 + 1, 16)
    batches = list(train.Batcher.create(inputs, targets, 8, buckets=1).batches(seed=0, epoch=1))
    order = np.random.default_rng([0, 1]).permutation(40)
    assert len(batches) == 5 and all(b.inputs_BxL.shape == (8, 16) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.inputs_BxL for b in batches]), inputs[order])


@pytest.mark.parametrize("loss", ["ce", "sampled"])
def test_cutting_a_batch_to_its_width_leaves_the_loss_unchanged(loss):
    mc = ModelConfig(num_items=1100, max_len=32, dim=16, num_heads=2, num_blocks=2, dropout=0.0)
    tc = TrainConfig(loss=loss, negatives=64)
    graphdef, params = train.init_model(mc, 0)
    inputs, targets = _rows_of_lengths([3, 9, 16, 1, 12, 7, 16, 5], 32)
    place = train.Placement.create()
    key = jax.random.key(0)
    full = train.loss_fn(graphdef, params, place.put_batch(train.make_batch(inputs, targets, 8)), key, tc)
    cut = train.loss_fn(
        graphdef, params, place.put_batch(train.make_batch(inputs[:, -16:], targets[:, -16:], 8)), key, tc
    )
    np.testing.assert_allclose(float(cut), float(full), rtol=1e-5)


@pytest.mark.parametrize("loss", ["ce", "sampled", "bce"])
def test_training_lowers_the_loss(loss):
    result, _, _ = fit(cycle_frame(), epochs=3, patience=0, loss=loss, negatives=8 if loss == "sampled" else 0)
    losses = [h["train_loss"] for h in result.loop.history]
    assert losses[-1] < losses[0]


def test_one_step_lowers_the_loss_on_its_batch():
    seqs, split = split_of(cycle_frame())
    mc = ModelConfig(num_items=seqs.vocab.size, **TINY)
    tc = TrainConfig(lr=1e-2, warmup_steps=0)
    graphdef, params = train.init_model(mc, 0)
    tx = train.build_optimizer(tc, 10)
    opt_state = tx.init(params)
    inputs, targets = split.train.training_rows(mc.max_len)
    batch = train.Placement.create().put_batch(train.make_batch(inputs[:32], targets[:32], 32))
    key = jax.random.key(0)
    before = float(train.loss_fn(graphdef, params, batch, key, tc))
    params, opt_state, _ = train.make_train_step(graphdef, tx, tc)(params, opt_state, batch, 0, 0)
    assert float(train.loss_fn(graphdef, params, batch, key, tc)) < before


def test_nan_loss_is_a_clear_error():
    def poison(params):
        table = np.array(params["item_embed"]["embedding"])
        table[:] = np.nan
        return {**params, "item_embed": {"embedding": table}}

    seqs, split = split_of(cycle_frame())
    mc = ModelConfig(num_items=seqs.vocab.size, **TINY)
    with pytest.raises(TrainingError, match="diverged"):
        train.fit(mc, TrainConfig(epochs=1), split, init_params=poison, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_is_exact(tmp_path, ema_decay):
    df = cycle_frame(num_users=96)
    kw = dict(patience=0, lr=3e-3, schedule="constant", ema_decay=ema_decay)
    full, _, _ = fit(df, run_dir=tmp_path / "full", epochs=4, **kw)
    # an "interrupted" run: 2 epochs, then resumed to 4 from its checkpoint
    fit(df, run_dir=tmp_path / "part", epochs=2, **kw)
    resumed, _, _ = fit(df, run_dir=tmp_path / "part", resume=True, epochs=4, **kw)
    # schedules only depend on the total, which must match for exactness: both use epochs=4 ...
    a = [h["train_loss"] for h in full.loop.history]
    b = [h["train_loss"] for h in resumed.loop.history]
    assert len(b) == 4
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_cosine_schedule_ends_with_the_epochs_or_the_budget():
    cfg = TrainConfig(schedule="cosine")
    assert train.lr_factor(cfg, 0.0) == 1.0
    assert train.lr_factor(cfg, 0.5) == pytest.approx(0.505)
    assert train.lr_factor(cfg, 1.0) == pytest.approx(train.FINAL_LR_FRACTION)
    assert train.lr_factor(cfg, 7.0) == pytest.approx(train.FINAL_LR_FRACTION)
    assert train.lr_factor(TrainConfig(schedule="constant"), 0.9) == 1.0
    df = cycle_frame(num_users=96)
    # by epochs: the last step of the last epoch is at progress (steps - 1) / steps
    by_epochs, _, _ = fit(df, epochs=3, patience=0)
    assert 0.8 < by_epochs.loop.progress < 1.0
    # by a budget far shorter than the epochs: the schedule is used up when the budget stops the run
    by_budget, _, _ = fit(df, epochs=10_000, patience=0, max_minutes=0.2)
    assert by_budget.loop.stopped.startswith("time budget")
    assert by_budget.loop.progress == 1.0


def test_checkpoint_round_trip_and_corruption(tmp_path):
    graphdef, params = train.init_model(ModelConfig(num_items=5, **TINY), 0)
    tx = train.build_optimizer(TrainConfig(ema_decay=0.9), 10)
    opt = tx.init(params)
    ckpt = checkpoint.Checkpoints(tmp_path / "run")
    ckpt.save_state(params, opt, {"epoch": 3})
    ckpt.wait()
    p2, o2, meta = ckpt.restore_state(params, opt)
    assert meta == {"epoch": 3}
    assert jax.tree.structure(o2) == jax.tree.structure(opt)
    for x, y in zip(jax.tree.leaves((params, opt)), jax.tree.leaves((p2, o2))):
        np.testing.assert_array_equal(x, y)
    _, bigger = train.init_model(ModelConfig(num_items=7, **TINY), 0)
    with pytest.raises(CheckpointError, match="cannot be restored into this model"):
        ckpt.restore_state(bigger, tx.init(bigger))
    ckpt.close()
    for f in (tmp_path / "run" / checkpoint.STATE_DIR / "0" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.Checkpoints(tmp_path / "run").restore_state(params, opt)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load_best(tmp_path / "none", params)


def test_an_asynchronous_save_is_not_changed_by_the_steps_that_follow_it(tmp_path):
    """Training goes on (donating its buffers) while Orbax writes: the checkpoint holds the state it was given."""
    from functools import partial

    placement = train.Placement.create()
    params = placement.replicate({"w": np.ones((2000, 2000), np.float32)})
    opt = placement.replicate({"m": np.zeros((2000, 2000), np.float32)})

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o):
        return jax.tree.map(lambda x: x + 1.0, p), jax.tree.map(lambda x: x + 2.0, o)

    params, opt = step(params, opt)
    ckpt = checkpoint.Checkpoints(tmp_path)
    ckpt.save_state(params, opt, {"step": 1})  # returns before the files are written
    for _ in range(10):
        params, opt = step(params, opt)
    ckpt.wait()
    ckpt.close()
    saved = checkpoint.read_state(tmp_path, {"params": jax.device_get(params), "opt_state": jax.device_get(opt)})
    assert (saved["params"]["w"] == 2.0).all() and (saved["opt_state"]["m"] == 2.0).all()
    assert saved["meta"] == {"step": 1}


def test_best_weights_are_kept_by_validation_metric_and_read_quietly(tmp_path, caplog):
    _, params = train.init_model(ModelConfig(num_items=5, **TINY), 0)
    worse = jax.tree.map(lambda x: x + 1.0, params)
    ckpt = checkpoint.Checkpoints(tmp_path)
    ckpt.save_best(10, params, {"epoch": 1}, 0.5)
    ckpt.save_best(20, worse, {"epoch": 2}, 0.3)  # newer, but worse: not kept
    ckpt.wait()
    ckpt.close()
    assert checkpoint.saved_steps(tmp_path / checkpoint.BEST_DIR) == [10]
    with caplog.at_level("WARNING"):
        best = checkpoint.load_best(tmp_path, params)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # `evaluate` / `export` print no noise
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(best)):
        np.testing.assert_array_equal(x, y)


def test_run_directories_of_the_msgpack_layout_are_still_read(tmp_path):
    """Before Orbax, checkpoints were flax msgpack files: they load, and a resume continues them."""
    from flax import serialization

    graphdef, params = train.init_model(ModelConfig(num_items=5, **TINY), 0)
    opt = train.build_optimizer(TrainConfig(), 10).init(params)
    payload = {
        "format_version": 1,
        "params": params,
        "opt_state": serialization.to_state_dict(opt),
        "meta": '{"epoch": 2}',
    }
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / checkpoint.LEGACY_LAST).write_bytes(serialization.msgpack_serialize(jax.device_get(payload)))
    best = {**payload, "opt_state": {}, "meta": "{}"}
    (tmp_path / checkpoint.LEGACY_BEST).write_bytes(serialization.msgpack_serialize(jax.device_get(best)))
    assert checkpoint.has_best(tmp_path)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(checkpoint.load_best(tmp_path, params))):
        np.testing.assert_array_equal(x, y)
    ckpt = checkpoint.Checkpoints(tmp_path)
    assert ckpt.has_state()
    _, o2, meta = ckpt.restore_state(params, opt)
    assert meta == {"epoch": 2}
    (tmp_path / checkpoint.LEGACY_BEST).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_best(tmp_path, params)


SHARDING_SCRIPT = textwrap.dedent(
    """
    import json, jax
    from sasrec_jax import data, train
    from sasrec_jax.config import ModelConfig, TrainConfig
    from tests.conftest import cycle_frame
    assert jax.device_count() == 2, jax.devices()
    seqs = data.from_interactions(cycle_frame(num_users=64))
    split = data.leave_one_out(seqs)
    mc = ModelConfig(num_items=seqs.vocab.size, max_len=8, dim=16, num_heads=2, num_blocks=1, dropout=0.1)
    tc = TrainConfig(lr=1e-2, batch_size=16, epochs=2, warmup_steps=2, patience=0)
    out = {}
    for n in (1, 2):
        r = train.fit(mc, tc, split, devices=jax.devices()[:n], progress=False, log=lambda *_: None)
        out[n] = [h["train_loss"] for h in r.loop.history] + [h["valid_ndcg@10"] for h in r.loop.history]
    print(json.dumps(out))
    """
)


def test_two_devices_give_the_same_losses_as_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["1"], out["2"], rtol=1e-5)


def test_resume_after_a_time_budget_stop_continues(tmp_path):
    df = cycle_frame(num_users=96)
    first, _, _ = fit(df, run_dir=tmp_path / "r", epochs=3, patience=0, max_minutes=1e-6)
    # the budget stops the run after its first step, inside epoch 1; the resume goes on from that batch
    assert first.loop.stopped.startswith("time budget") and (first.loop.epoch, first.loop.batch) == (0, 1)
    again, _, _ = fit(df, run_dir=tmp_path / "r", resume=True, epochs=3, patience=0)
    assert again.loop.epoch == 3 and not again.loop.stopped


def test_params_ema_follows_its_recurrence_and_passes_updates_through():
    tx = train.params_ema(0.3)
    trajectory = [{"w": np.full((2,), v, np.float32)} for v in (1.0, 3.0, -2.0, 5.0)]
    state = tx.init(trajectory[0])
    expected = 1.0
    for t, p in enumerate(trajectory, start=1):
        updates = {"w": np.ones(2, np.float32)}
        out, state = tx.update(updates, state, p)
        np.testing.assert_array_equal(out["w"], updates["w"])
        d = min(0.3, (1 + t) / (10 + t))  # the ramp (2/11, 3/12), then the 0.3 cap (steps 3 and 4)
        expected = expected + (1 - d) * (float(p["w"][0]) - expected)
        np.testing.assert_allclose(state.ema["w"], expected, rtol=1e-6)
    assert int(state.count) == 4


def test_ema_weights_are_what_validation_keeps_and_they_learn_the_cycle():
    result, split, mc = fit(cycle_frame(), epochs=20, patience=0, exclude_seen=False, ema_decay=0.99)
    assert cycle_test_hr1(result, split, mc) > 0.95
    # the kept weights are the average: they differ from those of the same run without it
    raw, _, _ = fit(cycle_frame(), epochs=20, patience=0, exclude_seen=False)
    differs = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(raw.params))]
    assert any(differs)


def test_ema_decay_outside_0_1_is_refused():
    from sasrec_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
