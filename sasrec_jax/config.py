"""Frozen, validated configuration dataclasses for the model and for training (written as config.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sasrec_jax.errors import ConfigError

LOSSES = ("ce", "bce", "sampled")
NORMS = ("pre", "post")
DTYPES = ("float32", "bfloat16", "float16")
TRAIN_WINDOWS = ("last", "all")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. `num_items` is V: scores have V + 1 columns, column 0 being padding."""

    num_items: int
    max_len: int = 200
    dim: int = 64
    num_heads: int = 1
    num_blocks: int = 2
    ffn_dim: int = 0  # 0 means `dim`, as in the reference SASRec (a d → d → d point-wise FFN)
    dropout: float = 0.1
    norm: str = "pre"  # "pre": x + f(LN(x)); "post": LN(x + f(x)), the original Transformer layout
    activation: str = "relu"
    dtype: str = "float32"  # compute dtype; parameters, softmax, loss and exported graphs stay float32

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
        _check(self.activation in ("relu", "gelu"), f"activation must be relu or gelu, got {self.activation!r}")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def hidden_ffn(self) -> int:
        return self.ffn_dim or self.dim


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and schedule. `negatives=0` picks the loss's default (1 for bce, 256 for sampled)."""

    loss: str = "ce"
    negatives: int = 0
    label_smoothing: float = 0.0
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "cosine"  # after warm-up: "constant", or "cosine" decay ending with `epochs` or `max_minutes`
    clip_norm: float = 1.0
    batch_size: int = 128
    epochs: int = 200
    patience: int = 10
    max_minutes: float = 0.0  # 0 means no time budget
    seed: int = 0
    eval_batch_size: int = 512
    exclude_seen: bool = True
    freeze_embeddings_epochs: int = 0
    # "all": each user's whole history, cut into max_len windows, so every interaction is a training target
    # once; "last": the most recent max_len steps of each user only (the original SASRec)
    train_windows: str = "all"
    # > 1: batches are cut to the narrowest of `length_buckets` widths (max_len, max_len/2, …) that holds their
    # rows, so short sequences skip their padding: faster epochs, but batches of like lengths learn less per
    # epoch (measured: see README), so it is off by default
    length_buckets: int = 1
    # > 0: validate, keep and export an exponential moving average of the weights (Polyak averaging) instead of
    # the raw weights; the average's decay ramps up as min(ema_decay, (1 + t) / (10 + t)) over steps t
    ema_decay: float = 0.0
    # validation ranks a seeded sample of at most this many users (0: all); the same users every epoch
    valid_users: int = 10_000
    # the final evaluation ranks at most this many test users (0: all; with max_minutes, as many as fit the budget)
    test_users: int = 0
    # `last` is saved at least this often (minutes, 0: at epoch ends only), and before every validation
    checkpoint_minutes: float = 10.0

    def __post_init__(self) -> None:
        _check(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        _check(self.negatives >= 0, f"negatives must be >= 0, got {self.negatives}")
        _check(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.schedule in ("constant", "cosine"), f"schedule must be constant or cosine, got {self.schedule!r}")
        _check(self.clip_norm >= 0, f"clip_norm must be >= 0, got {self.clip_norm}")
        _check(self.train_windows in TRAIN_WINDOWS, f"train_windows must be last or all, got {self.train_windows!r}")
        _check(self.length_buckets >= 1, f"length_buckets must be >= 1, got {self.length_buckets}")
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

    @property
    def num_negatives(self) -> int:
        return self.negatives or {"bce": 1, "sampled": 256, "ce": 0}[self.loss]


@dataclass(frozen=True)
class Preset:
    """A named capacity: the values of the fields a user leaves unset (`None`) in the estimator or the CLI."""

    dim: int
    ffn_mult: int  # feed-forward width = ffn_mult * dim (1 is written as ffn_dim=0, which means `dim`)
    num_blocks: int
    batch_size: int
    ema_decay: float


# "small" is the config dataclasses' own defaults. "large" is the best hour measured on MovieLens-1M (d=128, a 4x
# feed-forward, 3 blocks, batch 64, a moving average of the weights); on MovieLens-100K (a tenth of the data) every
# step towards it lost in a 90-second budget. README "Results".
PRESETS = {
    "small": Preset(dim=64, ffn_mult=1, num_blocks=2, batch_size=128, ema_decay=0.0),
    "large": Preset(dim=128, ffn_mult=4, num_blocks=3, batch_size=64, ema_decay=0.999),
}
PRESET_CHOICES = ("auto", *PRESETS)
# "auto" picks "large" from this many training targets on (MovieLens-1M has 981,491, MovieLens-100K 97,171, the
# built-in synthetic sessions 340,806). A judgement between the two measured sizes, not a calibrated threshold.
AUTO_LARGE_FROM_TARGETS = 500_000


def check_preset(preset: str) -> None:
    _check(preset in PRESET_CHOICES, f"preset must be one of {PRESET_CHOICES}, got {preset!r}")


def choose_preset(preset: str, num_targets: int) -> str:
    """The preset `preset` stands for on data with `num_targets` training targets ("auto" decides by size)."""
    check_preset(preset)
    if preset != "auto":
        return preset
    return "large" if num_targets >= AUTO_LARGE_FROM_TARGETS else "small"


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
