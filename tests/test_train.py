"""Training: a learnable cycle, loss decrease, batches, NaN guard, exact resume, the schedule and the time budget,
checkpoints, the moving average of the weights, and 2-device sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from sasrec_serve.ids import PAD

from sasrec_jax import checkpoint, data, evaluate, train
from sasrec_jax.batches import POSITION_BUCKETS, Batcher, make_batch
from sasrec_jax.config import ModelConfig, TrainConfig
from sasrec_jax.errors import CheckpointError, ConfigError, TrainingError
from sasrec_jax.inference import make_scorer
from sasrec_jax.model import init_model
from tests.conftest import TINY_MODEL, TINY_TRAIN, cycle_frame, tiny_cycle


def split_of(df):
    seqs = data.from_interactions(df)
    return seqs, data.leave_one_out(seqs)


def fit(df, run_dir=None, resume=False, **train_kw):
    """`train.fit` of conftest's tiny configuration (its programs are compiled once per session)."""
    seqs, split = split_of(df)
    mc = ModelConfig(num_items=seqs.vocab.size, **TINY_MODEL)
    tc = TrainConfig(**{**TINY_TRAIN, "epochs": 3, **train_kw})
    return train.fit(mc, tc, split, run_dir=run_dir, resume=resume, progress=False, log=lambda *_: None), split, mc


# the training loss of one batch, compiled (run op by op, a 2-block model's loss takes seconds to dispatch)
loss_fn = jax.jit(train.loss_fn, static_argnums=(0, 4))


def cycle_test_hr1(result, split, mc) -> float:
    """HR@1 of a fit's kept weights on the cycle's test items (seen items not excluded: the cycle repeats)."""
    score = make_scorer(result.graphdef, train.Placement.create())(result.params)
    ranking = evaluate.rank(score, split.test, mc.num_items, mc.max_len, exclude_seen=False)
    return ranking.summary(mc.num_items)["HR@1"]


def test_learns_a_deterministic_cycle_with_the_raw_or_the_averaged_weights():
    """20 epochs of 6 steps: the cycle is learnt (HR@1 is 1.0 from epoch ~8 on, 0.76 after 6), by the raw weights
    and by their moving average, which is what validation then keeps. Validation ranks seen items too (the cycle
    repeats; excluding them, validation saturates epochs before the model knows the cycle, and keeps those weights)."""
    kw = dict(epochs=20, patience=0, exclude_seen=False)
    raw, split, mc = fit(tiny_cycle(), **kw)
    averaged, _, _ = fit(tiny_cycle(), ema_decay=0.9, **kw)
    assert cycle_test_hr1(raw, split, mc) > 0.95 and cycle_test_hr1(averaged, split, mc) > 0.95
    # the same run (the average does not change training), yet the kept weights differ: they are the average
    np.testing.assert_allclose(
        [h["train_loss"] for h in averaged.loop.history], [h["train_loss"] for h in raw.loop.history], rtol=1e-4
    )
    differs = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(raw.params), jax.tree.leaves(averaged.params))]
    assert any(differs)


def test_the_shared_model_learnt_the_cycle_from_all_windows(fitted_model):
    """The session's shared estimator (conftest) trains on every window of each history (the default)."""
    assert fitted_model.train_config.train_windows == "all"
    assert fitted_model.metrics["test"]["HR@1"] > 0.95


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


def test_batcher_yields_every_row_once_in_an_order_set_by_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(1, 33, size=203)
    inputs, targets = _rows_of_lengths(lengths, 32)
    batcher = Batcher.create(inputs, targets, 16)
    batches = list(batcher.batches(seed=1, epoch=3))
    assert len(batches) == batcher.steps_per_epoch == 13
    order = np.random.default_rng([1, 3]).permutation(len(lengths))
    for b, lo in zip(batches, range(0, len(lengths), 16)):
        rows = order[lo : lo + 16]
        n = len(rows)
        assert b.num_sequences == n and b.inputs_BxL.shape == b.targets_BxL.shape == (16, 32)  # full width
        np.testing.assert_array_equal(b.inputs_BxL[:n], inputs[rows])
        np.testing.assert_array_equal(b.targets_BxL[:n], targets[rows])
        assert not b.inputs_BxL[n:].any() and not b.targets_BxL[n:].any()  # the last batch: zero rows, no targets
    seen = np.concatenate([b.inputs_BxL[: b.num_sequences, -1] for b in batches]) - 1000
    assert sorted(seen) == list(range(len(lengths)))  # every row exactly once
    again = [b.inputs_BxL for b in batcher.batches(seed=1, epoch=3)]
    assert all(np.array_equal(a, b.inputs_BxL) for a, b in zip(again, batches))  # order depends on (seed, epoch)
    other = [b.inputs_BxL for b in batcher.batches(seed=1, epoch=4)]
    assert any(not np.array_equal(a, b) for a, b in zip(other, again))
    # a resume inside the epoch skips the batches already trained and yields the same rest
    rest = [b.inputs_BxL for b in batcher.batches(seed=1, epoch=3, skip=5)]
    assert len(rest) == 8 and all(np.array_equal(a, b) for a, b in zip(rest, again[5:]))


