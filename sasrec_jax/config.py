"""Frozen, validated configuration dataclasses for the model and for training (written as config.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sasrec_jax.errors import ConfigError

LOSSES = ("ce", "bce", "sampled")
NORMS = ("pre", "post")
DTYPES = ("float32", "bfloat16", "float16")
TRAIN_WINDOWS = ("last", "all")
ACTIVATIONS = ("relu", "gelu")
SCHEDULES = ("constant", "cosine")
SPLITS = ("leave_one_out", "time")
FORMATS = ("sasrec", "csv", "parquet", "ml-100k", "synthetic", "retail")  # what sasrec_jax.data.read_table reads
LOG_TARGETS = ("tensorboard", "csv")  # what --log-to may name (sasrec_jax.loggers writes them)


def option(default, help: str, *, flag: str | None = None, choices=None, auto: str | None = None):
    """A config field that is also a `sasrec-jax train` option (the CLI is generated from these fields): `flag`
    when it is not --field-name, `choices`, and `auto` when leaving it unset lets the data or the preset choose
    (the option then defaults to None and its help names the rule)."""
    meta = {"help": help, "flag": flag, "choices": choices, "auto": auto}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. `num_items` is V: scores have V + 1 columns, column 0 being padding."""

    num_items: int
    max_len: int = option(
        200, "window length", auto="p99 of the training lengths, at most 200 from 500,000 training targets, else 50"
    )
    dim: int = option(64, "embedding width", auto="from --preset")
    num_heads: int = option(1, "attention heads", flag="--heads")
    num_blocks: int = option(2, "transformer blocks", flag="--blocks", auto="from --preset")
    # 0 means `dim`, as in the reference SASRec (a d → d → d point-wise FFN)
    ffn_dim: int = option(0, "feed-forward width (0: --dim)", auto="from --preset")
    dropout: float = option(0.1, "dropout rate", auto="from --preset")
    # "pre": x + f(LN(x)); "post": LN(x + f(x)), the original Transformer layout
    norm: str = option("pre", "layer-norm placement", choices=NORMS)
    activation: str = option("relu", "feed-forward activation", choices=ACTIVATIONS)
    dtype: str = option(
        "float32", "compute dtype (bfloat16 on GPU/TPU); weights, softmax and loss stay float32", choices=DTYPES
    )

    def __post_init__(self) -> None:
        _check(self.num_items >= 1, f"num_items must be >= 1, got {self.num_items}")
        _check(self.max_len >= 1, f"max_len must be >= 1, got {self.max_len}")
        _check(self.dim >= 1, f"dim must be >= 1, got {self.dim}")
        _check(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
        _check(
            self.dim % self.num_heads == 0,
            f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})",
        )
        _check(self.num_blocks >= 0, f"num_blocks must be >= 0, got {self.num_blocks}")
        _check(self.ffn_dim >= 0, f"ffn_dim must be >= 0, got {self.ffn_dim}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        _check(self.activation in ACTIVATIONS, f"activation must be relu or gelu, got {self.activation!r}")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def hidden_ffn(self) -> int:
        return self.ffn_dim or self.dim


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and schedule. `negatives=0` picks the loss's default (1 for bce, 256 for sampled)."""

    loss: str = option("ce", "training loss: full softmax, binary with negatives, or sampled softmax", choices=LOSSES)
    negatives: int = option(0, "negatives for bce (0: 1) / sampled (0: 256)")
    label_smoothing: float = option(0.0, "label smoothing of the ce / sampled loss")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay (not on embeddings, norms and biases)")
    warmup_steps: int = option(100, "linear warm-up steps")
    schedule: str = option(
        "cosine",
        "after warm-up: constant, or cosine decay ending with --epochs or with the --max-minutes budget",
        choices=SCHEDULES,
    )
    clip_norm: float = option(1.0, "gradient clipping by global norm (0: off)")
    batch_size: int = option(128, "sequences per step", auto="from --preset")
    epochs: int = option(200, "at most this many epochs")
    patience: int = option(10, "early stopping patience in epochs (0: off)")
    max_minutes: float = option(0.0, "time budget for training, validation and the final evaluation together (0: none)")
    seed: int = option(0, "seed of initialisation, data order, dropout and user samples")
    eval_batch_size: int = option(512, "users per ranking batch")
    exclude_seen: bool = True  # evaluation never ranks a user's own history (the protocol of the results)
    freeze_embeddings_epochs: int = option(
        0, "keep the item embeddings fixed this many epochs (with --init-embeddings)"
    )
    train_windows: str = option(
        "all",
        "train on all of each user's history cut into max_len windows (every interaction a target once), or on the "
        "last max_len steps only (the original SASRec)",
        choices=TRAIN_WINDOWS,
    )
    # Polyak averaging; the average's decay ramps up as min(ema_decay, (1 + t) / (10 + t)) over steps t
    ema_decay: float = option(
        0.0,
        "validate, keep and export a moving average of the weights with this decay, e.g. 0.999 (0: the raw weights)",
        auto="from --preset",
    )
    valid_users: int = option(10_000, "validate on a seeded sample of this many users, the same every epoch (0: all)")
    test_users: int = option(
        0, "rank at most this many test users in the final evaluation (0: all, or with --max-minutes as many as fit)"
    )
    checkpoint_minutes: float = option(10.0, "save the resume point at least this often, and before every validation")
    log_to: str = option(
        "",
        "also log the training curves as they come, to tensorboard (event files in RUN_DIR/logs/), csv "
        "(RUN_DIR/logs/metrics.csv) or both, comma-separated (default: none; history.csv is always written)",
    )

    def __post_init__(self) -> None:
        _check(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        _check(self.negatives >= 0, f"negatives must be >= 0, got {self.negatives}")
        _check(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.schedule in SCHEDULES, f"schedule must be constant or cosine, got {self.schedule!r}")
        _check(self.clip_norm >= 0, f"clip_norm must be >= 0, got {self.clip_norm}")
        _check(self.train_windows in TRAIN_WINDOWS, f"train_windows must be last or all, got {self.train_windows!r}")
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.patience >= 0, f"patience must be >= 0, got {self.patience}")
        _check(self.max_minutes >= 0, f"max_minutes must be >= 0, got {self.max_minutes}")
        _check(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _check(self.freeze_embeddings_epochs >= 0, "freeze_embeddings_epochs must be >= 0")
        _check(self.valid_users >= 0, f"valid_users must be >= 0 (0: all), got {self.valid_users}")
        _check(self.test_users >= 0, f"test_users must be >= 0 (0: all), got {self.test_users}")
        _check(self.checkpoint_minutes >= 0, f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")
        unknown = [t for t in self.log_targets if t not in LOG_TARGETS]
        _check(not unknown, f"log_to takes {', '.join(LOG_TARGETS)} (comma-separated), got {self.log_to!r}")

    @property
    def num_negatives(self) -> int:
        return self.negatives or {"bce": 1, "sampled": 256, "ce": 0}[self.loss]

    @property
    def log_targets(self) -> tuple[str, ...]:
        """`log_to` as a tuple of targets, e.g. ("tensorboard", "csv")."""
        return tuple(dict.fromkeys(t.strip() for t in self.log_to.split(",") if t.strip()))


@dataclass(frozen=True)
class DataConfig:
    """How interactions become sequences and splits."""

    split: str = option(
        "leave_one_out", "hold out each user's last two items, or the last 10%+10% of time", choices=SPLITS
    )
    dedupe_consecutive: bool = option(False, "drop consecutive repeats of the same item", flag="--dedupe")
    min_len: int = option(1, "drop users with fewer interactions")

    def __post_init__(self) -> None:
        _check(self.split in SPLITS, f"split must be one of {SPLITS}, got {self.split!r}")
        _check(self.min_len >= 1, f"min_len must be >= 1, got {self.min_len}")


def options(cls) -> list[dataclasses.Field]:
    """The fields of a config class that are `sasrec-jax train` options."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


@dataclass(frozen=True)
class Preset:
    """A named capacity: the values of the fields a user leaves unset (`None`) in the estimator or the CLI."""

    dim: int
    ffn_mult: int  # feed-forward width = ffn_mult * dim (1 is written as ffn_dim=0, which means `dim`)
    num_blocks: int
    batch_size: int
    ema_decay: float
    dropout: float


# "small" is the config dataclasses' own defaults. "wide" is "small" with item vectors four times as wide and
# dropout 0.2: on a sparse retail-shaped log (20,000 users, 27,873 items) d=256 lifts test NDCG@10 by 27% over
# "small" in the same 10 epochs (d=128: 14%), and dropout 0.2 helps the wide tables (it loses at d=64); "large"
# gains less there. "large" is the best hour measured on MovieLens-1M (d=128, a 4x feed-forward, 3 blocks, batch
# 64, a moving average of the weights); on MovieLens-100K (a tenth of the data) every step towards it lost.
# docs/defaults.md, docs/RESULTS.md.
PRESETS = {
    "small": Preset(dim=64, ffn_mult=1, num_blocks=2, batch_size=128, ema_decay=0.0, dropout=0.1),
    "wide": Preset(dim=256, ffn_mult=1, num_blocks=2, batch_size=128, ema_decay=0.0, dropout=0.2),
    "large": Preset(dim=128, ffn_mult=4, num_blocks=3, batch_size=64, ema_decay=0.999, dropout=0.1),
}
PRESET_CHOICES = ("auto", *PRESETS)
# "auto" picks "large" from this many training targets on (MovieLens-1M has 981,491, MovieLens-100K 97,171, the
# built-in synthetic sessions 340,806); below it, "wide" from AUTO_WIDE_FROM_ITEMS items in the catalogue on, where
# the item table needs the width (the retail-shaped logs: 27,873 and 55,178 items; MovieLens-100K 1,682, the
# synthetic sessions 5,000), else "small". docs/defaults.md shows the evidence and what is not calibrated.
AUTO_LARGE_FROM_TARGETS = 500_000
AUTO_WIDE_FROM_ITEMS = 20_000

# the automatic window's cap on data from AUTO_LARGE_FROM_TARGETS on, and below (sasrec_jax.prepare.window_cap)
LONG_WINDOW, SHORT_WINDOW = 200, 50


def check_preset(preset: str) -> None:
    _check(preset in PRESET_CHOICES, f"preset must be one of {PRESET_CHOICES}, got {preset!r}")


def choose_preset(preset: str, num_targets: int, num_items: int = 0) -> str:
    """The preset `preset` stands for on data with `num_targets` training targets over `num_items` items ("auto"
    decides by the data: "large" on much data, "wide" on a large catalogue, "small" otherwise)."""
    check_preset(preset)
    if preset != "auto":
        return preset
    if num_targets >= AUTO_LARGE_FROM_TARGETS:
        return "large"
    return "wide" if num_items >= AUTO_WIDE_FROM_ITEMS else "small"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Rebuilds a config, refusing unknown keys (a config.json from an incompatible version)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}: written by an incompatible version?")
    return cls(**d)
