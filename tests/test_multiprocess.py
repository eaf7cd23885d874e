"""Training across processes (jax.distributed): two processes on 127.0.0.1 (CPU devices, gloo collectives) stand in
for two hosts. Each test launches real `sasrec-jax train` processes, as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sasrec_jax import checkpoint
from tests.conftest import cycle_frame

ROOT = Path(__file__).resolve().parents[1]

# `sasrec-jax train`, recording every step's loss to $LOSS_FILE; with $KILL_AT_SAVE, killing itself (SIGKILL) right
# after that many checkpoints are on disk; with $OUT_OF_TIME_AFTER, its own clock says the time budget is used up
# once that step's loss is known (as a host whose clock runs ahead would).
WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    from sasrec_jax import budget, cli, train
    losses = {}
    def on_loss(step, value):
        losses[step] = value
        with open(os.environ["LOSS_FILE"], "w") as f:
            json.dump(losses, f)
    train._on_loss = on_loss
    if os.environ.get("OUT_OF_TIME_AFTER"):
        budget.Clock.training_over = lambda self: max(losses, default=0) >= int(os.environ["OUT_OF_TIME_AFTER"])
    if os.environ.get("KILL_AT_SAVE"):
        saves = []
        def after_checkpoint(loop):
            saves.append(loop.step)
            if len(saves) == int(os.environ["KILL_AT_SAVE"]):
                os.kill(os.getpid(), signal.SIGKILL)
        train._after_checkpoint = after_checkpoint
    sys.exit(cli.main(sys.argv[1:]))
    """
)

TINY = ["--max-len", "8", "--dim", "16", "--blocks", "1", "--batch-size", "16", "--no-progress", "--epochs", "2"]
TIMEOUT = 300  # a launch that takes longer has hung: the test fails instead of waiting forever


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_job_id() -> int:
    """A fake Slurm job id whose coordinator port (JAX: 61440 + id % 4096) is free here."""
    for job in range(int(time.time()) % 4096, int(time.time()) % 4096 + 4096):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 61440 + job % 4096))
            except OSError:
                continue
        return job
    raise RuntimeError("no free port for a fake Slurm job")


class Proc:
    def __init__(self, popen: subprocess.Popen, loss_file: Path):
        self.popen, self.loss_file = popen, loss_file
        self.returncode, self.out, self.err, self.ended = None, "", "", None

    def wait(self, deadline: float) -> None:
        try:
            self.out, self.err = self.popen.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.out, self.err = self.popen.communicate()
        self.returncode, self.ended = self.popen.returncode, time.monotonic()

    @property
    def losses(self) -> dict[int, float]:
        if not self.loss_file.is_file():
            return {}
        return {int(k): v for k, v in json.loads(self.loss_file.read_text()).items()}


def launch(
    tmp: Path, name: str, args: list[str], procs: int, local_devices: int, env=None, slurm: bool = False
) -> list[Proc]:
    """Starts `procs` processes of `sasrec-jax train ARGS` (a multi-process run when procs > 1) and waits for all.
    With `slurm`, the processes find each other as in a Slurm job step (`--distributed`, JAX reads SLURM_*)."""
    port, job = _free_port(), _slurm_job_id()
    started = []
    for i in range(procs):
        dist = ["--local-devices", str(local_devices)]
        if procs > 1 and slurm:
            dist += ["--distributed", "--heartbeat-seconds", "10"]
            env = {**(env or {})}
            env[i] = {
                **env.get(i, {}),
                **{"SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(procs)},
                **{"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_STEP_NUM_NODES": "1"},
            }
        elif procs > 1:
            dist += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(procs), "--process-id", str(i)]
            dist += ["--heartbeat-seconds", "10"]
        loss_file = tmp / f"{name}-losses-{i}.json"
        full_env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(ROOT),
            "LOSS_FILE": str(loss_file),
            **((env or {}).get(i, {})),
        }
        cmd = [sys.executable, "-c", WORKER, *args, *dist]
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)
        started.append(Proc(popen, loss_file))
    deadline = time.monotonic() + TIMEOUT
    waiters = [threading.Thread(target=p.wait, args=(deadline,)) for p in started]  # each one's own end time
    for w in waiters:
        w.start()
    for w in waiters:
        w.join()
    return started


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "events.csv"
    cycle_frame(num_users=96).to_csv(path, index=False)
    return path


