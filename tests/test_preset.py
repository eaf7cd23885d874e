"""Presets: what the fields left unset become, how "auto" chooses by data size, and ML-1M's default recipe."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from sasrec_jax import SASRec, cli, config, prepare, train
from sasrec_jax.config import PRESETS, ModelConfig, TrainConfig, choose_preset
from sasrec_jax.errors import ConfigError, SasrecError
from tests.conftest import cycle_frame

# The goal setting's flags, copied from benchmarks/accuracy.py (D128_B64_F512, BLOCKS3_EMA): the ML-1M run that
# reached both goal figures, which `--preset large` (what "auto" picks on ML-1M) must reproduce.
D128_B64_F512 = ["--dim", "128", "--batch-size", "64", "--ffn-dim", "512"]
BLOCKS3_EMA = ["--blocks", "3", "--ema-decay", "0.999"]

FAST = dict(max_len=8, dropout=0.0, warmup_steps=1, epochs=1, progress=False, verbose=False)


def resolved(model: SASRec, df) -> dict:
    """What fit() would train, without training: the preset resolved on `df`'s training split."""
    return model.resolve(df)


def test_small_preset_is_the_config_dataclasses_defaults():
    small, mc, tc = PRESETS["small"], ModelConfig(num_items=1), TrainConfig()
    assert (mc.dim, mc.ffn_dim, mc.num_blocks, mc.dropout) == (small.dim, 0, small.num_blocks, small.dropout)
    assert small.ffn_mult == 1
    assert (tc.batch_size, tc.ema_decay) == (small.batch_size, small.ema_decay)


def test_auto_is_large_on_much_data_wide_on_a_large_catalogue_and_names_are_checked():
    n, v = config.AUTO_LARGE_FROM_TARGETS, config.AUTO_WIDE_FROM_ITEMS
    assert [choose_preset("auto", t) for t in (0, n - 1, n, 10 * n)] == ["small", "small", "large", "large"]
    assert [choose_preset("auto", n - 1, items) for items in (1, v - 1, v, 10 * v)] == [
        "small",
        "small",
        "wide",
        "wide",
    ]
    assert choose_preset("auto", n, 10 * v) == "large"
    wide, small = PRESETS["wide"], PRESETS["small"]
    assert wide == dataclasses.replace(small, dim=4 * small.dim, dropout=0.2)
    assert choose_preset("small", 10 * n) == "small" and choose_preset("large", 0) == "large"
    with pytest.raises(ConfigError, match="preset must be one of"):
        choose_preset("huge", 0)
    with pytest.raises(ConfigError, match="preset must be one of"):
        SASRec(preset="huge")


def test_fields_left_unset_come_from_the_preset_and_given_ones_win(monkeypatch):
    df = cycle_frame(num_users=40)  # 40 users x 10 training items: 360 training targets
    small = SASRec(**FAST)
    assert resolved(small, df) == {"requested": "auto", "used": "small", "training_targets": 360, "items": 20}
    mc, tc = small.model_config, small.train_config
    assert (mc.dim, mc.ffn_dim, mc.num_blocks, tc.batch_size, tc.ema_decay) == (64, 0, 2, 128, 0.0)

    large = SASRec(preset="large", dim=8, **FAST)  # the feed-forward is 4x the given width
    assert resolved(large, df)["used"] == "large"
    mc, tc = large.model_config, large.train_config
    assert (mc.dim, mc.ffn_dim, mc.num_blocks, tc.batch_size, tc.ema_decay) == (8, 32, 3, 64, 0.999)

    given = SASRec(preset="large", dim=8, ffn_dim=0, num_blocks=1, batch_size=16, ema_decay=0.0, **FAST)
    resolved(given, df)
    mc, tc = given.model_config, given.train_config
    assert (mc.dim, mc.ffn_dim, mc.num_blocks, tc.batch_size, tc.ema_decay) == (8, 0, 1, 16, 0.0)

    monkeypatch.setattr(config, "AUTO_LARGE_FROM_TARGETS", 360)
    auto = SASRec(dim=8, **FAST)
    assert resolved(auto, df)["used"] == "large" and auto.model_config.num_blocks == 3


def stop_before_training(*args, **kwargs):
    """Replaces train.fit: config.json is written and the preset logged before training starts."""
    raise SasrecError("stopped before training")


