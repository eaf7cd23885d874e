"""Seeing training as it happens: the run's bar and its time left, history.csv after every validation with the
validation loss, --log-to tensorboard/csv, `sasrec-jax plot`, the budget plan, the popular-baseline warning, and the
command line's tables."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sasrec_jax import budget, cli, data, evaluate, loggers, plot, train
from sasrec_jax.config import ModelConfig, TrainConfig
from sasrec_jax.errors import ConfigError
from tests.conftest import TINY_FLAGS, TINY_MODEL, TINY_TRAIN, tiny_cycle


def _fit(run_dir=None, **train_kw):
    """`train.fit` of conftest's tiny configuration (its programs are compiled once per session)."""
    seqs = data.from_interactions(tiny_cycle())
    split = data.leave_one_out(seqs)
    mc = ModelConfig(num_items=seqs.vocab.size, **TINY_MODEL)
    tc = TrainConfig(**{**TINY_TRAIN, "epochs": 2, "patience": 0, **train_kw})
    return train.fit(mc, tc, split, run_dir=run_dir, progress=False, log=lambda *_: None)


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# history.csv and the validation loss
# ---------------------------------------------------------------------------------------------------------


def test_history_csv_has_a_row_for_every_validation_while_the_run_goes_on(tmp_path, monkeypatch):
    seen = []  # (validations done, rows in history.csv) at every checkpoint save, i.e. while training runs
    monkeypatch.setattr(train, "_after_checkpoint", lambda loop: seen.append((len(loop.history), _history(tmp_path))))
    result = _fit(tmp_path, epochs=3)
    assert [len(rows) for _, rows in seen] == [n for n, _ in seen]  # the file always holds every validation so far
    assert {n for n, _ in seen} == {0, 1, 2, 3}  # saves before the first validation and after each one
    rows = _history(tmp_path)
    assert list(rows[0]) == ["epoch", "train_loss", "valid_loss", "valid_ndcg@10", "valid_hr@10", "seconds", "step"]
    for row, h in zip(rows, result.loop.history, strict=True):
        assert float(row["valid_loss"]) == pytest.approx(h["valid_loss"])
        # full softmax over 20 items: below a uniform guess (log 20) once trained, and above 0
        assert 0 < h["valid_loss"] < math.log(20) + 1
    assert result.loop.history[-1]["valid_loss"] < result.loop.history[0]["valid_loss"]  # it learns the cycle


def test_history_csv_is_written_before_a_budget_stop_returns(tmp_path, budget_used_up_after):
    budget_used_up_after(2)  # the budget runs out at the second step, inside the first epoch
    result = _fit(tmp_path, epochs=100, max_minutes=60)
    assert result.loop.stopped.startswith("time budget")
    rows = _history(tmp_path)
    assert len(rows) == 1 and rows[0]["step"] == "2" and math.isfinite(float(rows[0]["valid_loss"]))


