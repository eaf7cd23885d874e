"""The audit's probes of the training side, kept as tests (issue "Hardening", items 2-4 and 6-9): one id policy,
timestamps as pandas gives them, nothing deleted that the library did not write, no non-finite model written or
exported, checksums of checkpoints, one-line errors with exit 2, and kill -9 at several points of a checkpoint
write and of an export. The serving side's probes are in test_serve_hardening.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sasrec_serve import ids as id_policy
from sasrec_serve.ids import IdError

from sasrec_jax import SASRec, checkpoint, cli, data
from sasrec_jax.errors import CheckpointError, DataError, TrainingError
from tests.conftest import TINY_FLAGS, TINY_MODEL, TINY_TRAIN, cycle_frame, tiny_cycle

ROOT = Path(__file__).resolve().parents[1]
# conftest's tiny configuration (its XLA programs are compiled once per session), as flags and as estimator arguments
TINY = [*TINY_FLAGS, "--epochs", "2"]
TINY_FIT = dict(**TINY_MODEL, **TINY_TRAIN, epochs=2, progress=False, verbose=False)


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _csv(tmp_path: Path, df: pd.DataFrame, name="events.csv") -> Path:
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------------------------------------
# 3, 4: one id policy, in the estimator and the predictor
# ---------------------------------------------------------------------------------------------------------


def _with_items(values: list) -> pd.DataFrame:
    df = cycle_frame(num_users=8, num_items=4, length=4)
    col = np.empty(len(df), dtype=object)
    for i in range(len(df)):
        col[i] = values[i % len(values)]
    df["item_id"] = col
    return df


@pytest.mark.parametrize(
    "values, message",
    [
        ([5, "5", 6, 7], r"'item_id' has 8 string ids among integer ids \(e\.g\. '5' at row 1\)"),
        ([1.0, 2.0, 68.5, 3.0], r"'item_id' has \d+ ids with a fraction \(e\.g\. 68\.5"),
        ([[1], [2], [3], [4]], r"'item_id' has 32 values of type list"),
        ([{"a": 1}, {"a": 2}], r"values of type dict"),
        ([True, False], r"values of type bool"),
        ([1 + 2j, 2 + 0j], r"values of type complex"),
        ([2**63, 1, 2, 3], r"'item_id' has \d+ ids outside int64 \(e\.g\. 9223372036854775808"),
        ([b"a", b"b"], r"values of type bytes"),
    ],
)
def test_ids_that_break_the_policy_are_refused_naming_the_column_a_count_and_an_example(values, message):
    df = _with_items(values)
    with pytest.raises(DataError, match=message):
        data.from_interactions(df)
    with pytest.raises(DataError, match=message):
        SASRec(**TINY_FIT).fit(df)


def test_numpy_typed_columns_follow_the_same_policy():
    df = cycle_frame(num_users=8, num_items=4, length=4)
    df["item_id"] = df["item_id"].astype(np.uint64) + np.uint64(2**63)
    with pytest.raises(DataError, match="ids above the int64 maximum"):
        data.from_interactions(df)
    df["item_id"] = cycle_frame(num_users=8, num_items=4, length=4)["item_id"] / 3  # fractions
    with pytest.raises(DataError, match="ids with a fraction"):
        data.from_interactions(df)
    df["item_id"] = [True, False] * (len(df) // 2)
    with pytest.raises(DataError, match="booleans"):
        data.from_interactions(df)
    ok = cycle_frame(num_users=8, num_items=4, length=4)
    ok["item_id"] = ok["item_id"].astype(float)  # whole floats (an int column pandas widened) stay integers
    assert data.from_interactions(ok).vocab.ids.dtype == np.int64


def test_the_estimator_and_the_predictor_refuse_the_same_catalogues():
    """One vocabulary class (sasrec_serve.ids.ItemVocab) for training, run directories and bundles: the same
    catalogues are refused, and queried ids are looked up alike."""
    from sasrec_serve import ids

    assert data.ItemVocab is ids.ItemVocab  # the predictor builds this same class from items.json
    for bad in ([5, "5"], [1, 2, 1], ["a", "a"], [1.5], [True], [[1]], [], [2**63]):
        with pytest.raises(IdError):
            ids.ItemVocab(bad)
    for good in ([1, 2, 3], ["a", "b"], ["007", "7"]):
        assert ids.ItemVocab(good).to_json() == good
    # canonical strings find integers, integers find strings, the rest is unknown (PAD)
    queries = ["7", "007", 7, 7.0, 2**70, "x", 8]
    assert ids.ItemVocab([7, 8]).indices(queries).tolist() == [1, 0, 1, 1, 0, 0, 2]
    assert ids.ItemVocab(["7", "8"]).indices(queries).tolist() == [1, 0, 1, 1, 0, 0, 2]
    assert ids.ItemVocab(["007", "8"]).indices(queries).tolist() == [0, 1, 0, 0, 0, 0, 2]
    with pytest.raises(IdError, match="must be int or str") as e:
        ids.ItemVocab([1]).indices([1, None])
    assert e.value.position == 1
    assert id_policy.lookup_key("+7", True) is None and id_policy.lookup_key("-7", True) == -7


def test_mixed_ids_cannot_reach_a_bundle(tiny_run_dir, tmp_path):
    """The audit's path: 5 and "5" fitted as two items, then a bundle with duplicate ids. Now the fit refuses,
    and a run directory whose config.json lists an id twice is refused by load (hence export)."""
    with pytest.raises(DataError, match="string ids among integer ids"):
        SASRec(**TINY_FIT).fit(_with_items([5, "5", 6, 7]))
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["items"][1] = cfg["items"][0]
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lists 1 ids more than once"):
        SASRec.load(run)


def test_ids_beyond_int64_in_a_csv_are_strings_that_recommend_and_export_can_use(tmp_path, capsys):
    df = tiny_cycle()
    df["item_id"] = df["item_id"].map(lambda i: str(2**63 + i))  # 9223372036854775809 ...
    csv = _csv(tmp_path, df)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(csv), "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    first = str(2**63 + 1)
    assert cli.main(["recommend", str(run), "--items", first, "-k", "3", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    items = [r["item"] for r in rec["recommendations"]]
    assert len(items) == 3 and all(isinstance(i, str) for i in items) and rec["unknown"] == []
    from sasrec_serve.predictor import Predictor

    assert cli.main(["export", str(run), "--out", str(tmp_path / "bundle")]) == 0
    served = Predictor.load(tmp_path / "bundle").recommend([first], k=3)
    assert list(served.items) == items and served.unknown == ()


def test_csv_ids_stay_text_unless_every_one_is_a_canonical_integer(tmp_path):
    rows = pd.DataFrame({"user_id": ["u1"] * 4, "item_id": ["007", "7", "7", "8"], "timestamp": [1, 2, 3, 4]})
    df = data.read_table(_csv(tmp_path, rows), "csv")
    seqs = data.from_interactions(df)
    assert seqs.vocab.to_json() == ["007", "7", "8"]  # "007" and "7" are two items
    ints = data.read_table(_csv(tmp_path, rows.assign(item_id=["1", "-2", "3", "0"]), "b.csv"), "csv")
    assert ints["item_id"].dtype == np.int64 and ints["user_id"].dtype != np.int64


# ---------------------------------------------------------------------------------------------------------
# 3, 8: timestamps as pandas gives them
# ---------------------------------------------------------------------------------------------------------


def _times(values) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [1] * len(values), "item_id": list(range(1, len(values) + 1)), "timestamp": values})


def test_iso_timestamps_with_z_or_offsets_are_accepted_and_normalised_to_utc():
    # the second event is an hour *earlier* in UTC although its local clock reads later: the offset decides
    seqs = data.from_interactions(_times(["2024-01-01T10:00:00Z", "2024-01-01T11:30:00+02:00", "2024-01-01T10:30Z"]))
    assert seqs.vocab.decode(seqs.items) == [2, 1, 3]
    utc = pd.to_datetime(pd.Series(["2024-01-01T09:30:00", "2024-01-01T10:00:00", "2024-01-01T10:30:00"]))
    assert seqs.times.tolist() == sorted(utc.astype("datetime64[ns]").astype(np.int64).tolist())


def test_timezone_aware_columns_from_parquet_are_accepted(tmp_path):
    df = _times(pd.to_datetime(["2024-03-01 12:00", "2024-03-01 11:00", "2024-03-02 00:00"], utc=True))
    df["timestamp"] = df["timestamp"].dt.tz_convert("America/New_York")
    path = tmp_path / "events.parquet"
    df.to_parquet(path)
    seqs = data.from_interactions(data.read_table(path, "parquet"))
    assert seqs.vocab.decode(seqs.items) == [2, 1, 3]
    mixed = [dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc)]
    assert len(data.from_interactions(_times(mixed)).items) == 2


@pytest.mark.parametrize(
    "values, message",
    [
        ([[1], [2]], "values of type list, which are no timestamps"),
        ([{"t": 1}, {"t": 2}], "values of type dict"),
        ([1 + 1j, 2 + 0j], "complex numbers, not timestamps"),
        ([True, False], "booleans, not timestamps"),
        (["2024-01-01T00:00:00Z", "soon"], r"neither numbers nor dates \(e\.g\. 'soon' at row 1\)"),
    ],
)
def test_timestamps_that_are_no_times_are_refused_naming_the_column(values, message):
    with pytest.raises(DataError, match=f"column 'timestamp' .*{message}|{message}"):
        data.from_interactions(_times(values))


# ---------------------------------------------------------------------------------------------------------
# 6, 7, 8: files — nothing deleted that the library did not write, one-line errors
# ---------------------------------------------------------------------------------------------------------


def test_quickstart_and_train_refuse_a_directory_they_did_not_write(fitted_model, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    err = _one_line_exit_2(capsys, ["quickstart", "--out", str(mine), "--no-progress"])
    assert "not a sasrec-jax run directory" in err and (mine / "thesis.tex").read_text() == "years of work"
    csv = _csv(tmp_path, cycle_frame(num_users=32))
    for extra in ([], ["--overwrite"]):
        err = _one_line_exit_2(capsys, ["train", "--data", str(csv), "--out", str(mine), *TINY, *extra])
        assert "left untouched" in err and sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    model = fitted_model  # saving it elsewhere leaves the shared model as it was
    with pytest.raises(CheckpointError, match="left untouched"):
        model.save(mine)
    with pytest.raises(CheckpointError, match="not a sasrec-jax run directory"):
        SASRec(**TINY_FIT).fit(cycle_frame(num_users=32), run_dir=mine)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    # quickstart replaces its own earlier run only; another run needs --overwrite
    other = tmp_path / "other"
    model.save(other)
    err = _one_line_exit_2(capsys, ["quickstart", "--out", str(other), "--no-progress"])
    assert "quickstart did not write" in err and (other / "config.json").is_file()


def test_out_naming_a_file_and_binary_data_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    csv = _csv(tmp_path, cycle_frame(num_users=32))
    err = _one_line_exit_2(capsys, ["train", "--data", str(csv), "--out", str(a_file), *TINY])
    assert "is a file, not a directory" in err and a_file.read_text() == "keep me"
    junk = bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8))
    for name in ("blob.bin", "blob.csv", "blob.parquet", "blob.txt.gz"):
        (tmp_path / name).write_bytes(junk)
        err = _one_line_exit_2(capsys, ["train", "--data", str(tmp_path / name), "--out", str(tmp_path / "r"), *TINY])
        assert str(tmp_path / name) in err
    assert not (tmp_path / "r").exists()


def test_resume_takes_the_data_and_the_settings_from_the_run_directory(cli_run, tmp_path, capsys):
    """A copy of the session's `sasrec-jax train` run (conftest `cli_run`: columns visitor/product/ts, 2 blocks,
    lr 0.01, 2 epochs) resumed with no --data, no column and no model flags."""
    run = tmp_path / "run"
    shutil.copytree(cli_run.run, run)
    # all from config.json; --epochs given here replaces the saved 2
    assert cli.main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 0
    capsys.readouterr()
    cfg = checkpoint.read_config(run)
    assert cfg["model"]["num_blocks"] == 2 and cfg["train"]["lr"] == 0.01 and cfg["train"]["epochs"] == 3
    assert cfg["data"]["source"]["path"] == str(cli_run.csv.resolve()) and cfg["data"]["item_col"] == "product"
    assert (cfg["data"]["user_col"], cfg["data"]["time_col"]) == ("visitor", "ts")
    assert [h["epoch"] for h in SASRec.load(run).history.to_dict("records")] == [1, 2, 3]
    err = _one_line_exit_2(capsys, ["train", "--out", str(run), "--resume", "--dim", "32", "--no-progress"])
    assert "different model config (dim 16 there, 32 here)" in err
    err = _one_line_exit_2(capsys, ["train", "--out", str(tmp_path / "nothing"), "--resume", "--no-progress"])
    assert "holds no run to continue" in err


def test_stale_temporaries_of_killed_writers_are_removed_on_the_next_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    host = socket.gethostname()
    stale = [
        run / f".config.json.tmp-{host}-{dead}-abc123.tmp",
        run / f".history.csv.tmp-{host}-{dead}-x_9.tmp",
        tmp_path / f".run.tmp-{host}-{dead}-k2",  # SASRec.save's directory being assembled
    ]
    for p in stale[:2]:
        p.write_text("half")
    stale[2].mkdir()
    live = run / f".metrics.json.tmp-{host}-{os.getpid()}-zz.tmp"  # this process: still writing
    live.write_text("busy")
    (run / "config.json").write_text("{}")
    (run / "checkpoint").mkdir()  # a run killed before its first checkpoint: rerun in place
    SASRec(**{**TINY_FIT, "epochs": 1}).fit(tiny_cycle(), run_dir=run)
    assert not any(p.exists() for p in stale) and live.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------------------
# 2, 9: no non-finite weights written or exported; checksums of checkpoints
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def fitted_run(tiny_run_dir) -> Path:
    """The session's shared tiny run (conftest): read only, copied where a test edits it."""
    return tiny_run_dir


