"""The estimator: `SASRec(...).fit(df)`, recommendations for raw item ids, evaluation, save and load."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sasrec_serve.ids import IdError, ItemVocab

from sasrec_jax import checkpoint, data, distributed, files
from sasrec_jax.config import PRESETS, ModelConfig, TrainConfig, check_preset, choose_preset, from_dict, to_dict
from sasrec_jax.errors import CheckpointError, ConfigError, DataError

SPLITS = ("leave_one_out", "time")
# one row per validation; "step" tells apart two rows of one epoch (a budget stop inside it, then a resume)
HISTORY_COLUMNS = ("epoch", "train_loss", "valid_ndcg@10", "valid_hr@10", "seconds", "step")
AUTO_MAX_LEN_CAP = 200


def auto_max_len(lengths: np.ndarray) -> int:
    """The window: the 99th percentile of sequence lengths rounded up to a multiple of 8, at most 200.

    Short-session data (e-commerce, news) then does not pay for 200 positions it never fills."""
    p99 = float(np.percentile(lengths, 99)) if len(lengths) else 1.0
    return int(min(AUTO_MAX_LEN_CAP, max(8, math.ceil(p99 / 8) * 8)))


def training_targets(train: data.SequenceSet) -> int:
    """How many next-item targets the training sequences hold: every item after a sequence's first."""
    return int(np.maximum(train.lengths - 1, 0).sum())