def test_the_validation_loss_is_the_full_softmax_cross_entropy_of_the_targets():
    """By hand: -log softmax(scores)[target], padding's column (NEG_INF) given no probability; the user's history
    stays in the softmax, as in the training loss, even where the ranking excludes it."""
    windows = data.SequenceSet(
        np.array([2, 3, 1], np.int32), np.array([0, 2]), np.array([2, 3]), np.arange(2), np.array([1, 3], np.int32)
    )
    scores = np.array([[-1e9, 0.5, 2.0, 1.0], [-1e9, 1.0, 0.0, 3.0]], np.float32)
    ranking = evaluate.rank(lambda seq: scores[: len(seq)], windows, 3, 4, batch_size=2, loss=True)
    expected = [np.log(np.exp(s[1:]).sum()) - s[t] for s, t in zip(scores.astype(np.float64), (1, 3))]
    np.testing.assert_allclose(ranking.nll, expected, rtol=1e-5)
    assert ranking.summary(3)["loss"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert "loss" not in evaluate.rank(lambda seq: scores[: len(seq)], windows, 3, 4, batch_size=2).summary(3)


# ---------------------------------------------------------------------------------------------------------
# --log-to tensorboard,csv
# ---------------------------------------------------------------------------------------------------------


def _event_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the TensorBoard event files in `logdir`: TensorBoard's own reader when it is
    installed, else the records parsed with tensorboardX's protobuf classes (TFRecord framing: length, its CRC,
    the Event, its CRC)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        from tensorboardX.proto import event_pb2

        out: dict[str, list[tuple[int, float]]] = {}
        for path in sorted(logdir.glob("events.out.tfevents.*")):
            raw, i = path.read_bytes(), 0
            while i < len(raw):
                (n,) = struct.unpack("<Q", raw[i : i + 8])
                event = event_pb2.Event.FromString(raw[i + 12 : i + 12 + n])
                i += 12 + n + 4
                for v in event.summary.value:
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
        return out
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_and_csv_logs_hold_the_training_curves(tmp_path):
    result = _fit(tmp_path, log_to="tensorboard,csv")  # 2 epochs of 6 steps: a train/loss point at step 10
    logdir = tmp_path / "logs"
    scalars = _event_scalars(logdir)
    tags = {"train/loss", "train/lr", "train/epoch_loss", "valid/loss", "valid/ndcg_at_10", "valid/hr_at_10"}
    assert tags <= set(scalars)
    assert [step for step, _ in scalars["valid/loss"]] == [6, 12] and [s for s, _ in scalars["train/loss"]] == [10]
    hist = result.loop.history
    np.testing.assert_allclose([v for _, v in scalars["valid/loss"]], [h["valid_loss"] for h in hist], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["valid/ndcg_at_10"]], [h["valid_ndcg@10"] for h in hist])
    assert 0 < scalars["train/lr"][0][1] <= TINY_TRAIN["lr"]
    with (logdir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(loggers.CSV_COLUMNS)
    assert {r["tag"] for r in rows} == tags
    assert [float(r["value"]) for r in rows if r["tag"] == "valid/loss"] == [h["valid_loss"] for h in hist]


def test_log_to_needs_a_run_directory_and_names_only_known_targets():
    with pytest.raises(ConfigError, match="log_to takes tensorboard, csv"):
        TrainConfig(log_to="tensorboard,wandb")
    assert TrainConfig(log_to=" csv, tensorboard,csv").log_targets == ("csv", "tensorboard")
    with pytest.raises(ConfigError, match="give fit a run_dir"):
        _fit(None, log_to="csv")


def test_a_missing_tensorboardx_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` now raises ImportError
    csv_file = tmp_path / "events.csv"
    tiny_cycle().to_csv(csv_file, index=False)
    argv = ["train", "--data", str(csv_file), "--out", str(tmp_path / "run"), *TINY_FLAGS, "--log-to", "tensorboard"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "pip install tensorboardX" in err


# ---------------------------------------------------------------------------------------------------------
# sasrec-jax plot
# ---------------------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_draws_the_curves_into_a_png(tiny_run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)  # the shared run is read-only: the default PNG goes into the run directory
    assert cli.main(["plot", str(run)]) == 0
    png = (run / "curves.png").read_bytes()
    assert png[:8] == PNG_MAGIC and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1000, 400)  # 10 x 4 inches at 100 dpi
    assert len(png) > 20_000  # two panels of curves, not an empty canvas
    assert str(run / "curves.png") in capsys.readouterr().out
    other = tmp_path / "elsewhere" / "c.png"
    assert cli.main(["plot", str(run), "--out", str(other)]) == 0 and other.read_bytes()[:8] == PNG_MAGIC


def test_a_validation_inside_an_epoch_is_drawn_where_it_happened():
    # 68 steps per epoch; the budget stopped the fourth epoch after 12 steps
    assert plot.epochs_done({"epoch": [1, 2, 3, 4], "step": [68, 136, 204, 216]}) == pytest.approx([1, 2, 3, 216 / 68])
    assert plot.epochs_done({"epoch": [1], "step": [12]}) == [1]  # no complete epoch to learn the length from


@pytest.mark.parametrize(
    "history, message",
    [
        (None, "run directory not found"),
        ("", "history.csv not found"),
        ("epoch,train_loss,valid_loss,valid_ndcg@10,valid_hr@10,seconds,step\n", "has no rows yet"),
        ("epoch,loss\n1,2.0\n", "lacks the columns"),
        ("epoch,train_loss,valid_ndcg@10,valid_hr@10\n1,x,0.1,0.2\n", "not a number"),
    ],
)
def test_plot_of_a_run_without_curves_is_one_line(tmp_path, capsys, history, message):
    run = tmp_path / "run"
    if history is not None:
        run.mkdir()
        if history:
            (run / "history.csv").write_text(history)
    assert cli.main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (run / "curves.png").exists()


# ---------------------------------------------------------------------------------------------------------
# The run's bar, its time left, and the budget
# ---------------------------------------------------------------------------------------------------------


def test_the_time_left_follows_the_budget_when_it_ends_first():
    kw = dict(steps_left=100, steps_per_s=2.0, validations_left=2, validation_s=5.0)
    assert loggers.time_left(**kw, training_left_s=math.inf) == loggers.TimeLeft(60.0, False)  # 50 s + 2 x 5 s
    assert loggers.time_left(**kw, training_left_s=30.0) == loggers.TimeLeft(35.0, True)  # then one validation
    assert loggers.time_left(**kw, training_left_s=100.0) == loggers.TimeLeft(60.0, False)  # the epochs end first
    # before the rate is measured: the budget bounds it, or nothing does
    assert loggers.time_left(**{**kw, "steps_per_s": 0.0}, training_left_s=30.0) == loggers.TimeLeft(35.0, True)
    assert math.isinf(loggers.time_left(**{**kw, "steps_per_s": 0.0}, training_left_s=math.inf).seconds)
    # training past its share of the budget: only the last validation is left
    assert loggers.time_left(**kw, training_left_s=-3.0) == loggers.TimeLeft(5.0, True)
    assert [loggers.clock_text(s) for s in (0.4, 99, 720, 3723, math.inf)] == ["0:00", "1:39", "12:00", "1:02:03", "?"]


def test_the_run_bar_says_the_epoch_and_the_time_left(capsys):
    bar = loggers.RunBar(True, 4, 200, final_s=40.0)
    bar.show(epoch=4, used_s=81.0, left=loggers.TimeLeft(99.0, True), detail="batch 23/48", force=True)
    bar.close(epoch=4, used_s=180.0, why="time budget of 3 min reached")
    err = capsys.readouterr().err
    assert "epoch 4/200" in err and "1:21 elapsed, 1:39 left (time budget)" in err and "batch 23/48" in err
    assert "then the final evaluation ~0:40" in err and "3:00 elapsed · time budget of 3 min reached" in err
    quiet = loggers.RunBar(False, 1, 3, final_s=None)
    quiet.show(epoch=1, used_s=1.0, left=loggers.TimeLeft(1.0, False), detail="", force=True)
    quiet.close(epoch=1, used_s=1.0, why="done")
    assert capsys.readouterr().err == ""


def test_a_budget_counts_from_where_the_command_started():
    with budget.budget_counted_from(12.5):
        assert budget.Clock(60.0).started == 12.5
    assert budget.Clock(60.0).started != 12.5


def test_the_final_evaluation_estimate_counts_the_baselines_and_the_compile():
    seqs = data.from_interactions(tiny_cycle())
    split = data.leave_one_out(seqs)  # 192 validation and 192 test users: 2 batches of 100 each
    calls = iter([3.0, 1.0])  # the first call compiles: 2 s more than the second
    plan = budget.plan_evaluation(
        TrainConfig(), split, lambda w: next(calls), 100, math.inf, lambda *_: None, time_baselines=lambda w: 0.5
    )
    assert (plan.batch_seconds, plan.compile_seconds, plan.baseline_seconds) == (1.0, 2.0, 0.5)
    assert plan.final_seconds() == 2.0 + 2 * 1.0 + 2 * (1.0 + 0.5)


# ---------------------------------------------------------------------------------------------------------
# The command line: the warning against the popular baseline, tables, --json, --version, --help
# ---------------------------------------------------------------------------------------------------------


def _popular_wins(path: Path) -> Path:
    """Data where the popular baseline is perfect: every user's last two items are item 1, the most frequent one,
    so no model can rank better than it (the tiny configuration's shapes: 192 users, 10 items, 20 in all)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(192):
        items = [*rng.permutation(np.arange(2, 21))[:6], 1, 1, 1, 1]
        rows += [(u, item, t) for t, item in enumerate(items)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(path, index=False)
    return path


def test_a_model_not_above_popular_is_warned_about_in_the_log_and_under_the_table(tmp_path, capsys):
    events = _popular_wins(tmp_path / "events.csv")
    assert cli.main(["train", "--data", str(events), "--out", str(tmp_path / "run"), *TINY_FLAGS, "--epochs", "1"]) == 0
    out, err = capsys.readouterr()
    assert "| popular | 1.0000 | 1.0000 |" in out
    logged = [line for line in out.splitlines() if line.startswith("warning: the model's test NDCG@10")]
    assert len(logged) == 1 and "not above the popular baseline's (1.0000)" in logged[0]
    assert "budget or the epochs were likely too small" in logged[0] and "--resume continues this run" in logged[0]
    assert logged[0] in err.splitlines()  # and once more under the table (on stderr)
    assert "%|" not in err  # --no-progress: no bar at all


def test_evaluate_prints_a_table_and_json_only_when_asked(cli_run, capsys):
    assert cli.main(["evaluate", str(cli_run.run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | HR@10 |") and "| SASRec (test) |" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    assert cli.main(["evaluate", str(cli_run.run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["users"] == 192


def test_recommend_prints_one_table(cli_run, capsys):
    assert cli.main(["recommend", str(cli_run.run), "--items", "3,4,nope", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["| rank | item | score |", "|---|---|---|"]
    ranks = [line.split(" | ")[0] for line in lines[2:5]]
    assert ranks == ["| 1", "| 2", "| 3"] and lines[5] == "not in the catalogue, skipped: nope" and len(lines) == 6


def test_version_and_every_option_names_its_default(capsys):
    from sasrec_jax import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sasrec-jax {__version__}"
    parser = cli.build_parser()
    for name, command in parser.commands.items():
        if name in ("serve", "export"):  # their options come from sasrec_serve / sasrec_export
            continue
        for action in command._actions:
            has_default = action.default not in (None, False, argparse.SUPPRESS)
            if action.option_strings and has_default and action.dest != "help":
                assert "default" in (action.help or ""), f"{name} {action.option_strings}"
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--log-to LOG_TO" in text and "(default: none;" in text