def _nan_copy(run: Path, dst: Path, monkeypatch) -> Path:
    """A copy of `run` whose best weights hold a NaN, written past the guard (as a bug or a bit flip would)."""
    shutil.copytree(run, dst)
    model = SASRec.load(dst)
    params = {**model.params, "item_embed": {"embedding": np.array(model.params["item_embed"]["embedding"])}}
    params["item_embed"]["embedding"][3, 5] = np.nan
    shutil.rmtree(dst / checkpoint.BEST_DIR)
    shutil.rmtree(dst / checkpoint.CHECKSUMS_DIR)
    monkeypatch.setattr(checkpoint, "_refuse_nonfinite", lambda *a: None)
    checkpoint.save_best(dst, params, {"epoch": 1})
    monkeypatch.undo()
    return dst


def test_non_finite_weights_are_never_checkpointed(fitted_run, tmp_path):
    model = SASRec.load(fitted_run)
    params = {**model.params, "item_embed": {"embedding": np.array(model.params["item_embed"]["embedding"])}}
    params["item_embed"]["embedding"][2, 0] = np.inf
    ckpt = checkpoint.Checkpoints(tmp_path / "r", asynchronous=False)
    with pytest.raises(TrainingError, match=r"NaN or infinity \(item_embed/embedding\) at step 7.*last good"):
        ckpt.save_state(params, {"mu": np.zeros(3)}, {"step": 7})
    with pytest.raises(TrainingError, match="the best weights was not written"):
        ckpt.save_best(7, params, {}, 0.1)
    ckpt.close()
    assert checkpoint.saved_steps(tmp_path / "r" / checkpoint.STATE_DIR) == []
    assert not checkpoint.has_best(tmp_path / "r")
    model._params = params  # fault injection: weights no public path can produce
    with pytest.raises(TrainingError):
        model.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_a_nan_weight_is_not_exported(fitted_run, tmp_path, monkeypatch, capsys):
    bad = _nan_copy(fitted_run, tmp_path / "nan_run", monkeypatch)
    err = _one_line_exit_2(capsys, ["export", str(bad), "--out", str(tmp_path / "bundle")])
    assert "NaN or infinity (item_embed/embedding)" in err and "nothing was exported" in err
    assert not (tmp_path / "bundle").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan_run"]


