"""Scale: the chunked cross-entropy, validation and test samples, the budget plan, checkpoints by time with exact
resume from inside an epoch, a kill in the first epoch, and out-of-memory as one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sasrec_jax import budget, checkpoint, cli, data, evaluate, losses, train
from sasrec_jax.config import ModelConfig, TrainConfig
from sasrec_jax.model import init_model
from tests.conftest import TINY_DATA, TINY_FLAGS, TINY_MODEL, TINY_TRAIN, tiny_cycle

ROOT = Path(__file__).resolve().parents[1]


def _loss_inputs(n=37, v=1001, d=16, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (n, d))
    table = jax.random.normal(k[1], (v, d)) * 0.5
    t = jax.random.randint(k[2], (n,), 1, v)
    w = (jax.random.uniform(k[3], (n,)) > 0.2).astype(jnp.float32)  # some positions weigh 0 (bucket padding)
    return h, table, t, w


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [64, 256, 1001, 4096])  # blocks that divide V or not, one block, larger than V
def test_chunked_ce_equals_the_one_shot_softmax_in_value_and_gradients(chunk, label_smoothing):
    h, table, t, w = _loss_inputs()

    def loss(c):
        return jax.jit(
            jax.value_and_grad(lambda h, e: losses.full_softmax_ce(h, e, t, w, label_smoothing, chunk=c), (0, 1))
        )

    (v0, (dh0, de0)), (v1, (dh1, de1)) = loss(0)(h, table), loss(chunk)(h, table)
    np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dh1, dh0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(de1, de0, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(de1[0]).max()) == 0.0  # the padding row takes no gradient
    assert float(jnp.abs(de0).max()) > 0


def test_chunked_logsumexp_has_no_catalogue_sized_intermediate():
    """No [N, V] (or [V, N]) array anywhere in the forward or backward computation of the chunked loss."""
    n, v = 48, 5000
    h, table, t, w = _loss_inputs(n=n, v=v)
    grad = jax.value_and_grad(lambda h, e: losses.full_softmax_ce(h, e, t, w, chunk=512), (0, 1))
    shapes = {tuple(var.aval.shape) for eq in jax.make_jaxpr(grad)(h, table).eqns for var in eq.outvars}
    assert not [s for s in shapes if n in s and any(x >= v for x in s)], shapes
    one_shot = jax.value_and_grad(lambda h, e: losses.full_softmax_ce(h, e, t, w, chunk=0), (0, 1))
    assert (n, v) in {tuple(var.aval.shape) for eq in jax.make_jaxpr(one_shot)(h, table).eqns for var in eq.outvars}


def test_the_chunked_path_is_chosen_only_for_large_logits():
    assert losses.ce_chunk_size(7_200, 3_417) == 0  # MovieLens-1M's steps keep the one-shot logits
    chunk = losses.ce_chunk_size(2_048, 316_001)
    assert 0 < chunk < 316_001 and chunk % 256 == 0
    assert 2_048 * chunk <= losses.CE_CHUNK_LOGITS


def test_sample_rows_is_seeded_sorted_and_keeps_small_sets_whole():
    assert np.array_equal(evaluate.sample_rows(6_040, 10_000, 0), np.arange(6_040))
    assert np.array_equal(evaluate.sample_rows(50, 0, 0), np.arange(50))
    a, b = evaluate.sample_rows(286_000, 10_000, 3), evaluate.sample_rows(286_000, 10_000, 3)
    assert np.array_equal(a, b) and len(np.unique(a)) == 10_000 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, evaluate.sample_rows(286_000, 10_000, 4))


def _split(**overrides):
    seqs = data.from_interactions(tiny_cycle(**overrides))
    return seqs, data.leave_one_out(seqs)


def test_the_final_evaluation_is_sized_to_the_budget():
    _, split = _split(num_users=240, length=12)
    logs = []
    cfg = TrainConfig(valid_users=100, seed=1)
    # a ranking batch of 10 users "takes" 1 s: all 240 test users with 3 baselines (96 s) + 100 validation users
    # (10 s) exceed a quarter of a 200 s budget, so the test users are cut to what fits: (50 - 10) / 0.4 = 100
    plan = budget.plan_evaluation(cfg, split, lambda windows: 1.0, 10, 200.0, logs.append)
    assert len(plan.valid_rows) == 100 and np.array_equal(plan.valid_rows, evaluate.sample_rows(240, 100, 1))
    assert plan.test_users == 100
    assert plan.final_seconds() <= budget.FINAL_EVAL_SHARE * 200.0
    assert any("seeded sample of 100" in line for line in logs)
    unbounded = budget.plan_evaluation(cfg, split, lambda windows: 1.0, 10, float("inf"), logs.append)
    assert unbounded.test_users == 240


def _fit(split, seqs, run_dir=None, resume=False, **kw):
    """`train.fit` of conftest's tiny configuration (its programs are compiled once per session)."""
    mc = ModelConfig(num_items=seqs.vocab.size, **TINY_MODEL)
    tc = TrainConfig(**{**TINY_TRAIN, "epochs": 2, "patience": 0, **kw})
    return train.fit(mc, tc, split, run_dir=run_dir, resume=resume, progress=False, log=lambda *_: None)


