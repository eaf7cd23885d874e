"""The command line end to end on tiny data, its error messages, and an ML-100K smoke run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sasrec_jax import SASRec, checkpoint, cli
from tests.conftest import CLI_RUN_EPOCHS, cycle_frame


def test_train_evaluate_recommend(cli_run, tmp_path, capsys):
    """`sasrec-jax train` (the session's shared run, conftest `cli_run`: other column names and flags that are not
    the defaults), then evaluate, recommend, the refusal to overwrite and --resume (on a copy)."""
    run = cli_run.run
    assert cli_run.code == 0
    assert "| SASRec (test) |" in cli_run.out and "| markov |" in cli_run.out
    for name in ("config.json", "metrics.json", "history.csv"):
        assert (run / name).is_file(), name
    assert checkpoint.has_best(run) and checkpoint.read_state(run)["meta"]["epoch"] == CLI_RUN_EPOCHS
    saved = json.loads((run / "config.json").read_text())
    # every flag given differs from its option's default (conftest TINY_FLAGS): each reached config.json
    assert (saved["model"]["max_len"], saved["model"]["dim"], saved["model"]["num_heads"]) == (8, 16, 2)
    assert (saved["train"]["lr"], saved["train"]["batch_size"], saved["train"]["warmup_steps"]) == (0.01, 32, 5)
    columns = (saved["data"]["user_col"], saved["data"]["item_col"], saved["data"]["time_col"])
    assert columns == ("visitor", "product", "ts")
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"valid", "test", "baselines"} <= set(metrics) and {"popular", "markov"} <= set(metrics["baselines"])
    assert "HR@10" in metrics["test"] and "NDCG@10" in metrics["test"]
    history = (run / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,valid_loss,valid_ndcg@10,valid_hr@10,seconds,step"
    assert len(history) == 1 + CLI_RUN_EPOCHS

    assert cli.main(["evaluate", str(run), "--no-baselines", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == metrics["test"]
    assert cli.main(["evaluate", str(run)]) == 0  # the table train prints, and the sample it ranked
    out = capsys.readouterr().out
    assert "| SASRec (test) |" in out and "| popular |" in out and "test users, validation NDCG@10" in out
    assert f"| SASRec (test) | {metrics['test']['HR@10']:.4f} |" in out

    assert cli.main(["recommend", str(run), "--items", "3,4,5", "-k", "3", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["recommendations"]) == 3 and rec["fallback"] is False and rec["unknown"] == []
    assert all(set(r) == {"item", "score"} for r in rec["recommendations"])
    scores = [r["score"] for r in rec["recommendations"]]
    assert scores == sorted(scores, reverse=True)

    # an existing run is not overwritten silently; --resume continues it
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    args = cli_run.train_args(copy)
    assert cli.main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main([*args, "--resume", "--epochs", str(CLI_RUN_EPOCHS + 1)]) == 0
    assert len((copy / "history.csv").read_text().splitlines()) == 1 + CLI_RUN_EPOCHS + 1


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


@pytest.mark.slow  # a whole MovieLens-100K run (~20 s)
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
    for flag, default in (("--heads HEADS", "1"), ("--lr LR", "0.002"), ("--warmup-steps WARMUP_STEPS", "100"),
                          ("--label-smoothing LABEL_SMOOTHING", "0.0"), ("--epochs EPOCHS", "200")):  # fmt: skip
        help_text = text[text.index(f"{flag} ") :][:200]
        assert f"default: {default})" in help_text.split(" --")[0], flag
    assert "--dim DIM embedding width (default: from --preset)" in text
    assert "--dropout DROPOUT dropout rate (default: from --preset)" in text


def test_a_model_not_above_popular_is_named_a_warning(cli_run, tmp_path, capsys):
    assert cli.main(["evaluate", str(cli_run.run)]) == 0  # a model that learnt: no warning
    assert "warning" not in capsys.readouterr().err
    weak = tmp_path / "weak"
    shutil.copytree(cli_run.run, weak)
    params = SASRec.load(weak).params
    table = np.zeros_like(params["item_embed"]["embedding"])  # every score 0: ties rank the target last
    shutil.rmtree(weak / checkpoint.BEST_DIR)
    shutil.rmtree(weak / checkpoint.CHECKSUMS_DIR)
    checkpoint.save_best(weak, {**params, "item_embed": {"embedding": table}}, {"epoch": 1})
    assert cli.main(["evaluate", str(weak)]) == 0
    err = capsys.readouterr().err
    assert "warning: the model's test NDCG@10 (0.0000) is not above the popular baseline's (0." in err
    assert "--resume continues this run" in err
    assert cli.main(["evaluate", str(weak), "--no-baselines"]) == 0  # no baseline evaluated: nothing to compare with
    assert capsys.readouterr().err == ""