def test_a_batch_gathers_exactly_its_real_target_positions_per_device():
    lengths = [3, 9, 16, 1, 12, 7, 16, 5]
    inputs, targets = _rows_of_lengths(lengths, 16)
    full = make_batch(inputs[:6], targets[:6], 8, num_shards=2)  # 6 rows padded to 8: 4 rows per device
    assert full.num_sequences == 6 and full.inputs_BxL.shape == (8, 16)
    assert full.idx_SxN.shape == full.weight_SxN.shape and full.idx_SxN.shape[0] == 2
    quantum = 4 * 16 // POSITION_BUCKETS  # position counts are rounded up to a multiple of rows·L/16
    assert full.idx_SxN.shape[1] % quantum == 0
    for shard in range(2):
        rows_t = full.targets_BxL[4 * shard : 4 * shard + 4].reshape(-1)
        w = full.weight_SxN[shard]
        picked = full.idx_SxN[shard][w > 0]
        np.testing.assert_array_equal(picked, np.flatnonzero(rows_t != PAD))  # every real target, nothing else
        assert (full.idx_SxN[shard][w == 0] == 0).all() and set(np.unique(w)) <= {0.0, 1.0}
    # a process feeding only device 1 gets that device's rows and positions
    mine = make_batch(inputs[:6], targets[:6], 8, num_shards=2, local=range(1, 2))
    np.testing.assert_array_equal(mine.inputs_BxL, full.inputs_BxL[4:])
    np.testing.assert_array_equal(mine.idx_SxN, full.idx_SxN[1:])


@pytest.mark.parametrize("loss", ["ce", "sampled"])
def test_a_narrower_window_gives_the_same_loss(loss):
    """Rows whose history fits in 16 of the 32 columns, fed as the 16 newest columns: positions stay right-aligned
    and padding adds no loss, so the loss is the same (what the export's shorter window graphs rely on)."""
    mc = ModelConfig(num_items=1100, max_len=32, dim=16, num_heads=2, num_blocks=2, dropout=0.0)
    tc = TrainConfig(loss=loss, negatives=64)
    graphdef, params = init_model(mc, 0)
    inputs, targets = _rows_of_lengths([3, 9, 16, 1, 12, 7, 16, 5], 32)
    place = train.Placement.create()
    key = jax.random.key(0)
    full = loss_fn(graphdef, params, place.put_batch(make_batch(inputs, targets, 8)), key, tc)
    cut = loss_fn(graphdef, params, place.put_batch(make_batch(inputs[:, -16:], targets[:, -16:], 8)), key, tc)
    np.testing.assert_allclose(float(cut), float(full), rtol=1e-5)


@pytest.mark.parametrize("loss", ["ce", "sampled", "bce"])
def test_training_lowers_the_loss(loss):
    result, _, _ = fit(tiny_cycle(), epochs=2, patience=0, loss=loss, negatives=8 * (loss == "sampled"))
    losses = [h["train_loss"] for h in result.loop.history]
    assert losses[-1] < losses[0]


def test_one_step_lowers_the_loss_on_its_batch():
    seqs, split = split_of(cycle_frame())
    mc = ModelConfig(num_items=seqs.vocab.size, **TINY_MODEL)
    tc = TrainConfig(lr=1e-2, warmup_steps=0)
    graphdef, params = init_model(mc, 0)
    tx = train.build_optimizer(tc, 10)
    opt_state = tx.init(params)
    inputs, targets = split.train.training_rows(mc.max_len)
    batch = train.Placement.create().put_batch(make_batch(inputs[:32], targets[:32], 32))
    key = jax.random.key(0)
    before = float(loss_fn(graphdef, params, batch, key, tc))
    params, opt_state, _ = train.make_train_step(graphdef, tx, tc)(params, opt_state, batch, 0, 0)
    assert float(loss_fn(graphdef, params, batch, key, tc)) < before


def test_nan_loss_is_a_clear_error():
    def poison(params):
        table = np.array(params["item_embed"]["embedding"])
        table[:] = np.nan
        return {**params, "item_embed": {"embedding": table}}

    seqs, split = split_of(tiny_cycle())
    mc = ModelConfig(num_items=seqs.vocab.size, **TINY_MODEL)
    tc = TrainConfig(**TINY_TRAIN, epochs=1)
    with pytest.raises(TrainingError, match="diverged"):
        train.fit(mc, tc, split, init_params=poison, progress=False, log=lambda *_: None)