class Killed(Exception):
    pass


def test_resume_from_inside_an_epoch_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    seqs, split = _split()
    full = _fit(split, seqs, run_dir=tmp_path / "full", ema_decay=0.9)
    steps_per_epoch = full.loop.step // 2
    assert steps_per_epoch >= 4

    saves = []

    def kill_after_third_save(loop):
        saves.append((loop.epoch, loop.batch))
        if len(saves) == 3:
            raise Killed

    # checkpoint_minutes ~0: `last` after every step; the "kill" comes right after the third save (step 3)
    monkeypatch.setattr(train, "_after_checkpoint", kill_after_third_save)
    with pytest.raises(Killed):
        _fit(split, seqs, run_dir=tmp_path / "part", ema_decay=0.9, checkpoint_minutes=1e-9)
    assert saves[-1] == (0, 3)  # inside the first epoch
    monkeypatch.setattr(train, "_after_checkpoint", None)
    resumed = _fit(split, seqs, run_dir=tmp_path / "part", resume=True, ema_decay=0.9, checkpoint_minutes=1e-9)
    assert resumed.loop.step == full.loop.step and resumed.loop.epoch == 2
    np.testing.assert_array_equal(
        [h["train_loss"] for h in resumed.loop.history], [h["train_loss"] for h in full.loop.history]
    )
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    target = {"params": init_model(ModelConfig(num_items=seqs.vocab.size, **TINY_MODEL), 0)[1]}
    last_full = checkpoint.read_state(tmp_path / "full", target)["params"]
    last_resumed = checkpoint.read_state(tmp_path / "part", target)["params"]
    for a, b in zip(jax.tree.leaves(last_full), jax.tree.leaves(last_resumed)):
        np.testing.assert_array_equal(a, b)
    # a save after every step, yet a bounded number kept; `best` is the best validation's
    assert len(checkpoint.saved_steps(tmp_path / "part" / checkpoint.STATE_DIR)) == checkpoint.KEEP_STATE
    best_step = resumed.loop.history[resumed.loop.best_epoch - 1]["step"]
    assert checkpoint.saved_steps(tmp_path / "part" / checkpoint.BEST_DIR) == [best_step]