def _train(events: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(events), "--out", str(run), *TINY, *extra]


def _from_gloo(line: str) -> bool:
    """Gloo's own connection notice ("[Gloo] Rank 1 is connected to 1 peer ranks. …"), printed by C++ on stdout and
    at times split across lines."""
    return "[Gloo]" in line or "peer ranks" in line


def _ok(procs: list[Proc]) -> None:
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{p.err[-3000:]}"


def _assert_same_run(a: Path, b: Path, losses_a: dict, losses_b: dict) -> None:
    """Per-step losses, per-epoch history and final validation/test metrics equal to 1e-5."""
    assert losses_a and sorted(losses_a) == sorted(losses_b)
    np.testing.assert_allclose([losses_b[s] for s in sorted(losses_a)], [losses_a[s] for s in sorted(losses_a)],
                               rtol=0, atol=1e-5)  # fmt: skip
    hist_a, hist_b = (np.genfromtxt(r / "history.csv", delimiter=",", names=True) for r in (a, b))
    for col in ("train_loss", "valid_ndcg10", "valid_hr10", "step"):
        np.testing.assert_allclose(hist_b[col], hist_a[col], rtol=0, atol=1e-5)
    m_a, m_b = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    for split in ("valid", "test"):
        for metric in ("NDCG@10", "HR@10", "MRR@10", "NDCG@20", "users"):
            assert abs(m_a[split][metric] - m_b[split][metric]) <= 1e-5, (split, metric)


@pytest.mark.slow
@pytest.mark.parametrize("local_devices", [1, 2])
def test_two_processes_train_exactly_like_one_process_with_the_same_devices(tmp_path, events, local_devices):
    single = launch(tmp_path, "single", _train(events, tmp_path / "single"), 1, 2 * local_devices)
    _ok(single)
    # 2 devices each: started as a Slurm job step would start them (JAX detects the cluster)
    pair = launch(tmp_path, "pair", _train(events, tmp_path / "pair"), 2, local_devices, slurm=local_devices == 2)
    _ok(pair)
    # the two processes fed different rows of each global batch, yet every process saw the same global loss
    assert pair[0].losses == pair[1].losses
    _assert_same_run(tmp_path / "single", tmp_path / "pair", single[0].losses, pair[0].losses)
    # process 0 alone logs and writes the run files; the checkpoint holds the pair's replicated weights once
    assert "| SASRec (test) |" in pair[0].out
    ours = [line for line in pair[1].out.splitlines() if line.strip() and not _from_gloo(line)]
    assert ours == [], ours
    assert checkpoint.read_state(tmp_path / "pair")["meta"]["epoch"] == 2


@pytest.mark.slow
def test_a_dead_process_ends_the_other_and_a_new_pair_resumes_exactly(tmp_path, events):
    reference = launch(tmp_path, "ref", _train(events, tmp_path / "ref"), 2, 1)
    _ok(reference)

    run = tmp_path / "run"
    args = _train(events, run, "--checkpoint-minutes", "1e-9")  # a resume point after every step
    killed = launch(tmp_path, "killed", args, 2, 1, env={1: {"KILL_AT_SAVE": "3"}})
    assert killed[1].returncode == -9  # SIGKILL, right after its third checkpoint was on disk
    survivor = killed[0]
    assert survivor.returncode not in (0, None)
    assert survivor.ended - killed[1].ended < 60  # bounded: no hang waiting for the dead peer
    error_lines = [line for line in survivor.err.splitlines() if "error: process" in line]  # C++ logs share stderr
    assert error_lines and "lost contact with the other processes" in error_lines[0], survivor.err[-3000:]
    assert "--resume" in error_lines[0]
    meta = checkpoint.read_state(run)["meta"]
    assert (meta["epoch"], meta["batch"], meta["step"]) == (0, 3, 3)
    assert not [p for p in run.rglob("*orbax-checkpoint-tmp*")]

    resumed = launch(tmp_path, "resumed", [*args, "--resume"], 2, 1)
    _ok(resumed)
    assert "resuming inside epoch 1 (batch 3)" in resumed[0].out
    after = resumed[0].losses
    assert min(after) == 4  # continues at the step after the checkpoint
    ref_losses = reference[0].losses
    np.testing.assert_allclose([after[s] for s in sorted(after)], [ref_losses[s] for s in sorted(after)],
                               rtol=0, atol=1e-5)  # fmt: skip
    _assert_same_run(tmp_path / "ref", run, {s: ref_losses[s] for s in after}, after)