def test_the_parity_gate_fails_on_nan_outputs():
    from sasrec_export.bundle import ExportError, _check_parity, parity

    class Session:
        def __init__(self, out):
            self.out = out

        def run(self, names, feeds):
            return [self.out]

    ref = np.array([[0.0, 1.0, 2.0], [0.0, 2.0, 1.0]])
    seq = np.array([[1, 2], [2, 1]], np.int32)
    assert parity(Session(ref.astype(np.float32)), ref, seq, "scores", 2)["max_abs_diff"] == 0.0
    for bad in (np.nan, np.inf):
        got = ref.astype(np.float32).copy()
        got[1, 2] = bad
        report = {"model.onnx:optimized": parity(Session(got), ref, seq, "scores", 2)}
        with pytest.raises(ExportError, match="1 outputs are NaN or infinite"):
            _check_parity(report, seq)


def test_a_flipped_bit_in_the_weights_is_caught_by_evaluate_export_and_resume(fitted_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    sums = sorted((run / checkpoint.CHECKSUMS_DIR).glob("*.json"))
    assert {p.name.split("-")[0] for p in sums} == {"state", "best"}
    best = run / checkpoint.BEST_DIR
    step = checkpoint.saved_steps(best)[-1]
    victim = max((p for p in (best / str(step)).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    for argv in (["evaluate", str(run)], ["export", str(run), "--out", str(tmp_path / "b")]):
        err = _one_line_exit_2(capsys, argv)
        assert "is corrupt" in err and "does not match its checksum" in err
    state = run / checkpoint.STATE_DIR
    last = checkpoint.saved_steps(state)[-1]
    (state / str(last) / "meta" / "metadata").write_text('{"step": 999}')
    with pytest.raises(CheckpointError, match=f"state/{last} is corrupt: meta/metadata"):
        checkpoint.read_state(run)


def test_disk_full_before_or_during_a_checkpoint_write_is_one_line_and_the_previous_one_stays(
    cli_run, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(cli_run.run, run)  # `sasrec-jax train` of 2 epochs (conftest), continued here to 3
    resume = ["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]
    before = checkpoint.saved_steps(run / checkpoint.STATE_DIR)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda d: 1000)  # what shutil.disk_usage says on a full disk
    err = _one_line_exit_2(capsys, resume)
    assert "not enough disk space for checkpoint" in err and "MB are free" in err and "--resume" in err
    monkeypatch.undo()

    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def enospc(self, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", enospc)
    err = _one_line_exit_2(capsys, resume)
    assert "not enough disk space" in err and "The previous checkpoint is intact" in err
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    assert checkpoint.saved_steps(run / checkpoint.STATE_DIR) == before
    assert cli.main(resume) == 0  # space again: the run continues from that checkpoint
    assert checkpoint.read_state(run)["meta"]["epoch"] == 3


# ---------------------------------------------------------------------------------------------------------
# Fault injection: kill -9 during a checkpoint write and during an export, at several points
# ---------------------------------------------------------------------------------------------------------

# Deterministic kill points, chosen by KILL_POINT (no sleeps): the Nth call of the hooked function kills the
# process with SIGKILL, before or after the real work.
KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    point, nth = os.environ["KILL_POINT"], int(os.environ.get("KILL_AT", "1"))
    calls = []

    def killing(fn, before=True):
        def wrapper(*args, **kwargs):
            calls.append(1)
            if before and len(calls) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*args, **kwargs)
            if not before and len(calls) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapper

    from sasrec_jax import checkpoint, cli, files
    if point == "orbax-finalize":  # every array file of the save written, not yet renamed into place
        from orbax.checkpoint._src.path import atomicity
        real = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self, *a, **kw):
            calls.append(1)
            if len(calls) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return await real(self, *a, **kw)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    elif point == "checksums":  # a save renamed into place, its checksums not yet written
        checkpoint.record_checksums = killing(checkpoint.record_checksums, before=False)
    elif point == "json-write":  # config.json / history.csv half written to its temporary, not yet renamed
        import tempfile
        from pathlib import Path
        real_write = files.atomic_write_bytes
        def half_write(path, data):
            calls.append(1)
            if len(calls) == nth:
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, _ = tempfile.mkstemp(dir=path.parent, prefix=files.temp_prefix(path.name), suffix=".tmp")
                os.write(fd, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(path, data)
        files.atomic_write_bytes = half_write
    elif point == "export-convert":  # the bundle's graphs half written in its temporary directory
        import sasrec_export.bundle as eb
        eb._convert = killing(eb._convert, before=False)
    elif point == "export-publish":  # verified, about to be moved into place (replacing an older bundle)
        import sasrec_export.bundle as eb
        eb._publish = killing(eb._publish)
    elif point == "export-swap":  # inside the publish: the old bundle moved aside, the new one not yet in place
        import sasrec_export.bundle as eb
        real_publish, real_replace = eb._publish, os.replace
        def publish(tmp, out_dir):
            def replace(src, dst):
                calls.append(1)
                if len(calls) == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_replace(src, dst)
            os.replace = replace
            return real_publish(tmp, out_dir)
        eb._publish = publish
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _run(argv: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-c", KILL_SCRIPT] if env_extra else [sys.executable, "-m", "sasrec_jax"]
    return subprocess.run(cmd + argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _leftovers(*dirs: Path) -> list[str]:
    return [
        str(p)
        for d in dirs
        if d.exists()
        for p in d.rglob("*")
        if ".tmp" in p.name or "orbax-checkpoint-tmp" in p.name or p.name.startswith(".")
    ]


def _weights(run: Path) -> dict:
    return checkpoint.read_state(run)["meta"], SASRec.load(run).params


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_then_resume_equals_an_uninterrupted_run(tmp_path):
    csv = _csv(tmp_path, tiny_cycle())
    base = ["--data", str(csv), *TINY, "--checkpoint-minutes", "1e-9", "--train-windows", "last"]
    whole = _run(["train", "--out", str(tmp_path / "whole"), *base])
    assert whole.returncode == 0, whole.stderr[-2000:]
    meta_whole, params_whole = _weights(tmp_path / "whole")
    for point, nth in (("orbax-finalize", 3), ("checksums", 2), ("json-write", 2)):
        run = tmp_path / point
        killed = _run(["train", "--out", str(run), *base], {"KILL_POINT": point, "KILL_AT": str(nth)})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        resumed = _run(["train", "--out", str(run), "--resume", "--no-progress"])
        assert resumed.returncode == 0, (point, resumed.stderr[-2000:])
        assert _leftovers(run) == [], point  # Orbax's temporaries and ours are gone after the resume
        meta, params = _weights(run)
        untimed = lambda m: [{k: v for k, v in h.items() if k != "seconds"} for h in m["history"]]  # noqa: E731
        assert meta["step"] == meta_whole["step"] and untimed(meta) == untimed(meta_whole), point
        for (path, a), b in zip(_flat(params), [x for _, x in _flat(params_whole)]):
            np.testing.assert_array_equal(a, b, err_msg=f"{point}: {path}")
        for kind in (checkpoint.STATE_DIR, checkpoint.BEST_DIR):
            for step in checkpoint.saved_steps(run / kind):
                assert checkpoint.verify_checksums(run / kind, step), (point, kind, step)


def _flat(tree) -> list:
    import jax

    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.slow
def test_kill_9_during_an_export_leaves_no_partial_bundle_and_the_next_export_is_whole(fitted_run, tmp_path):
    from sasrec_serve.bundle import check_bundle

    bundle = tmp_path / "bundle"
    first = _run(["export", str(fitted_run), "--out", str(bundle)])
    assert first.returncode == 0, first.stderr[-2000:]
    published = json.loads((bundle / "manifest.json").read_text())["files"]
    for point, nth in (("export-convert", 2), ("export-publish", 1), ("export-swap", 2)):
        argv = ["export", str(fitted_run), "--out", str(bundle), "--overwrite"]
        killed = _run(argv, {"KILL_POINT": point, "KILL_AT": str(nth)})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        if point == "export-swap":  # killed between the two renames: no bundle in place (never a partial one)
            assert not bundle.exists()
        else:
            assert check_bundle(bundle)["files"] == published  # the old bundle is untouched, still whole
        assert _leftovers(tmp_path) != []  # the killed export's temporary directory is there ...
        again = _run(["export", str(fitted_run), "--out", str(bundle), "--overwrite"])
        assert again.returncode == 0, again.stderr[-2000:]
        assert "left behind by an export that was interrupted" in again.stdout
        assert _leftovers(tmp_path) == [], point  # ... and gone after the next export
        got = json.loads((bundle / "manifest.json").read_text())["files"]
        assert {k: v["sha256"] for k, v in got.items() if k.endswith((".npy", ".json"))} == {
            k: v["sha256"] for k, v in published.items() if k.endswith((".npy", ".json"))
        }