def test_a_budget_stop_inside_an_epoch_resumes_where_it_stopped(tmp_path, budget_used_up_after, monkeypatch):
    seqs, split = _split()
    _, targets = split.train.training_rows(TINY_MODEL["max_len"], TrainConfig().train_windows)
    steps_per_epoch = math.ceil((targets != 0).any(axis=1).sum() / TINY_TRAIN["batch_size"])
    logged = []
    monkeypatch.setattr(train, "STATUS_LOG_SECONDS", 0.0)  # a status line after every step
    budget_used_up_after(1)  # the budget runs out with the first step, on any machine
    first = train.fit(
        ModelConfig(num_items=seqs.vocab.size, **TINY_MODEL),
        TrainConfig(**TINY_TRAIN, epochs=3, patience=0, max_minutes=60),
        split,
        run_dir=tmp_path / "r",
        progress=False,
        log=logged.append,
    )
    assert first.loop.stopped.startswith("time budget") and (first.loop.epoch, first.loop.batch) == (0, 1)
    assert first.eval_plan["valid_users"] == len(split.valid)
    # the status line: the rate, the epoch's ETA, the budget left, the memory in use
    status = [line for line in logged if line.startswith("step 1 (")]
    assert status and f"epoch 1: batch 1/{steps_per_epoch}" in status[0] and "steps/s" in status[0]
    assert "epoch ETA" in status[0] and "training budget left 0.0 s" in status[0] and "RSS" in status[0]
    again = _fit(split, seqs, run_dir=tmp_path / "r", resume=True, epochs=3)
    assert again.loop.epoch == 3 and not again.loop.stopped and again.loop.step == 3 * steps_per_epoch
    assert [h["step"] for h in again.loop.history] == [1, steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from sasrec_jax import cli, train
    saves = []
    def kill(loop):
        saves.append(loop.step)
        if len(saves) == int(os.environ["KILL_AT_SAVE"]):
            os.kill(os.getpid(), signal.SIGKILL)
    train._after_checkpoint = kill
    sys.exit(cli.main(sys.argv[1:]))
    """
)

CLI_TINY = [*TINY_FLAGS, "--epochs", "2"]


def _train_args(tmp_path, extra=CLI_TINY, **data):
    """The run directory and `sasrec-jax train` arguments for a cycle data set written as CSV."""
    csv = tmp_path / "events.csv"
    tiny_cycle(**data).to_csv(csv, index=False)
    run = tmp_path / "run"
    return run, ["train", "--data", str(csv), "--out", str(run), *extra]


def _run(args, env_extra=None, script=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "sasrec_jax"]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_a_run_killed_in_its_first_epoch_continues_with_resume(tmp_path):
    run, args = _train_args(tmp_path)
    killed = _run([*args, "--checkpoint-minutes", "1e-9"], {"KILL_AT_SAVE": "2"}, KILL_SCRIPT)
    assert killed.returncode == -signal.SIGKILL
    meta = checkpoint.read_state(run)["meta"]
    assert (meta["epoch"], meta["batch"]) == (0, 2)
    assert not [p for p in run.rglob("*tmp*")]  # the kill came after a complete, atomic save
    resumed = _run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming inside epoch 1 (batch 2)" in resumed.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sample"]["test_users"] == metrics["sample"]["test_of"] == TINY_DATA["num_users"]


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_beginning(tmp_path):
    run, args = _train_args(tmp_path)
    killed = _run(args, {"KILL_AT_SAVE": "1"}, KILL_SCRIPT)
    assert killed.returncode == -signal.SIGKILL
    shutil.rmtree(run / checkpoint.STATE_DIR)  # as if killed before the first save: only config.json is left
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "config.json"]
    resumed = _run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "no checkpoint" in resumed.stdout and (run / "metrics.json").is_file()


def test_an_impossible_memory_request_is_one_line_and_exit_2(tmp_path, capsys):
    # [20,000 × 1,000 × 1,000] attention scores per block: 80 GB, more than any machine this runs on
    run, args = _train_args(tmp_path, ["--max-len", "1000", "--dim", "8", "--blocks", "1"], num_users=64)
    code = cli.main([*args, "--batch-size", "20000", "--no-progress", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "out of memory in the train step" in err and "GB" in err and "--batch-size (now 20000)" in err
    assert "catalogue 20 items" in err and "--resume" in err
    # the run directory is left resumable: the same run continues with a batch that fits
    assert cli.main([*args, "--batch-size", "32", "--no-progress", "--epochs", "1", "--resume"]) == 0
    assert (run / "metrics.json").is_file()


def test_the_estimator_evaluates_the_samples_it_validated_on_and_records_them(tmp_path):
    from sasrec_jax import SASRec

    model = SASRec(**TINY_MODEL, **TINY_TRAIN, epochs=1, valid_users=50, progress=False, verbose=False)
    model.fit(tiny_cycle(), run_dir=tmp_path / "run")
    model.evaluate()
    metrics = model.metrics
    n = TINY_DATA["num_users"]
    assert metrics["sample"] == {"seed": 0, "valid_users": 50, "valid_of": n, "test_users": n, "test_of": n}
    assert metrics["valid"]["users"] == 50 and metrics["test"]["users"] == n
    assert metrics["baselines"]["popular"]["users"] == n
    model.evaluate(test_users=30, valid_users=0)
    smaller = model.metrics
    assert smaller["test"]["users"] == 30 and smaller["valid"]["users"] == n
    assert model.data_info["eval"]["valid_users"] == 50  # what training used, saved in config.json
    with pytest.raises(Exception, match="test_users must be an integer >= 0"):
        model.evaluate(test_users=-1)


def test_a_run_that_never_saved_a_checkpoint_can_be_started_again_without_overwrite(tmp_path, capsys):
    run, args = _train_args(tmp_path, [*CLI_TINY, "--epochs", "1"])
    (run / "checkpoint").mkdir(parents=True)
    (run / checkpoint.CONFIG).write_text("{}")  # what a run killed before its first save leaves
    assert checkpoint.never_saved(run)
    assert cli.main(args) == 0 and (run / "metrics.json").is_file()
    assert not checkpoint.never_saved(run)
    assert cli.main(args) == 2  # a run with checkpoints is never replaced without --overwrite
    assert "already exists" in capsys.readouterr().err


def test_the_status_line_names_the_rate_the_etas_and_the_memory():
    """Without a budget, the status line has no budget part (with one: the budget stop test above)."""
    loop = train.LoopState(epoch=0, batch=100)
    line = train._status(loop, 2.0, budget.Clock(budget_s=float("inf")), 4570)
    assert "epoch 1: batch 100/4,570" in line and "2.00 steps/s" in line
    assert "epoch ETA 37.2 min" in line  # 4,470 batches at 2 steps/s
    assert "RSS" in line and "GB" in line and "budget" not in line