@pytest.mark.slow
def test_the_time_budget_is_decided_together_when_one_clock_runs_ahead(tmp_path, events):
    run = tmp_path / "run"
    ahead = {1: {"OUT_OF_TIME_AFTER": "5"}}  # process 1's clock says the budget is used up after step 5
    pair = launch(tmp_path, "pair", _train(events, run, "--max-minutes", "60"), 2, 1, env=ahead)
    _ok(pair)  # no hang: process 0's own clock never ran out, yet it stopped on the same step
    assert "time budget of 60 min reached" in pair[0].out
    assert pair[0].losses == pair[1].losses and max(pair[0].losses) < 24  # 24 steps in the 2 epochs planned
    meta = checkpoint.read_state(run)["meta"]
    assert meta["stopped"].startswith("time budget") and meta["step"] == max(pair[0].losses)
    assert (run / "metrics.json").is_file()


@pytest.mark.slow
def test_when_process_0_dies_the_others_end_too(tmp_path, events):
    args = _train(events, tmp_path / "run", "--checkpoint-minutes", "1e-9")
    killed = launch(tmp_path, "killed", args, 2, 1, env={0: {"KILL_AT_SAVE": "2"}})
    assert killed[0].returncode == -9
    survivor = killed[1]
    assert survivor.returncode not in (0, None)
    assert survivor.ended - killed[0].ended < 60, survivor.err[-2000:]
    # the coordinator is gone: either our line, or JAX's runtime ending the process with its own
    assert "lost contact with the other processes" in survivor.err or "another task died" in survivor.err


SAVES = textwrap.dedent(
    """
    import sys
    import numpy as np
    from sasrec_jax import checkpoint, distributed, train
    distributed.initialize(distributed.Settings(sys.argv[1], 2, int(sys.argv[2]), 1, heartbeat_seconds=10))
    placement = train.Placement.create()
    params = placement.replicate({"w": np.ones((64, 8), np.float32)})
    ckpt = checkpoint.Checkpoints(sys.argv[3])
    for step in range(3):  # a resume point and a best save with the same number, both in flight at once
        ckpt.save_state(params, params, {"step": step})
        ckpt.save_best(step, params, {"step": step}, float(step))
    ckpt.wait()
    ckpt.close()
    print("saved", checkpoint.saved_steps(ckpt.run_dir / checkpoint.STATE_DIR), flush=True)
    """
)


@pytest.mark.slow
def test_resume_points_and_best_saves_numbered_alike_do_not_collide(tmp_path):
    port, run = _free_port(), tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAVES, f"127.0.0.1:{port}", str(i), str(run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    except subprocess.TimeoutExpired:  # what the collision did: "Barrier … is already ongoing", then a hang
        for p in procs:
            p.kill()
        pytest.fail("the saves hung")
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "saved [1, 2]" in out, err[-2000:]
    assert checkpoint.saved_steps(run / checkpoint.BEST_DIR) == [2]


def test_bad_distributed_settings_are_one_line_and_exit_2(tmp_path, events, capsys):
    from sasrec_jax import cli

    base = _train(events, tmp_path / "run")
    cases = [
        (["--coordinator", "localhost"], "HOST:PORT"),
        (["--coordinator", "127.0.0.1:1234"], "needs --num-processes and --process-id"),
        (["--num-processes", "2"], "needs --coordinator"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id must be"),
        (["--local-devices", "0"], "--local-devices must be >= 1"),
    ]
    for extra, message in cases:
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_settings_come_from_flags_first_then_the_environment():
    from sasrec_jax.distributed import Settings
    from sasrec_jax.errors import ConfigError

    env = {"SASREC_COORDINATOR": "10.0.0.1:1234", "SASREC_NUM_PROCESSES": "4", "SASREC_PROCESS_ID": "3"}
    s = Settings.from_env(env, process_id=1)
    assert (s.coordinator, s.num_processes, s.process_id, s.enabled) == ("10.0.0.1:1234", 4, 1, True)
    assert not Settings.from_env({}).enabled and Settings.from_env({}, auto=True).enabled
    with pytest.raises(ConfigError, match="SASREC_NUM_PROCESSES='x' is not an integer"):
        Settings.from_env({"SASREC_NUM_PROCESSES": "x"})