class SASRec:
    """SASRec estimator over raw (user, item, time) interactions.

    `dim`, `num_blocks`, `ffn_dim`, `batch_size` and `ema_decay` left unset come from `preset`: "small" (d=64, a
    d-wide feed-forward, 2 blocks, batch 128, raw weights), "large" (d=128, a 4d-wide feed-forward, 3 blocks,
    batch 64, a moving average of the weights with decay 0.999) or "auto" (the default: "large" from 500,000
    training targets on, "small" below). Arguments given explicitly always win over the preset.

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
        num_heads: int = 1,
        num_blocks: int | None = None,
        ffn_dim: int | None = None,
        dropout: float = ModelConfig.dropout,
        norm: str = "pre",
        activation: str = "relu",
        dtype: str = "float32",
        split: str = "leave_one_out",
        dedupe_consecutive: bool = False,
        min_len: int = 1,
        devices=None,
        progress: bool = True,
        verbose: bool = True,
        **train_kwargs,
    ):
        if max_len is not None and max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {max_len}")
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        check_preset(preset)
        self.preset = preset
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
            ModelConfig(num_items=1, **self._model_values(name, max_len or 1))
        # fields the preset fills in at fit(); TrainConfig's own defaults are the "small" preset's
        self._preset_train_fields = tuple(k for k in ("batch_size", "ema_decay") if train_kwargs.get(k) is None)
        self.train_config = TrainConfig(**{k: v for k, v in train_kwargs.items() if k not in self._preset_train_fields})
        self.split_kind, self.dedupe_consecutive, self.min_len = split, dedupe_consecutive, min_len
        self.devices, self.progress, self.verbose = devices, progress, verbose
        self.model_config: ModelConfig | None = None
        self.vocab: data.ItemVocab | None = None
        self.sequences: data.Sequences | None = None
        self.split: data.Split | None = None
        self.data_info: dict = {}
        self.metrics: dict = {}
        self._history: list = []
        self._graphdef = None
        self._params = None
        self._scorer = None

    # -------------------------------------------------------------------------------------------------
    # Training
    # -------------------------------------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        if self.verbose and distributed.is_main():  # one process speaks for a multi-process run
            print(msg, flush=True)

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

        seqs = data.from_interactions(
            df,
            user_col=user_col,
            item_col=item_col,
            time_col=time_col,
            dedupe_consecutive=self.dedupe_consecutive,
            min_len=self.min_len,
        )
        self._set_data(seqs, source or {"format": "dataframe"}, user_col, item_col, time_col)
        preset = self._configure()
        max_len = self.model_config.max_len
        if freeze_embeddings_epochs is not None:
            self.train_config = dataclasses.replace(
                self.train_config, freeze_embeddings_epochs=freeze_embeddings_epochs
            )
        stats = seqs.stats()
        self._log(
            f"data: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions "
            f"(median length {stats['median_length']:.0f}); split {self.split.kind}: {len(self.split.valid):,} "
            f"validation / {len(self.split.test):,} test users; max_len {max_len}"
        )
        mc, tc = self.model_config, self.train_config
        why = f" (auto: {preset['training_targets']:,} training targets)" if self.preset == "auto" else ""
        weights = f"moving average of the weights, decay {tc.ema_decay}" if tc.ema_decay else "raw weights"
        self._log(
            f"preset {preset['used']}{why}: d={mc.dim}, feed-forward {mc.hidden_ffn}, {mc.num_blocks} blocks, "
            f"batch {tc.batch_size}, {weights}"
        )
        init = self._init_embeddings(init_item_embeddings) if init_item_embeddings is not None else None
        if run_dir is not None:
            run_dir = Path(run_dir)
            checkpoint.refuse_foreign(run_dir, "choose a new run_dir")
            if resume:
                self._check_resumable(run_dir)
            elif (run_dir / checkpoint.CONFIG).exists() and not checkpoint.never_saved(run_dir):
                raise CheckpointError(f"{run_dir} already holds a run: pass resume=True to continue it, or remove it")
            distributed.barrier("sasrec_run_dir_checked")  # every process looked before process 0 writes
            if distributed.is_main():
                for p in files.remove_stale(run_dir) + files.remove_stale(run_dir.parent, run_dir.name):
                    self._log(f"removed {p.name}, left behind by a write that was interrupted")
                run_dir.mkdir(parents=True, exist_ok=True)
                files.write_json(run_dir / checkpoint.CONFIG, self._config_json())
            distributed.barrier("sasrec_run_dir_written")
        with distributed.lost_peers():  # in a multi-process run, a dead peer is one DistributedError
            result = train.fit(
                self.model_config,
                self.train_config,
                self.split,
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

    def _model_values(self, preset: str, max_len: int) -> dict:
        """ModelConfig fields: the ones given to the constructor, the rest from `preset`."""
        p, kw = PRESETS[preset], {**self.model_kwargs, "max_len": max_len}
        kw["dim"] = p.dim if kw["dim"] is None else kw["dim"]
        kw["num_blocks"] = p.num_blocks if kw["num_blocks"] is None else kw["num_blocks"]
        if kw["ffn_dim"] is None:
            kw["ffn_dim"] = 0 if p.ffn_mult == 1 else p.ffn_mult * kw["dim"]
        return kw

    def _configure(self) -> dict:
        """Resolves the preset and the window on the split data into `model_config` and `train_config`."""
        n_targets = training_targets(self.split.train)
        name = choose_preset(self.preset, n_targets)
        max_len = self.model_kwargs["max_len"] or auto_max_len(self.split.train.lengths)
        self.model_config = ModelConfig(num_items=self.vocab.size, **self._model_values(name, max_len))
        p = PRESETS[name]
        self.train_config = dataclasses.replace(
            self.train_config, **{k: getattr(p, k) for k in self._preset_train_fields}
        )
        self.data_info["preset"] = {"requested": self.preset, "used": name, "training_targets": n_targets}
        return self.data_info["preset"]

    @classmethod
    def from_transactions(
        cls, df: pd.DataFrame, *, user_col="user_id", item_col="item_id", time_col="timestamp", **params
    ) -> SASRec:
        """One call: construct with `params` and fit on `df`."""
        fit_keys = {"init_item_embeddings", "freeze_embeddings_epochs", "run_dir", "resume"}
        fit_kwargs = {k: params.pop(k) for k in list(params) if k in fit_keys}
        return cls(**params).fit(df, user_col=user_col, item_col=item_col, time_col=time_col, **fit_kwargs)

    def _set_data(self, seqs: data.Sequences, source: dict, user_col, item_col, time_col) -> None:
        self.sequences, self.vocab = seqs, seqs.vocab
        self.split = data.leave_one_out(seqs) if self.split_kind == "leave_one_out" else data.time_split(seqs)
        self.data_info = {
            "source": source,
            "user_col": user_col,
            "item_col": item_col,
            "time_col": time_col,
            "dedupe_consecutive": self.dedupe_consecutive,
            "min_len": self.min_len,
            "split": self.split_kind,
            "fingerprint": seqs.fingerprint(),
            "stats": seqs.stats(),
        }
        counts = self._popularity()
        top = np.argsort(-counts, kind="stable")[:1000]
        self.data_info["popular"] = [[int(i), int(counts[i])] for i in top if counts[i] > 0]

    def _init_embeddings(self, source):
        from sasrec_jax import pretrained

        ids, matrix = pretrained.read_item_vectors(source)
        if matrix.shape[1] != self.model_config.dim:
            raise DataError(
                f"pre-trained item vectors have dimension {matrix.shape[1]}, the model has dim={self.model_config.dim}"
            )

        def apply(params):
            table, counts = pretrained.copy_into_table(params["item_embed"]["embedding"], self.vocab, ids, matrix)
            self._log(
                f"item embeddings: {counts['initialised']:,} from pre-trained vectors, {counts['random']:,} "
                f"initialised randomly, {counts['unknown_ids_ignored']:,} vectors of unknown items ignored"
            )
            return {**params, "item_embed": {"embedding": table}}

        return apply

    def _check_resumable(self, run_dir: Path) -> None:
        saved = checkpoint.read_config(run_dir)
        now = to_dict(self.model_config)
        if saved["model"] != now:
            diff = ", ".join(
                f"{k} {saved['model'].get(k)!r} there, {now.get(k)!r} here"
                for k in sorted(set(saved["model"]) | set(now))
                if saved["model"].get(k) != now.get(k)
            )
            raise CheckpointError(
                f"{run_dir} was trained with a different model config ({diff}); resume it with its own settings "
                "(sasrec-jax train --resume takes them from the run directory)"
            )
        if saved["data"]["fingerprint"] != self.data_info["fingerprint"]:
            raise CheckpointError(f"{run_dir} was trained on different data (fingerprint mismatch); cannot resume")

    # -------------------------------------------------------------------------------------------------
    # Inference
    # -------------------------------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if self._params is None:
            raise ConfigError("this SASRec is not fitted yet: call fit() or SASRec.load()")

    def _score_fn(self):
        if self._scorer is None:
            import jax

            from sasrec_jax.train import merge

            graphdef, cfg = self._graphdef, self.model_config

            @jax.jit
            def scores(params, seq_BxL):
                return merge(graphdef, params)(seq_BxL)

            params = jax.device_put(self._params)

            def run(seq_BxL: np.ndarray) -> np.ndarray:
                n = len(seq_BxL)
                bucket = 1 << max(0, (n - 1).bit_length())  # powers of two: few shapes to compile
                padded = np.zeros((bucket, cfg.max_len), np.int32)
                padded[:n] = seq_BxL
                return np.asarray(scores(params, padded))[:n]

            self._scorer = run
        return self._scorer

    def _eval_scorer(self):
        """The scorer evaluation ranks with: in a multi-process run, each process scores its block of every batch
        on its devices (`train.make_scorer`); on one process, the estimator's own."""
        import jax

        if jax.process_count() == 1:
            return self._score_fn()
        from sasrec_jax import train

        placement = train.Placement.create(self.devices)
        return train.make_scorer(self._graphdef, placement)(placement.replicate(self._params))

    def _windows(self, sessions: Sequence[Iterable]) -> tuple[np.ndarray, list[list]]:
        """Left-padded windows for sessions of raw ids, and the unknown ids of each session."""
        self._require_fitted()
        L = self.model_config.max_len
        seq = np.zeros((len(sessions), L), np.int32)
        unknown = []
        for i, items in enumerate(sessions):
            items = list(items) if not isinstance(items, (str, bytes)) else [items]
            idx = self.vocab.indices(items)
            unknown.append([v for v, j in zip(items, idx) if j == data.PAD])
            idx = idx[idx != data.PAD][-L:]
            if len(idx):
                seq[i, L - len(idx) :] = idx
        return seq, unknown

    def score_items(self, sessions: Sequence[Iterable]) -> np.ndarray:
        """Scores [n, V] of every catalogue item (column j is item `vocab.ids[j]`) for each session."""
        seq, _ = self._windows(sessions)
        return self._score_fn()(seq)[:, 1:]

    def predict(self, items: Iterable, candidate_ids: Iterable) -> np.ndarray:
        """Scores of the given candidate items for one session; unknown candidates score NaN."""
        candidate_ids = list(candidate_ids)
        scores = self.score_items([items])[0]
        idx = self.vocab.indices(candidate_ids)
        return np.where(idx > 0, scores[np.maximum(idx, 1) - 1], np.nan)

    def recommend(self, items: Iterable, k: int = 10, *, exclude_seen: bool = True, exclude: Iterable = ()) -> list:
        """Top-k `(item_id, score)` for a session of raw item ids (unknown ids are ignored; an empty or
        all-unknown session gets the most popular training items)."""
        return self._recommend_many([list(items)], k, exclude_seen, exclude)[0]

    def recommend_users(self, user_ids: Iterable, k: int = 10, *, exclude_seen: bool = True) -> pd.DataFrame:
        """Top-k for known users from their full history: columns user_id, rank, item_id, score."""
        self._require_data("recommend_users")
        user_ids = list(user_ids)
        pos = pd.Index(self.sequences.users).get_indexer(user_ids)
        missing = [u for u, p in zip(user_ids, pos) if p < 0]
        if missing:
            raise DataError(f"unknown user ids: {missing[:10]}")
        sessions = [self.vocab.decode(self.sequences.user_items(p)) for p in pos]
        recs = self._recommend_many(sessions, k, exclude_seen, ())
        rows = [(u, r + 1, i, s) for u, rec in zip(user_ids, recs) for r, (i, s) in enumerate(rec)]
        return pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "score"])

    def _recommend_many(self, sessions: list[list], k: int, exclude_seen: bool, exclude: Iterable) -> list:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        seq, _ = self._windows(sessions)
        scores = self._score_fn()(seq).astype(np.float64)
        scores[:, data.PAD] = -np.inf
        fallback = ~(seq != data.PAD).any(axis=1)
        if fallback.any():
            scores[fallback] = np.log1p(self._popularity())  # empty / all-unknown session: most popular
        excluded = self.vocab.indices(list(exclude))
        scores[:, excluded[excluded > 0]] = -np.inf
        if exclude_seen:
            rows = np.repeat(np.arange(len(seq)), seq.shape[1])
            scores[rows, seq.reshape(-1)] = -np.inf
            scores[:, data.PAD] = -np.inf
        k = min(int(k), self.vocab.size)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out = []
        for r in range(len(seq)):
            order = top[r][np.argsort(-scores[r, top[r]], kind="stable")]
            order = order[np.isfinite(scores[r, order])]
            out.append(list(zip(self.vocab.decode(order), scores[r, order].astype(float).tolist())))
        return out

    def _popularity(self) -> np.ndarray:
        from sasrec_jax.evaluate import item_counts

        if self.split is not None:
            return item_counts(self.split.train, self.vocab.size)
        counts = np.zeros(self.vocab.size + 1)  # a loaded model without its data: the saved top items
        for idx, count in self.data_info.get("popular", []):
            counts[idx] = count
        return counts

    @property
    def item_embeddings(self) -> dict:
        """External item id → its float32 embedding vector (the rows the scores are dot products with)."""
        self._require_fitted()
        table = np.asarray(self._params["item_embed"]["embedding"], dtype=np.float32)
        return dict(zip(self.vocab.decode(np.arange(1, self.vocab.size + 1)), table[1:]))

    @property
    def history(self) -> pd.DataFrame:
        return pd.DataFrame(self._history, columns=list(HISTORY_COLUMNS))

    # -------------------------------------------------------------------------------------------------
    # Evaluation
    # -------------------------------------------------------------------------------------------------

    def _require_data(self, what: str) -> None:
        self._require_fitted()
        if self.sequences is None:
            self.reload_data()

    def reload_data(self) -> None:
        """Re-reads the training data recorded in config.json and checks it is the same data (fingerprint)."""
        source = self.data_info.get("source", {})
        if source.get("format") in (None, "dataframe"):
            raise DataError("this model was fitted on an in-memory DataFrame: attach it again with set_data(df)")
        df = data.read_table(source.get("path"), source["format"])
        self.set_data(df, source)

    def set_data(self, df: pd.DataFrame, source: dict | None = None) -> None:
        """Attaches the interactions a loaded model was trained on (needed by evaluate and recommend_users)."""
        info = self.data_info
        seqs = data.from_interactions(
            df,
            user_col=info["user_col"],
            item_col=info["item_col"],
            time_col=info["time_col"],
            dedupe_consecutive=info["dedupe_consecutive"],
            min_len=info["min_len"],
        )
        if seqs.fingerprint() != info["fingerprint"]:
            raise DataError(
                f"the data differs from what this model was trained on (fingerprint {seqs.fingerprint()} "
                f"!= {info['fingerprint']})"
            )
        saved = dict(info)
        self._set_data(seqs, source or info["source"], info["user_col"], info["item_col"], info["time_col"])
        self.data_info = {**saved, **self.data_info}

    def evaluate(
        self,
        *,
        protocol: str = "full",
        which: str = "test",
        baselines: bool = True,
        seed: int = 0,
        test_users: int | None = None,
        valid_users: int | None = None,
    ) -> dict:
        """Metrics on the test (or validation) targets: HR/NDCG/MRR@{1,5,10,20}, coverage@10, and the same
        for the random, popular and Markov baselines under the same protocol.

        `test_users` / `valid_users` (0: all) rank a seeded sample of that many users; None takes what training
        used: the validation sample (`valid_users`, default 10,000) and, after a `max_minutes` budget, the test
        sample that fitted it. The sample sizes are reported under "sample"."""
        from sasrec_jax import evaluate, train

        self._require_data("evaluate")
        if which not in ("test", "valid"):
            raise ConfigError(f"which must be 'test' or 'valid', got {which!r}")
        plan, tc = self.data_info.get("eval") or {}, self.train_config
        if valid_users is None:
            valid_users = plan.get("valid_users", tc.valid_users)
        if test_users is None:
            test_users = plan.get("test_users", tc.test_users)
        for name, value in (("test_users", test_users), ("valid_users", valid_users)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0 (0: all users), got {value!r}")
        test = self.split.test.take(evaluate.sample_rows(len(self.split.test), test_users, tc.seed))
        valid = self.split.valid.take(evaluate.sample_rows(len(self.split.valid), valid_users, tc.seed))
        windows = test if which == "test" else valid
        V, L = self.vocab.size, self.model_config.max_len
        import jax

        devices = len(self.devices or jax.devices()) if jax.process_count() > 1 else 1
        bs = evaluate.eval_batch_size(V, tc.eval_batch_size, devices)
        progress = self.progress and distributed.is_main()
        kw = dict(protocol=protocol, exclude_seen=tc.exclude_seen, batch_size=bs, seed=seed, progress=progress)
        scorer = self._eval_scorer()
        jobs = [(which, scorer, windows)]
        if which == "test":
            jobs.insert(0, ("valid", scorer, valid))
        if baselines:
            jobs += [(name, fn, windows) for name, fn in evaluate.baselines(self.split.train, V, seed).items()]
        of = len(self.split.test if which == "test" else self.split.valid)
        self._log(
            f"evaluation ({protocol}): {len(windows):,} of {of:,} {which} users"
            + (f", {len(valid):,} validation users" if which == "test" else "")
            + (", with the random, popular and Markov baselines" if baselines else "")
        )
        result, base, started = {}, {}, time.perf_counter()
        with train.memory_errors("evaluation", self.model_config, tc, tc.batch_size), distributed.lost_peers():
            for name, fn, win in jobs:
                summary = evaluate.rank(fn, win, V, L, desc=f"evaluate {name}", **kw).summary(V)
                (result if name in ("valid", "test") else base)[name] = summary
        self._log(f"evaluation took {time.perf_counter() - started:.1f} s")
        if baselines:
            result["baselines"] = base
        result["protocol"] = protocol
        result["sample"] = {
            "seed": tc.seed,
            "valid_users": len(valid),
            "valid_of": len(self.split.valid),
            "test_users": len(test),
            "test_of": len(self.split.test),
        }
        self.metrics = result
        return result

    # -------------------------------------------------------------------------------------------------
    # Persistence
    # -------------------------------------------------------------------------------------------------

    def _config_json(self) -> dict:
        from sasrec_jax import __version__

        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "sasrec_jax_version": __version__,
            "model": to_dict(self.model_config),
            "train": to_dict(self.train_config),
            "data": self.data_info,
            "items": self.vocab.to_json(),
        }

    def save(self, path: str | Path) -> Path:
        """Writes a run directory (config.json, best weights, history.csv, metrics.json if evaluated).

        A new directory is assembled under a temporary name and renamed into place."""
        self._require_fitted()
        path = Path(path)
        checkpoint.refuse_foreign(path, "save to a new directory")
        if distributed.process_count() > 1:  # every process writes its part in place; process 0 the files
            if distributed.is_main():
                path.mkdir(parents=True, exist_ok=True)
            distributed.barrier("sasrec_save_dir")
        if path.exists():
            self._write_run(path)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        files.remove_stale(path.parent, path.name)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=files.temp_prefix(path.name)))
        try:
            self._write_run(tmp)
            tmp.chmod(0o755)  # mkdtemp makes 0700 directories
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _write_run(self, path: Path) -> None:
        if not checkpoint.has_best(path):  # a fitted run has them already; a loaded model saved elsewhere not
            checkpoint.save_best(path, self._params, {"epoch": self.data_info.get("best_epoch", 0)})
        if not distributed.is_main():
            return
        files.write_json(path / checkpoint.CONFIG, self._config_json())
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(HISTORY_COLUMNS)
        for h in self._history:
            writer.writerow([h.get(c, "") for c in HISTORY_COLUMNS])
        files.atomic_write_text(path / "history.csv", buf.getvalue())
        if self.metrics:
            files.write_json(path / "metrics.json", self.metrics)

    @classmethod
    def from_run_config(cls, path: str | Path, *, config: dict | None = None, **overrides) -> SASRec:
        """An unfitted estimator with the settings a run directory was trained with (model, training and data
        preparation, from its config.json, or `config` when the caller has read it already), any of them replaced
        by `overrides` (constructor arguments): what `sasrec-jax train --resume` continues with."""
        path = Path(path)
        cfg = checkpoint.read_config(path) if config is None else config
        try:
            model = {k: v for k, v in to_dict(from_dict(ModelConfig, cfg["model"])).items() if k != "num_items"}
            train = to_dict(from_dict(TrainConfig, cfg["train"]))
            info = cfg["data"]
            prep = {
                "split": info.get("split", "leave_one_out"),
                "dedupe_consecutive": info.get("dedupe_consecutive", False),
                "min_len": info.get("min_len", 1),
            }
        except (KeyError, TypeError, AttributeError, ConfigError) as e:
            raise CheckpointError(f"{path / checkpoint.CONFIG} is missing or has a malformed entry: {e}") from None
        return cls(**{**model, **train, **prep, **overrides})

    @classmethod
    def load(cls, path: str | Path, *, progress: bool = False, verbose: bool = False) -> SASRec:
        """Rebuilds a fitted estimator from a run directory (best weights), through the training restore path."""
        from sasrec_jax import train

        path = Path(path)
        cfg = checkpoint.read_config(path)
        self = cls.from_run_config(path, config=cfg, progress=progress, verbose=verbose)
        model_cfg, train_cfg = from_dict(ModelConfig, cfg["model"]), from_dict(TrainConfig, cfg["train"])
        self.model_config, self.train_config = model_cfg, train_cfg
        info, items = cfg["data"], cfg.get("items")
        try:
            self.vocab = ItemVocab(items, f"{path / checkpoint.CONFIG}: items")
        except IdError as e:
            raise CheckpointError(str(e)) from None
        if self.vocab.size != model_cfg.num_items:
            raise CheckpointError(
                f"{path}: {self.vocab.size} items in config.json but the model has {model_cfg.num_items}"
            )
        self.data_info = info
        self._graphdef, target = train.init_model(model_cfg, 0)
        self._params = checkpoint.load_best(path, target)
        hist = path / "history.csv"
        if hist.is_file():
            self._history = pd.read_csv(hist).to_dict("records")
        return self