def test_resume_with_more_epochs_is_exact(tmp_path):
    """A run of 1 epoch continued to 2 equals a run of 2 (constant schedule: it does not depend on the total),
    with the moving average of the weights restored too. Resuming from inside an epoch: test_scale.py."""
    df = tiny_cycle()
    kw = dict(patience=0, schedule="constant", ema_decay=0.9)
    full, _, _ = fit(df, run_dir=tmp_path / "full", epochs=2, **kw)
    fit(df, run_dir=tmp_path / "part", epochs=1, **kw)
    resumed, _, _ = fit(df, run_dir=tmp_path / "part", resume=True, epochs=2, **kw)
    a = [h["train_loss"] for h in full.loop.history]
    b = [h["train_loss"] for h in resumed.loop.history]
    assert len(b) == 2
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_resume_needs_the_run_directory():
    _, split = split_of(cycle_frame(num_users=8))
    with pytest.raises(ConfigError, match="run_dir"):
        train.fit(ModelConfig(num_items=20, **TINY_MODEL), TrainConfig(), split, resume=True, progress=False)


def test_cosine_schedule_ends_with_the_epochs_or_the_budget(budget_used_up_after):
    cfg = TrainConfig(schedule="cosine")
    assert train.lr_factor(cfg, 0.0) == 1.0
    assert train.lr_factor(cfg, 0.5) == pytest.approx(0.505)
    assert train.lr_factor(cfg, 1.0) == pytest.approx(train.FINAL_LR_FRACTION)
    assert train.lr_factor(cfg, 7.0) == pytest.approx(train.FINAL_LR_FRACTION)
    assert train.lr_factor(TrainConfig(schedule="constant"), 0.9) == 1.0
    df = tiny_cycle()
    # by epochs: the last step of the last epoch is at progress (steps - 1) / steps
    by_epochs, _, _ = fit(df, epochs=2, patience=0)
    steps = by_epochs.loop.step
    assert by_epochs.loop.progress == pytest.approx((steps - 1) / steps)
    # by a budget that runs out long before the epochs (after 3 steps, by the clock of the fixture): the schedule
    # is used up when the budget stops the run, inside its first epoch
    budget_used_up_after(3)
    by_budget, _, _ = fit(df, epochs=10_000, patience=0, max_minutes=60)
    assert by_budget.loop.stopped == "time budget of 60 min reached"
    assert by_budget.loop.progress == 1.0 and by_budget.loop.step == 3 and by_budget.loop.epoch == 0


def test_checkpoint_round_trip_and_corruption(tmp_path):
    graphdef, params = init_model(ModelConfig(num_items=5, **TINY_MODEL), 0)
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
    _, bigger = init_model(ModelConfig(num_items=7, **TINY_MODEL), 0)
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
    _, params = init_model(ModelConfig(num_items=5, **TINY_MODEL), 0)
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

    graphdef, params = init_model(ModelConfig(num_items=5, **TINY_MODEL), 0)
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
    from tests.conftest import TINY_MODEL, TINY_TRAIN, tiny_cycle
    assert jax.device_count() == 2, jax.devices()
    seqs = data.from_interactions(tiny_cycle())
    split = data.leave_one_out(seqs)
    mc = ModelConfig(num_items=seqs.vocab.size, **TINY_MODEL)
    tc = TrainConfig(**TINY_TRAIN, epochs=1)
    out = {}
    for n in (1, 2):
        r = train.fit(mc, tc, split, devices=jax.devices()[:n], progress=False, log=lambda *_: None)
        out[n] = [h["train_loss"] for h in r.loop.history] + [h["valid_ndcg@10"] for h in r.loop.history]
    print(json.dumps(out))
    """
)


def test_two_devices_give_the_same_losses_as_one():
    """A process with 2 (CPU) devices trains the tiny configuration on 1 and on 2 of them: the same losses and
    validation (~8 s: one batch shape to compile for each, and the session's compilation cache)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["1"], out["2"], rtol=1e-5)


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


def test_the_averaged_weights_are_the_moving_average_in_the_optimizer_state():
    params = {"w": np.array([1.0, 2.0], np.float32)}
    tx = train.build_optimizer(TrainConfig(ema_decay=0.5, warmup_steps=0), 10)
    state = tx.init(params)
    _, state = tx.update({"w": np.zeros(2, np.float32)}, state, {"w": np.array([3.0, 4.0], np.float32)})
    d = min(0.5, 2 / 11)  # the first step's decay
    np.testing.assert_allclose(train.averaged_params(params, state)["w"], [1 + (1 - d) * 2, 2 + (1 - d) * 2])
    plain = train.build_optimizer(TrainConfig(), 10)
    assert train.averaged_params(params, plain.init(params)) is params  # no average kept: the raw weights


def test_ema_decay_outside_0_1_is_refused():
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
