"""Data preparation for the estimator: interactions → sequences → split, what the run directory records about
them, and the configuration the data decides (the window, and the preset under "auto")."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sasrec_serve.ids import ItemVocab

from sasrec_jax import data
from sasrec_jax.config import (
    AUTO_LARGE_FROM_TARGETS,
    LONG_WINDOW,
    PRESETS,
    SHORT_WINDOW,
    DataConfig,
    ModelConfig,
    TrainConfig,
    choose_preset,
)
from sasrec_jax.evaluate import item_counts

POPULAR_KEPT = 1000  # the most popular items a run directory records: a loaded model's fallback without its data


def auto_max_len(lengths: np.ndarray, num_targets: int | None = None) -> int:
    """The window: the 99th percentile of sequence lengths rounded up to a multiple of 8, at most the cap for the
    data size (`window_cap`; without `num_targets`, the long cap).

    Short-session data (e-commerce, news) then does not pay for positions it never fills."""
    p99 = float(np.percentile(lengths, 99)) if len(lengths) else 1.0
    cap = LONG_WINDOW if num_targets is None else window_cap(num_targets)
    return int(min(cap, max(8, math.ceil(p99 / 8) * 8)))


def window_cap(num_targets: int) -> int:
    """The longest automatic window: 200 (the reference SASRec's MovieLens-1M window) from AUTO_LARGE_FROM_TARGETS
    training targets on, 50 (its window for sparser data) below. On MovieLens-100K (97,171 targets, p99 440) a
    window of 50 beats 200 in a 5-minute budget and over the same 40 epochs (docs/defaults.md#window)."""
    return LONG_WINDOW if num_targets >= AUTO_LARGE_FROM_TARGETS else SHORT_WINDOW


def training_targets(train: data.SequenceSet) -> int:
    """How many next-item targets the training sequences hold: every item after a sequence's first."""
    return int(np.maximum(train.lengths - 1, 0).sum())


@dataclass(frozen=True)
class Prepared:
    """Interactions made ready for training and evaluation."""

    sequences: data.Sequences
    split: data.Split
    info: dict  # what config.json records under "data" (source, columns, preparation, fingerprint, stats, popular)

    @property
    def vocab(self) -> ItemVocab:
        return self.sequences.vocab


def prepare(df: pd.DataFrame, cfg: DataConfig, columns: dict, source: dict) -> Prepared:
    """Sequences from the interactions (`columns`: user_col, item_col, time_col), split by `cfg.split`."""
    seqs = data.from_interactions(df, **columns, dedupe_consecutive=cfg.dedupe_consecutive, min_len=cfg.min_len)
    return from_sequences(seqs, cfg, columns, source)


def from_sequences(seqs: data.Sequences, cfg: DataConfig, columns: dict, source: dict) -> Prepared:
    split = data.leave_one_out(seqs) if cfg.split == "leave_one_out" else data.time_split(seqs)
    counts = item_counts(split.train, seqs.vocab.size)
    top = np.argsort(-counts, kind="stable")[:POPULAR_KEPT]
    info = {
        "source": source,
        **columns,
        **dataclasses.asdict(cfg),
        "fingerprint": seqs.fingerprint(),
        "stats": seqs.stats(),
        "popular": [[int(i), int(counts[i])] for i in top if counts[i] > 0],
    }
    return Prepared(seqs, split, info)


def configure(
    prepared: Prepared, preset: str, model_kwargs: dict, train_config: TrainConfig, preset_train_fields: tuple
) -> tuple[ModelConfig, TrainConfig, dict]:
    """The model and training configs for this data: the window from the lengths unless given, and the preset's
    values for the fields left unset (`model_kwargs` None values, `preset_train_fields`)."""
    n_targets = training_targets(prepared.split.train)
    name = choose_preset(preset, n_targets, prepared.vocab.size)
    max_len = model_kwargs["max_len"] or auto_max_len(prepared.split.train.lengths, n_targets)
    model_config = ModelConfig(num_items=prepared.vocab.size, **model_values(model_kwargs, name, max_len))
    p = PRESETS[name]
    train_config = dataclasses.replace(train_config, **{k: getattr(p, k) for k in preset_train_fields})
    decision = {"requested": preset, "used": name, "training_targets": n_targets, "items": prepared.vocab.size}
    return model_config, train_config, decision


def model_values(model_kwargs: dict, preset: str, max_len: int) -> dict:
    """ModelConfig fields: the ones given, the rest from `preset`."""
    p, kw = PRESETS[preset], {**model_kwargs, "max_len": max_len}
    kw["dim"] = p.dim if kw["dim"] is None else kw["dim"]
    kw["num_blocks"] = p.num_blocks if kw["num_blocks"] is None else kw["num_blocks"]
    kw["dropout"] = p.dropout if kw["dropout"] is None else kw["dropout"]
    if kw["ffn_dim"] is None:
        kw["ffn_dim"] = 0 if p.ffn_mult == 1 else p.ffn_mult * kw["dim"]
    return kw
