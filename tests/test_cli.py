"""The command line end to end on tiny data, its error messages, and an ML-100K smoke run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sasrec_jax import checkpoint, cli
from tests.conftest import cycle_frame

TINY = [
    "--max-len",
    "8",
    "--dim",
    "16",
    "--heads",
    "2",
    "--blocks",
    "1",
    "--dropout",
    "0",
    "--lr",
    "0.01",
    "--batch-size",
    "32",
    "--warmup-steps",
    "5",
    "--no-progress",
]


def test_train_evaluate_recommend(tmp_path, capsys):
    csv = tmp_path / "events.csv"
    df = cycle_frame().rename(columns={"user_id": "visitor", "item_id": "product", "timestamp": "ts"})
    df.to_csv(csv, index=False)
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(csv),
        "--user-col",
        "visitor",
        "--item-col",
        "product",
        "--time-col",
        "ts",
        "--out",
        str(run),
        "--epochs",
        "6",
        "--train-windows",
        "last",  # not the default
        "--clip-norm",
        "2.0",  # not the default either
        "--ema-decay",
        "0.9",
        *TINY,
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "| SASRec (test) |" in out and "| markov |" in out
    for name in ("config.json", "metrics.json", "history.csv"):
        assert (run / name).is_file(), name
    assert checkpoint.has_best(run) and checkpoint.read_state(run)["meta"]["epoch"] >= 1
    train_cfg = json.loads((run / "config.json").read_text())["train"]
    assert train_cfg["train_windows"] == "last" and train_cfg["clip_norm"] == 2.0
    assert train_cfg["ema_decay"] == 0.9
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"valid", "test", "baselines"} <= set(metrics) and {"popular", "markov"} <= set(metrics["baselines"])
    assert "HR@10" in metrics["test"] and "NDCG@10" in metrics["test"]
    history = (run / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,valid_ndcg@10,valid_hr@10,seconds,step" and len(history) == 7

    assert cli.main(["evaluate", str(run), "--no-baselines", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == metrics["test"]
    assert cli.main(["evaluate", str(run)]) == 0  # the table train prints, and the sample it ranked
    out = capsys.readouterr().out
    assert "| SASRec (test) |" in out and "| popular |" in out and "test users, validation NDCG@10" in out
    assert f"| SASRec (test) | {metrics['test']['HR@10']:.4f} |" in out

    assert cli.main(["recommend", str(run), "--items", "3,4,5", "-k", "3"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["recommendations"]) == 3 and rec["fallback"] is False and rec["unknown"] == []
    assert all(set(r) == {"item", "score"} for r in rec["recommendations"])
    scores = [r["score"] for r in rec["recommendations"]]
    assert scores == sorted(scores, reverse=True)

    # an existing run is not overwritten silently; --resume continues it
    assert cli.main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main([*args[: -len(TINY)], *TINY, "--resume", "--epochs", "7"]) == 0
    assert len((run / "history.csv").read_text().splitlines()) == 8


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "{csv}", "--out", "{out}", "--item-col", "movie"], "column 'movie' not found"),
        (["train", "--data", "{csv}", "--out", "{out}", "--max-len", "0"], "max_len must be >= 1"),
        (["train", "--data", "{csv}", "--out", "{out}", "--dim", "10", "--heads", "3"], "divisible by num_heads"),
        (["train", "--data", "{empty}", "--out", "{out}"], "empty"),
        (["evaluate", "{out}/nothing"], "run directory not found"),
        (["recommend", "{csv}", "--items", "1"], "run directory not found"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    csv, empty = tmp_path / "x.csv", tmp_path / "empty.csv"
    cycle_frame(num_users=8).to_csv(csv, index=False)
    empty.write_text("")
    argv = [a.format(csv=csv, empty=empty, out=tmp_path / "out") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sasrec_jax.cli", "evaluate", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: run directory not found") and "Traceback" not in proc.stderr


def test_ml100k_smoke(data_dir, tmp_path, capsys):
    run = tmp_path / "ml100k"
    argv = [
        "train",
        "--format",
        "ml-100k",
        "--data",
        str(data_dir / "ml-100k"),
        "--out",
        str(run),
        "--max-len",
        "50",
        "--dim",
        "32",
        "--epochs",
        "3",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["users"] == 943
    assert metrics["test"]["NDCG@10"] > metrics["baselines"]["random"]["NDCG@10"]


def test_version_and_help_name_every_default(capsys):
    from sasrec_jax import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sasrec-jax {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--heads HEADS", "1"), ("--lr LR", "0.002"), ("--dropout DROPOUT", "0.1"),
                          ("--label-smoothing LABEL_SMOOTHING", "0.0"), ("--epochs EPOCHS", "200")):  # fmt: skip
        help_text = text[text.index(f"{flag} ") :][:200]
        assert f"default: {default})" in help_text.split(" --")[0], flag
    assert "--dim DIM embedding width (default: from --preset)" in text


def test_a_model_not_above_popular_is_named_a_warning(capsys):
    metrics = {"test": {"NDCG@10": 0.016}, "baselines": {"popular": {"NDCG@10": 0.040}}}
    cli._warn_if_weak(metrics)
    err = capsys.readouterr().err
    assert "warning: the model's test NDCG@10 (0.0160) is not above the popular baseline's (0.0400)" in err
    cli._warn_if_weak({"test": {"NDCG@10": 0.05}, "baselines": {"popular": {"NDCG@10": 0.04}}})
    cli._warn_if_weak({"test": {"NDCG@10": 0.01}})  # no baselines evaluated: nothing to compare with
    assert capsys.readouterr().err == ""