def test_cli_preset_reaches_config_json_and_the_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "fit", stop_before_training)
    csv = tmp_path / "events.csv"
    cycle_frame(num_users=40).to_csv(csv, index=False)
    argv = ["train", "--data", str(csv), "--out", str(tmp_path / "run"), "--preset", "large", "--dim", "8"]
    assert cli.main([*argv, "--max-len", "8", "--epochs", "1", "--batch-size", "16", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "stopped before training" in captured.err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["model"]["dim"], saved["model"]["ffn_dim"], saved["model"]["num_blocks"]) == (8, 32, 3)
    assert (saved["train"]["batch_size"], saved["train"]["ema_decay"]) == (16, 0.999)
    assert saved["data"]["preset"] == {
        "requested": "large",
        "used": "large",
        "training_targets": 360,
        "items": 20,
    }
    line = "preset large: d=8, feed-forward 32, 3 blocks, batch 16, moving average of the weights, decay 0.999"
    assert line in captured.out


def test_ml1m_default_recipe_is_the_goal_setting(data_dir, tmp_path, monkeypatch):
    """`sasrec-jax train` on ML-1M with no capacity flags writes the same configs as the goal setting's flags."""
    monkeypatch.setattr(train, "fit", stop_before_training)
    ml1m = ["train", "--data", str(data_dir / "ml-1m" / "ml-1m.txt.gz"), "--format", "sasrec", "--no-progress"]
    runs = {"default": [], "goal": ["--preset", "small", *D128_B64_F512, *BLOCKS3_EMA]}
    saved = {}
    for name, flags in runs.items():
        assert cli.main([*ml1m, "--out", str(tmp_path / name), *flags]) == 2
        saved[name] = json.loads((tmp_path / name / "config.json").read_text())
    assert saved["default"]["model"] == saved["goal"]["model"]
    assert saved["default"]["train"] == saved["goal"]["train"]
    assert saved["default"]["data"]["preset"]["used"] == "large"
    model = saved["default"]["model"]
    assert (model["dim"], model["ffn_dim"], model["num_blocks"], model["max_len"]) == (128, 512, 3, 200)


def test_the_automatic_window_is_p99_capped_by_the_data_size():
    """The window is the 99th percentile of the training lengths (a multiple of 8, at least 8), capped at 50 below
    the size where `auto` picks `large` and at 200 from there on (docs/defaults.md#window)."""
    n = config.AUTO_LARGE_FROM_TARGETS
    long_tail = np.r_[np.full(98, 60), np.full(2, 440)]  # p99 ~ 440 (MovieLens-100K's shape)
    assert prepare.auto_max_len(long_tail, n - 1) == 50 and prepare.auto_max_len(long_tail, n) == 200
    short = np.r_[np.full(95, 6), np.full(5, 41)]  # retail-shaped: p99 41 -> 48 at any size
    assert prepare.auto_max_len(short, 1_000) == 48 and prepare.auto_max_len(short, 10 * n) == 48
    assert prepare.auto_max_len(np.full(10, 2), 10) == 8
    assert prepare.auto_max_len(long_tail) == 200  # no size given (the prefix protocol): the long cap


def test_ml100k_default_window_is_the_winning_setting(data_dir, tmp_path, monkeypatch):
    """`sasrec-jax train --format ml-100k` with no flags trains the ML-100K defaults study's best window, 50."""
    monkeypatch.setattr(train, "fit", stop_before_training)
    base = ["train", "--data", str(data_dir / "ml-100k"), "--format", "ml-100k", "--no-progress"]
    runs = {"default": [], "chosen": ["--max-len", "50", "--preset", "small"]}
    saved = {}
    for name, flags in runs.items():
        assert cli.main([*base, "--out", str(tmp_path / name), *flags]) == 2
        saved[name] = json.loads((tmp_path / name / "config.json").read_text())
    assert saved["default"]["model"] == saved["chosen"]["model"] and saved["default"]["model"]["max_len"] == 50
    assert saved["default"]["train"] == saved["chosen"]["train"]


def test_a_sparse_retail_log_gets_the_wide_preset_and_a_short_window():
    """The half-size retail-shaped log of the defaults study (20,000 users, 27,873 items, 115,777 targets): "auto"
    resolves to the study's best setting there, `--dim 256 --dropout 0.2` on the small preset, with the p99
    window."""
    from sasrec_jax.retail import generate_retail

    model = SASRec(progress=False, verbose=False)
    decision = resolved(model, generate_retail(n_users=20_000, n_items=31_000))
    assert decision == {"requested": "auto", "used": "wide", "training_targets": 115_777, "items": 27_873}
    mc, tc = model.model_config, model.train_config
    assert (mc.dim, mc.hidden_ffn, mc.num_blocks, mc.max_len, mc.dropout) == (256, 256, 2, 48, 0.2)
    assert (tc.batch_size, tc.ema_decay) == (128, 0.0)
