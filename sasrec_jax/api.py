"""The estimator: `SASRec(...).fit(df)`, recommendations for raw item ids, evaluation, save and load.

A façade: data preparation is `prepare`, training `train`, inference `inference`, evaluation `evaluate`, run
directories `runs`, pre-trained item vectors `pretrained`; this class holds the fitted state and keeps their calls
in order."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
from sasrec_serve import ranking
from sasrec_serve.ids import PAD, IdError, ItemVocab
from sasrec_serve.ranking import Recommendation

from sasrec_jax import checkpoint, data, distributed, inference, logs, prepare, runs
from sasrec_jax.arguments import Params, check_k, check_on_unknown, refuse_unknown, unknown_ids
from sasrec_jax.config import PRESETS, DataConfig, ModelConfig, TrainConfig, check_preset
from sasrec_jax.errors import ConfigError, DataError

if TYPE_CHECKING:
    from flax import nnx

FIT_ARGS = ("init_item_embeddings", "freeze_embeddings_epochs", "run_dir", "resume")
_NOT_FITTED = "this SASRec is not fitted yet: call fit() or SASRec.load()"


class _Fitted(NamedTuple):
    """The fitted state, narrowed: what `SASRec._fitted()` returns."""

    model_config: ModelConfig
    vocab: ItemVocab
    graphdef: nnx.GraphDef
    params: dict


class SASRec(Params):
    """SASRec estimator over raw (user, item, time) interactions.

    `dim`, `num_blocks`, `ffn_dim`, `dropout`, `batch_size` and `ema_decay` left unset come from `preset`:
    "small" (d=64, a d-wide feed-forward, 2 blocks, dropout 0.1, batch 128, raw weights), "wide" ("small" with
    d=256 and dropout 0.2), "large" (d=128, a 4d-wide feed-forward, 3 blocks, batch 64, a moving average of the
    weights with decay 0.999) or "auto" (the default: "large" from 500,000 training targets on; below, "wide"
    from 20,000 items on, else "small"; docs/defaults.md). Arguments given explicitly always win over the
    preset. The other keyword arguments are the fields of `ModelConfig`, `TrainConfig` and `DataConfig`.

    >>> from sasrec_jax import SASRec
    >>> from sasrec_jax.synthetic import generate_sessions
    >>> df = generate_sessions(n_users=500, n_items=200).events
    >>> model = SASRec(dim=32, epochs=2, progress=False, verbose=False).fit(df)
    >>> len(model.recommend([1, 2, 3], k=5))
    5
    """

    def __init__(
        self,
        *,
        preset: str = "auto",
        max_len: int | None = None,
        dim: int | None = None,
        num_heads: int = ModelConfig.num_heads,
        num_blocks: int | None = None,
        ffn_dim: int | None = None,
        dropout: float | None = None,
        norm: str = ModelConfig.norm,
        activation: str = ModelConfig.activation,
        dtype: str = ModelConfig.dtype,
        split: str = DataConfig.split,
        dedupe_consecutive: bool = DataConfig.dedupe_consecutive,
        min_len: int = DataConfig.min_len,
        devices=None,
        progress: bool = True,
        verbose: bool = True,
        random_state: int | None = None,
        **train_kwargs,
    ):
        refuse_unknown(train_kwargs, type(self).param_names(), type(self).__name__)
        if random_state is not None:  # scikit-learn's name for the seed
            if train_kwargs.get("seed", random_state) != random_state:
                raise ConfigError(f"seed={train_kwargs['seed']} and random_state={random_state} disagree: pass one")
            train_kwargs["seed"] = random_state
        if max_len is not None and max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {max_len}")
        check_preset(preset)
        self.preset = preset
        self.data_config = DataConfig(split=split, dedupe_consecutive=dedupe_consecutive, min_len=min_len)
        self.model_kwargs = dict(
            max_len=max_len,
            dim=dim,
            num_heads=num_heads,
            num_blocks=num_blocks,
            ffn_dim=ffn_dim,
            dropout=dropout,
            norm=norm,
            activation=activation,
            dtype=dtype,
        )
        for name in PRESETS if preset == "auto" else (preset,):  # validate early, unset fields from the preset
            ModelConfig(num_items=1, **prepare.model_values(self.model_kwargs, name, max_len or 1))
        # fields the preset fills in at fit(); TrainConfig's own defaults are the "small" preset's
        self._preset_train_fields = tuple(k for k in ("batch_size", "ema_decay") if train_kwargs.get(k) is None)
        self.train_config = TrainConfig(**{k: v for k, v in train_kwargs.items() if k not in self._preset_train_fields})
        self.devices, self.progress, self.verbose = devices, progress, verbose
        # The fitted state is None until it exists, and the public attributes keep that meaning: `model_config`
        # and `vocab` are set by resolve() (fit's first step) and load(), `_graphdef` and `_params` by fit() and
        # load(), `_prepared` by resolve() and set_data() (a loaded model has none until then). The methods read
        # them through the guarded accessors, which raise when a piece is missing and return it narrowed:
        # `_configured()` (model_config, vocab), `_fitted()` (those and the weights), `_data()` (the data).
        self.model_config: ModelConfig | None = None
        self.vocab: ItemVocab | None = None
        self._prepared: prepare.Prepared | None = None
        self.data_info: dict = {}
        self.metrics: dict = {}
        self._history: list = []
        self._graphdef: nnx.GraphDef | None = None
        self._params: dict | None = None
        self._scorer: inference.Scorer | None = None
        self._run_dir: Path | None = None  # a loaded model's directory: its recorded sequences are read on demand

    # -------------------------------------------------------------------------------------------------
    # Training
    # -------------------------------------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        if self.verbose and distributed.is_main():  # one process speaks for a multi-process run
            logs.console()
            logs.info(msg)

    def fit(
        self,
        df: pd.DataFrame,
        *,
        user_col: str = "user_id",
        item_col: str = "item_id",
        time_col: str | None = "timestamp",
        init_item_embeddings=None,
        freeze_embeddings_epochs: int | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
        source: dict | None = None,
    ) -> SASRec:
        """Builds sequences from the interactions, splits them, trains, and keeps the best validation weights.

        With `run_dir`, checkpoints are written there (every `checkpoint_minutes` and before every validation) and
        `resume=True` continues a run, also from inside an epoch."""
        from sasrec_jax import train

        self.resolve(df, user_col=user_col, item_col=item_col, time_col=time_col, source=source)
        if freeze_embeddings_epochs is not None:
            self.train_config = dataclasses.replace(
                self.train_config, freeze_embeddings_epochs=freeze_embeddings_epochs
            )
        self._describe()
        init = None
        if init_item_embeddings is not None:
            from sasrec_jax import pretrained

            mc, vocab = self._configured()
            init = pretrained.initialiser(init_item_embeddings, mc.dim, vocab, self._log)
        if run_dir is not None:
            run_dir = Path(run_dir)
            runs.open_run_dir(run_dir, self._run(), resume, self._log)
        with distributed.lost_peers():  # in a multi-process run, a dead peer is one DistributedError
            result = train.fit(
                self._configured()[0],
                self.train_config,
                self._data().split,
                run_dir=run_dir,
                resume=resume,
                init_params=init,
                devices=self.devices,
                progress=self.progress,
                log=self._log,
            )
        self._graphdef, self._params, self._scorer = result.graphdef, result.params, None
        self._history = result.loop.history
        self.data_info["stopped"] = result.loop.stopped or f"completed {result.loop.epoch} epochs"
        self.data_info["best_epoch"] = result.loop.best_epoch
        self.data_info["train_seconds"] = round(result.loop.seconds, 1)
        self.data_info["eval"] = result.eval_plan
        if run_dir is not None:
            self.save(run_dir)
        return self

    def resolve(
        self,
        df: pd.DataFrame,
        *,
        user_col: str = "user_id",
        item_col: str = "item_id",
        time_col: str | None = "timestamp",
        source: dict | None = None,
    ) -> dict:
        """What `fit` would train on `df`, without training: prepares and splits the data, then sets
        `model_config` and `train_config` (the window from the data, unset fields from the preset). Returns the
        preset decision: {"requested", "used", "training_targets", "items"}."""
        columns = {"user_col": user_col, "item_col": item_col, "time_col": time_col}
        prepared = prepare.prepare(df, self.data_config, columns, source or {"format": "dataframe"})
        self._attach(prepared)
        self.model_config, self.train_config, self.data_info["preset"] = prepare.configure(
            prepared, self.preset, self.model_kwargs, self.train_config, self._preset_train_fields
        )
        return self.data_info["preset"]

    def _describe(self) -> None:
        stats, split = self.data_info["stats"], self._data().split
        mc, tc, preset = self._configured()[0], self.train_config, self.data_info["preset"]
        self._log(
            f"data: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions "
            f"(median length {stats['median_length']:.0f}); split {split.kind}: {len(split.valid):,} "
            f"validation / {len(split.test):,} test users; max_len {mc.max_len}"
        )
        why = (
            f" (auto: {preset['training_targets']:,} training targets, {preset['items']:,} items)"
            if self.preset == "auto"
            else ""
        )
        weights = f"moving average of the weights, decay {tc.ema_decay}" if tc.ema_decay else "raw weights"
        self._log(
            f"preset {preset['used']}{why}: d={mc.dim}, feed-forward {mc.hidden_ffn}, {mc.num_blocks} blocks, "
            f"batch {tc.batch_size}, {weights}, dropout {mc.dropout}"
        )

    @classmethod
    def from_transactions(
        cls, df: pd.DataFrame, *, user_col="user_id", item_col="item_id", time_col="timestamp", **params
    ) -> SASRec:
        """One call: construct with `params` and fit on `df`."""
        fit_kwargs = {k: params.pop(k) for k in list(params) if k in FIT_ARGS}
        return cls(**params).fit(df, user_col=user_col, item_col=item_col, time_col=time_col, **fit_kwargs)

    def _attach(self, prepared: prepare.Prepared) -> None:
        self._prepared, self.vocab = prepared, prepared.vocab
        self.data_info = dict(prepared.info)

    @property
    def sequences(self) -> data.Sequences | None:
        return self._prepared.sequences if self._prepared is not None else None

    @property
    def split(self) -> data.Split | None:
        return self._prepared.split if self._prepared is not None else None

    # -------------------------------------------------------------------------------------------------
    # The fitted model
    # -------------------------------------------------------------------------------------------------

    def _configured(self) -> tuple[ModelConfig, ItemVocab]:
        """`model_config` and `vocab`, or ConfigError before resolve()/fit()/load() set them."""
        if self.model_config is None or self.vocab is None:
            raise ConfigError(_NOT_FITTED)
        return self.model_config, self.vocab

    def _fitted(self) -> _Fitted:
        """The fitted state, or ConfigError before fit()/load()."""
        if self._params is None or self._graphdef is None:
            raise ConfigError(_NOT_FITTED)
        return _Fitted(*self._configured(), self._graphdef, self._params)

    def _data(self) -> prepare.Prepared:
        """The prepared data, or DataError when none is attached (see `_require_data`)."""
        if self._prepared is None:
            raise DataError("no data attached to this SASRec: attach its training data with set_data(df)")
        return self._prepared

    @property
    def params(self) -> dict:
        """The fitted weights (the best validation's) as a nested dict of arrays."""
        return self._fitted().params

    @property
    def module(self):
        """The fitted network as a Flax NNX module in eval mode (no dropout): `module(seq_BxL)` gives scores
        [B, V + 1], `module.encode(seq_BxL)` session embeddings; its blocks' attention can be inspected."""
        from sasrec_jax.model import merge

        fitted = self._fitted()
        module = merge(fitted.graphdef, fitted.params)
        module.eval()
        return module

    def score_windows(self, seq_NxL: np.ndarray) -> np.ndarray:
        """Scores [N, V + 1] (column 0 is padding) of left-padded item-index windows, by the jitted scorer."""
        fitted = self._fitted()
        if self._scorer is None:
            import jax

            from sasrec_jax.train import Placement

            self._scorer = inference.Scorer(fitted.graphdef, fitted.params, Placement.create(jax.local_devices()))
        return self._scorer(np.asarray(seq_NxL, np.int32))

    def windows(self, sessions: Sequence[Iterable]) -> tuple[np.ndarray, list[list]]:
        """Left-padded [N, max_len] item-index windows of sessions of raw ids, and each session's unknown ids."""
        fitted = self._fitted()
        seq_NxL, _, unknown = inference.windows(fitted.vocab, sessions, fitted.model_config.max_len)
        return seq_NxL, unknown

    def score_items(self, sessions: Sequence[Iterable]) -> np.ndarray:
        """Scores [n, V] of every catalogue item (column j is item `vocab.ids[j]`) for each session."""
        seq, _ = self.windows(sessions)
        return self.score_windows(seq)[:, 1:]

    def predict(self, items: Iterable, candidate_ids: Iterable) -> np.ndarray:
        """Scores of the given candidate items for one session; unknown candidates score NaN."""
        candidate_ids = list(candidate_ids)
        scores = self.score_items([items])[0]
        idx = _indices(self._fitted().vocab, candidate_ids)
        return np.where(idx > 0, scores[np.maximum(idx, 1) - 1], np.nan)

    def recommend(
        self,
        items: Iterable,
        k: int = 10,
        *,
        exclude_seen: bool = True,
        exclude: Iterable = (),
        items_to_recommend: Iterable | None = None,
    ) -> Recommendation:
        """Top-k for a session of raw item ids, as the exported predictor gives them: iterating yields `(item_id,
        score)` pairs; `unknown` lists the ids not in the catalogue (skipped) and `fallback` says the session had
        no known item, so the most popular training items (score log(1 + count), not a model score) were returned.
        `items_to_recommend` is an allow-list: only those items are recommended."""
        allow = self._allow_list(items_to_recommend, "raise")
        return self._recommend_many([list(items)], k, exclude_seen, exclude, allow)[0]

    def recommend_users(
        self,
        users: Iterable,
        k: int = 10,
        *,
        filter_viewed: bool = True,
        items_to_recommend: Iterable | None = None,
        on_unknown: str = "warn",
    ) -> pd.DataFrame:
        """Top-k for known users from their whole history, as RecTools' `recommend`: columns user_id, item_id,
        score, rank (from 1). `filter_viewed` leaves out what each user has seen; `items_to_recommend` is an
        allow-list; users (and allowed items) not in the training data are skipped with a warning
        (`on_unknown="warn"`), silently ("skip") or refused ("raise"). Works on a loaded model from its run
        directory alone."""
        check_on_unknown(on_unknown)
        k = check_k(k)
        sequences, vocab = self._require_data().sequences, self._fitted().vocab
        users = list(users)
        pos = pd.Index(sequences.users).get_indexer(pd.Index(users, dtype=object))
        unknown_ids([u for u, p in zip(users, pos) if p < 0], "user", on_unknown)
        keep = [(u, p) for u, p in zip(users, pos) if p >= 0]
        allow = self._allow_list(items_to_recommend, on_unknown)
        rows, block = [], inference.rows_per_block(vocab.size)
        for lo in inference.blocks(len(keep), block, "recommend_users", self.progress):
            part = keep[lo : lo + block]
            sessions = [vocab.decode(sequences.user_items(p)) for _, p in part]
            recs = self._recommend_many(sessions, k, filter_viewed, (), allow)
            rows += [(u, i, s, r + 1) for (u, _), rec in zip(part, recs) for r, (i, s) in enumerate(rec)]
        return pd.DataFrame(rows, columns=["user_id", "item_id", "score", "rank"])

    def recommend_to_items(
        self,
        target_items: Iterable,
        k: int = 10,
        *,
        filter_itself: bool = True,
        items_to_recommend: Iterable | None = None,
        on_unknown: str = "warn",
    ) -> pd.DataFrame:
        """Similar items for each target item, as RecTools' `recommend_to_items`: columns target_item_id, item_id,
        score, rank. The score is the cosine similarity of the two items' embeddings (the rows the model's scores
        are dot products with), so it is symmetric and in [-1, 1]; `filter_itself` leaves out the target."""
        check_on_unknown(on_unknown)
        k = check_k(k)
        fitted = self._fitted()
        targets = list(target_items)
        idx = _indices(fitted.vocab, targets)
        unknown_ids([t for t, i in zip(targets, idx) if i == 0], "item", on_unknown)
        known = [(t, int(i)) for t, i in zip(targets, idx) if i > 0]
        allow = self._allow_list(items_to_recommend, on_unknown)
        table_V1xD = np.asarray(fitted.params["item_embed"]["embedding"], np.float32)
        ranked = inference.similar_items(table_V1xD, [i for _, i in known], k, filter_itself, allow, self.progress)
        rows = [
            (t, j, float(s), r + 1)
            for (t, _), (order, picked) in zip(known, ranked)
            for r, (j, s) in enumerate(zip(fitted.vocab.decode(order), picked))
        ]
        return pd.DataFrame(rows, columns=["target_item_id", "item_id", "score", "rank"])

    def attention(self, items: Iterable) -> tuple[np.ndarray, list]:
        """Attention maps of a session of raw ids: float32 [blocks, heads, n, n] over its n most recent known items
        (at most max_len; row q is how item q spreads its attention over itself and the items before it), and
        those n items' ids, oldest first."""
        import jax.numpy as jnp

        seq_1xL, _ = self.windows([list(items)])
        n = int((seq_1xL[0] != PAD).sum())
        if n == 0:
            raise DataError("no item of the session is in the catalogue: there is nothing to attend to")
        maps = [np.asarray(m[0], np.float32) for m in self.module.attention_weights(jnp.asarray(seq_1xL))]
        return np.stack(maps)[:, :, -n:, -n:], self._fitted().vocab.decode(seq_1xL[0, -n:])

    def _allow_list(self, items: Iterable | None, on_unknown: str) -> np.ndarray | None:
        """The item indices of an allow-list of raw ids (None: every item); unknown ids as `on_unknown` says."""
        if items is None:
            return None
        items = list(items)
        idx = _indices(self._fitted().vocab, items)
        unknown_ids([v for v, i in zip(items, idx) if i == 0], "item in items_to_recommend", on_unknown)
        return idx[idx > 0]

    def _recommend_many(
        self, sessions: list, k: int, exclude_seen: bool, exclude: Iterable, allow: np.ndarray | None = None
    ) -> list:
        k = check_k(k)
        fitted = self._fitted()
        try:
            return inference.recommend(
                self.score_windows,
                fitted.vocab,
                sessions,
                k,
                fitted.model_config.max_len,
                popular_V1=self._popular_scores(),
                exclude_seen=exclude_seen,
                exclude=exclude,
                allow=allow,
            )
        except IdError as e:
            raise DataError(str(e)) from None

    def _popular_scores(self) -> np.ndarray:
        """The fallback ranking: log(1 + training count) of the recorded most popular items."""
        return ranking.popular_scores(self._fitted().vocab.size, self.data_info.get("popular", []))

    @property
    def item_embeddings(self) -> dict:
        """External item id → its float32 embedding vector (the rows the scores are dot products with)."""
        fitted = self._fitted()
        table = np.asarray(fitted.params["item_embed"]["embedding"], dtype=np.float32)
        return dict(zip(fitted.vocab.decode(np.arange(1, fitted.vocab.size + 1)), table[1:]))

    @property
    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self._history, columns=list(runs.HISTORY_COLUMNS))

    # -------------------------------------------------------------------------------------------------
    # Evaluation
    # -------------------------------------------------------------------------------------------------

    def _require_data(self) -> prepare.Prepared:
        """The data of a fitted model. A loaded model with none attached yet takes the sequences its run directory
        recorded, or else re-reads its data source (`reload_data`)."""
        self._fitted()
        if self._prepared is None:
            seqs = None
            if self._run_dir is not None:
                seqs = runs.read_sequences(self._run_dir, self._configured()[1], self.data_info["fingerprint"])
            if seqs is not None:
                self._attach_saved(prepare.from_sequences(seqs, self.data_config, *self._columns_and_source()))
            else:
                self.reload_data()
        return self._data()

    def _columns_and_source(self) -> tuple[dict, dict]:
        info = self.data_info
        return {k: info[k] for k in ("user_col", "item_col", "time_col")}, info["source"]

    def _attach_saved(self, prepared: prepare.Prepared) -> None:
        """Attaches the data of a loaded model, keeping what its run directory recorded about the run."""
        saved = dict(self.data_info)
        self._attach(prepared)
        self.data_info = {**saved, **self.data_info}

    def reload_data(self) -> None:
        """Re-reads the training data recorded in config.json and checks it is the same data (fingerprint)."""
        source = self.data_info.get("source", {})
        if source.get("format") in (None, "dataframe"):
            raise DataError("this model was fitted on an in-memory DataFrame: attach it again with set_data(df)")
        df = data.read_table(source.get("path"), source["format"])
        self.set_data(df, source)

    def set_data(self, df: pd.DataFrame, source: dict | None = None) -> None:
        """Attaches the interactions a loaded model was trained on (needed by evaluate and recommend_users)."""
        columns, saved_source = self._columns_and_source()
        prepared = prepare.prepare(df, self.data_config, columns, source or saved_source)
        if prepared.info["fingerprint"] != self.data_info["fingerprint"]:
            raise DataError(
                f"the data differs from what this model was trained on (fingerprint {prepared.info['fingerprint']} "
                f"!= {self.data_info['fingerprint']})"
            )
        self._attach_saved(prepared)

    def evaluate(
        self,
        *,
        protocol: str = "full",
        which: str = "test",
        baselines: bool = True,
        seed: int = 0,
        test_users: int | None = None,
        valid_users: int | None = None,
    ) -> pd.DataFrame:
        """Metrics on the test (or validation) targets: HR/NDCG/MRR@{1,5,10,20}, coverage@10, and the same
        for the random, popular and Markov baselines under the same protocol, as a tidy DataFrame (columns split,
        model, metric, value; `.pivot_table(index="metric", columns=["split", "model"], values="value")` for a
        table). The nested dict, with the protocol and the sample, is kept in `metrics` (and metrics.json).

        `test_users` / `valid_users` (0: all) rank a seeded sample of that many users; None takes what training
        used: the validation sample (`valid_users`, default 10,000) and, after a `max_minutes` budget, the test
        sample that fitted it. The sample sizes are reported under "sample"."""
        from sasrec_jax import evaluate

        split, mc = self._require_data().split, self._fitted().model_config
        plan = self.data_info.get("eval") or {}
        result = evaluate.evaluate_split(
            self._eval_scorer(),
            split,
            mc,
            self.train_config,
            protocol=protocol,
            which=which,
            baselines=baselines,
            seed=seed,
            test_users=plan.get("test_users", self.train_config.test_users) if test_users is None else test_users,
            valid_users=plan.get("valid_users", self.train_config.valid_users) if valid_users is None else valid_users,
            devices=self.devices,
            progress=self.progress and distributed.is_main(),
            log=self._log,
        )
        self.metrics = result
        return evaluate.tidy(result)

    def _eval_scorer(self):
        """The scorer evaluation ranks with: in a multi-process run, each process scores its block of every batch
        on the global mesh; on one process, the estimator's own."""
        import jax

        if jax.process_count() == 1:
            return self.score_windows
        from sasrec_jax.train import Placement

        fitted = self._fitted()
        return inference.Scorer(fitted.graphdef, fitted.params, Placement.create(self.devices)).sharded

    # -------------------------------------------------------------------------------------------------
    # Persistence
    # -------------------------------------------------------------------------------------------------

    def _run(self) -> runs.Run:
        mc, vocab = self._configured()
        return runs.Run(mc, self.train_config, self.data_info, vocab)

    def save(self, path: str | Path) -> Path:
        """Writes a run directory: config.json, the best weights, history.csv, metrics.json if evaluated."""
        fitted = self._fitted()
        sequences = self._prepared.sequences if self._prepared is not None else None
        return runs.save(Path(path), self._run(), fitted.params, self._history, self.metrics, sequences)

    @classmethod
    def from_run_config(cls, path: str | Path, *, config: dict | None = None, **overrides) -> SASRec:
        """An unfitted estimator with the settings a run directory was trained with (model, training and data
        preparation, from its config.json, or `config` when the caller has read it already), any of them replaced
        by `overrides` (constructor arguments): what `sasrec-jax train --resume` continues with."""
        path = Path(path)
        cfg = checkpoint.read_config(path) if config is None else config
        return cls(**{**runs.settings(path, cfg), **overrides})

    @classmethod
    def load(cls, path: str | Path, *, progress: bool = False, verbose: bool = False) -> SASRec:
        """Rebuilds a fitted estimator from a run directory (best weights), through the training restore path."""
        path = Path(path)
        cfg = checkpoint.read_config(path)
        self = cls.from_run_config(path, config=cfg, progress=progress, verbose=verbose)
        fitted = runs.load(path, cfg)
        self.model_config, self.train_config = fitted.run.model_config, fitted.run.train_config
        self.vocab, self.data_info = fitted.run.vocab, fitted.run.data_info
        self._graphdef, self._params, self._history = fitted.graphdef, fitted.params, fitted.history
        self._run_dir = path
        return self


def _indices(vocab: ItemVocab, ids: list) -> np.ndarray:
    try:
        return vocab.indices(ids)
    except IdError as e:
        raise DataError(str(e)) from None
