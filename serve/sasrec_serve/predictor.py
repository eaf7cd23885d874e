"""The predictor: one verified bundle, one onnxruntime session, raw external item ids in, ranked ids out.

Shapes: N sessions, L = the bundle's max_len, V real items (V + 1 score columns, column 0 is padding), D dim.
Imports numpy, onnxruntime and the stdlib only (no JAX): `pip install 'sasrec-jax[serve]'` is enough.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sasrec_serve import bundle as B
from sasrec_serve import ids, ranking
from sasrec_serve.ids import PAD, IdError, ItemVocab
from sasrec_serve.ranking import Recommendation
from sasrec_serve.shortlist import ShortlistScorer

DEFAULT_MAX_SESSION_ITEMS = 10_000


class InvalidRequest(ValueError):
    """Bad input to the predictor; `field` names the argument (the HTTP layer answers 422 with it)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownItem(InvalidRequest):
    """An item the operation cannot do without (item_similarity) is not in the bundle's catalogue."""


class NoKnownItems(InvalidRequest):
    """The session has no item of the catalogue, and the operation has no fallback (session_embedding)."""


def as_id_list(values, field: str) -> Sequence:
    if isinstance(values, np.ndarray) and values.ndim == 1:
        return values.tolist()
    if not isinstance(values, (list, tuple)):
        raise InvalidRequest(field, f"must be a list of item ids, got {type(values).__name__}")
    return values


def check_k(k) -> int:
    if isinstance(k, np.integer):
        k = int(k)
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise InvalidRequest("k", f"must be a positive integer, got {k!r}")
    return k


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)):
        raise InvalidRequest("temperature", f"must be a number >= 0, got {temperature!r}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest("temperature", f"must be a finite number >= 0, got {temperature!r}")
    return temperature


def session_options(threads: int) -> ort.SessionOptions:
    """Full graph optimisation at load time (~15% faster at batch 1 than without; not saved, as the rewrites may
    be hardware specific), a fixed intra-op pool, no inter-op parallelism; pool threads sleep instead of
    spinning, since concurrent requests already keep the cores busy."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class Predictor:
    """SASRec inference from a bundle. Immutable after `load`, so one instance serves many threads
    (onnxruntime's `InferenceSession.run` is thread-safe); to change models, load a new one and swap."""

    def __init__(self, bundle_dir: Path, manifest: dict, digest: str, threads: int, max_session_items: int):
        self.bundle_dir = bundle_dir
        self.manifest = manifest  # validated by sasrec_serve.bundle.validate_manifest
        self.manifest_sha256 = digest
        self.sha = digest[:16]  # first 16 hex digits of manifest.json's sha256: the model's id in responses
        self.threads = threads
        self.max_session_items = max_session_items
        self.max_len = manifest["max_len"]
        self.num_items = manifest["num_items"]
        self.dim = manifest["dim"]
        try:
            self.vocab = ItemVocab(_read_json(bundle_dir, B.ITEMS), B.ITEMS)
        except IdError as e:
            raise B.BundleError(str(e)) from None
        if self.vocab.size != self.num_items:
            raise B.BundleError(f"{B.ITEMS} has {self.vocab.size} ids, the manifest says {self.num_items}")
        self.item_embeddings = _read_table(bundle_dir, self.num_items, self.dim)
        # The graphs that declare the item table as an initializer (manifest "item_table") take it from the
        # memory-mapped item_embeddings.npy, one buffer shared by every session, instead of each keeping a copy
        # in onnxruntime's memory: the file's checksum was verified above, and export checked that the
        # initializer is the same array.
        shared = manifest.get("item_table") or {}
        self._table_name = shared.get("initializer")
        self._table_graphs = set(shared.get("graphs", ()))
        self._table_value = ort.OrtValue.ortvalue_from_numpy(self.item_embeddings) if self._table_name else None
        self._popular_V1 = self._read_popular()
        # one scores session per window, smallest first (the last is model.onnx at max_len): a request runs
        # the smallest graph its longest session fits, which gives the same scores at a fraction of the cost
        self.windows = B.windows(manifest)
        self._models: list[ort.InferenceSession | None] = [None] * len(self.windows)
        self._encoder = None
        self._lock = threading.Lock()  # guards the sessions created on first use
        # A scores graph still costs ~1× the item table in onnxruntime's memory with the shared table (its
        # matrix product's own transposed copy; measured in benchmarks/predictor_memory.py). With a shortlist
        # (large catalogues), recommendations run encoder → int8 shortlist → exact float32 re-rank, so only
        # those two graphs load here; the scores graphs load on first use (score_items, sampling, normalised
        # scores). Otherwise the scores graphs load here and the encoder on first use. Every graph is run on
        # probe sessions when it loads (see `_probe`).
        self._shortlist = None
        if manifest.get("shortlist"):
            sess = self._plain_session(B.SHORTLIST)
            B.verify_shortlist(sess, manifest)
            self._shortlist = ShortlistScorer(sess, self.item_embeddings)
            cand = self._shortlist.candidates(self._encode(self._probe_sessions(self.max_len)))
            if cand.size and (cand.min() < 0 or cand.max() > self.num_items):
                raise B.BundleError(f"{B.SHORTLIST} gives candidates outside 0..{self.num_items} on probe sessions")
        else:
            for i in range(len(self.windows)):
                self._model(i)

    @classmethod
    def load(cls, bundle_dir: str | Path, threads: int = 1, max_session_items: int = DEFAULT_MAX_SESSION_ITEMS):
        """Checks the manifest's schema and checksums, items.json, popular.json and the item table (finite),
        then creates the onnxruntime sessions that recommendations run (CPU, `threads` intra-op threads each; the
        others on first use, see `loaded_graphs`), checks their declared inputs/outputs and runs each on probe
        sessions (finite outputs). Raises BundleError, naming the file, on any problem."""
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        bundle_dir = Path(bundle_dir)
        try:
            manifest, digest = B.read_manifest_and_digest(bundle_dir)
            B.verify_checksums(bundle_dir, manifest)
            return cls(bundle_dir, manifest, digest, threads, max_session_items)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:  # unreadable or malformed contents
            detail = e.strerror if isinstance(e, OSError) else str(e)[:200]  # an OSError's text holds the path
            raise B.BundleError(f"not a usable bundle: {type(e).__name__}: {detail}") from None

    def _read_popular(self) -> np.ndarray:
        """The fallback ranking [V + 1] from popular.json: log(1 + count), as the estimator ranks popular items;
        -inf for the others."""
        popular = _read_json(self.bundle_dir, B.POPULAR)
        items, counts = (popular.get("items"), popular.get("counts")) if isinstance(popular, dict) else (None, None)
        if not isinstance(items, list) or not isinstance(counts, list) or len(items) != len(counts):
            raise B.BundleError(f'{B.POPULAR} must be {{"items": [...], "counts": [...]}} with lists of one length')
        if not all(_finite_count(c) for c in counts):
            raise B.BundleError(f"{B.POPULAR}: counts must be finite numbers >= 0")
        try:
            idx = self.vocab.indices(items)
        except IdError as e:
            raise B.BundleError(f"{B.POPULAR}: {e}") from None
        return ranking.popular_scores(self.num_items, [(i, c) for i, c in zip(idx, counts) if i != PAD])

    def _plain_session(self, name: str) -> ort.InferenceSession:
        opts = session_options(self.threads)
        if name in self._table_graphs:
            opts.add_initializer(self._table_name, self._table_value)
        try:
            return ort.InferenceSession(str(self.bundle_dir / name), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for invalid graphs
            # its message holds host paths (the graph's, an external data file's): named relative to the bundle
            detail = str(e)
            for d in sorted({str(self.bundle_dir), str(self.bundle_dir.resolve())}, key=len, reverse=True):
                detail = detail.replace(d + "/", "").replace(d, ".")
            raise B.BundleError(f"onnxruntime cannot load {name}: {detail[:300]}") from None

    def _session(self, name: str, window: int | None = None) -> ort.InferenceSession:
        sess = self._plain_session(name)
        B.verify_signature(sess, name, self.manifest, max_len=window)
        self._probe(sess, name, window or self.max_len)
        return sess

    def _probe_sessions(self, length: int) -> np.ndarray:
        """[3, length] probe windows: an empty session, a full one of the first items, a full one of the last."""
        seq_3xL = np.zeros((3, length), np.int32)
        seq_3xL[1] = np.arange(length) % self.num_items + 1
        seq_3xL[2] = self.num_items - np.arange(length) % self.num_items
        return seq_3xL

    def _probe(self, sess: ort.InferenceSession, name: str, length: int) -> None:
        """Runs a graph on the probe sessions, which is also its warm-up (the first run of a session allocates).
        A NaN or infinite output means broken weights: the bundle is refused now, rather than answering every
        request with no items (NaN scores rank nowhere) or a silent 0."""
        out = sess.run([sess.get_outputs()[0].name], {"item_ids": self._probe_sessions(length)})[0]
        if not np.isfinite(out).all():
            raise B.BundleError(f"{name} gives non-finite outputs (NaN or infinity) on probe sessions")

    def load_every_graph(self) -> list[str]:
        """Creates (checks and probes) every graph of the bundle now, also those otherwise loaded on first use
        (what `sasrec_serve.bundle.check_bundle` needs); returns `loaded_graphs`."""
        for i in range(len(self.windows)):
            self._model(i)
        self._encoder_session()
        return self.loaded_graphs

    def __repr__(self) -> str:
        return f"Predictor({str(self.bundle_dir)!r}, model={self.sha}, V={self.num_items}, L={self.max_len})"

    # -- sessions → windows → scores -------------------------------------------------------------------

    def lookup(self, items, field: str = "items") -> tuple[list[int], list]:
        """Item indices (1..V) of a session's known ids in order, and its unknown ids as given; raises
        InvalidRequest (naming `field`) for a non-list, a session over the length limit, None/NaN ids."""
        items = as_id_list(items, field)
        if len(items) > self.max_session_items:
            raise InvalidRequest(field, f"has {len(items)} items, at most {self.max_session_items} are accepted")
        return _split(self.vocab, items, field)

    def _windows(self, sessions, fields: list[str]) -> tuple[np.ndarray, list[list[int]], list[list]]:
        """`ids.windows` of the sessions, each checked by `lookup` and named by its field in errors."""
        return ids.windows(sessions, self.max_len, lambda r, items: self.lookup(items, fields[r]))

    @staticmethod
    def _session_fields(sessions) -> list[str]:
        if not isinstance(sessions, (list, tuple)):
            raise InvalidRequest("sessions", f"must be a list of sessions, got {type(sessions).__name__}")
        return [f"sessions[{r}]" for r in range(len(sessions))]

    def window_for(self, length: int) -> int:
        """The window of the graph that scores sessions of `length` known items (the smallest that fits)."""
        return next((w for w in self.windows if w >= length), self.max_len)

    def _scores(self, seq_NxL: np.ndarray) -> np.ndarray:
        real_L = (seq_NxL != PAD).any(axis=0)
        longest = len(real_L) - int(np.argmax(real_L)) if real_L.any() else 0  # windows are left-padded
        i = self.windows.index(self.window_for(longest))
        return self._model(i).run(["scores"], {"item_ids": seq_NxL[:, self.max_len - self.windows[i] :]})[0]

    def _model(self, i: int) -> ort.InferenceSession:
        """The scores session of window `self.windows[i]`, created on first use."""
        if self._models[i] is None:
            with self._lock:
                if self._models[i] is None:
                    w = self.windows[i]
                    self._models[i] = self._session(B.scores_graph(self.manifest, w), w)
        return self._models[i]

    def _encoder_session(self) -> ort.InferenceSession:
        if self._encoder is None:
            with self._lock:
                if self._encoder is None:
                    self._encoder = self._session(B.ENCODER)
        return self._encoder

    def _encode(self, seq_NxL: np.ndarray) -> np.ndarray:
        return self._encoder_session().run(["session_embedding"], {"item_ids": seq_NxL})[0]

    @property
    def loaded_graphs(self) -> list[str]:
        """The bundle's graphs that have an onnxruntime session in memory now."""
        names = [B.scores_graph(self.manifest, w) for w, m in zip(self.windows, self._models) if m is not None]
        names += [B.ENCODER] if self._encoder is not None else []
        return names + ([B.SHORTLIST] if self._shortlist is not None else [])

    # -- public API ------------------------------------------------------------------------------------

    def recommend(
        self,
        items,
        k: int = 10,
        exclude_seen: bool = True,
        exclude=(),
        temperature: float = 0.0,
        seed: int | None = None,
        normalize: bool = False,
    ) -> Recommendation:
        """Top-k for one session of raw external ids, oldest first. See `recommend_batch`."""
        return self._recommend([items], ["items"], k, exclude_seen, exclude, temperature, seed, normalize)[0]

    def recommend_batch(
        self,
        sessions,
        k: int = 10,
        exclude_seen: bool = True,
        exclude=(),
        temperature: float = 0.0,
        seed: int | None = None,
        normalize: bool = False,
    ) -> list[Recommendation]:
        """Top-k for each session in one onnxruntime call.

        - Sessions longer than L keep their most recent L known items; unknown ids are skipped and reported.
        - A session with no known item gets the bundle's popular items (`fallback=True`), scored log(1 + count).
        - `exclude_seen` drops every known item of the session (also those older than the window); `exclude`
          drops more (unknown ids there are ignored). k beyond what is left returns what is left.
        - `temperature > 0` samples k distinct items from softmax(score / temperature) instead of taking the
          top k (Gumbel top-k); with a `seed`, each session is sampled as `recommend(session, seed=seed)` is.
          Scores stay the model's scores, listed in the sampled order.
        - `normalize` turns scores into softmax probabilities over the items still allowed (the model's share
          of next-item interest; for a fallback, over the popular items).
        - Scores are always finite: an item whose score is NaN or infinite is not recommended, and a session
          with no finite score at all raises BundleError (the model is broken; HTTP 503) rather than returning
          no items.
        """
        fields = self._session_fields(sessions)
        return self._recommend(sessions, fields, k, exclude_seen, exclude, temperature, seed, normalize)

    def _recommend(self, sessions, fields, k, exclude_seen, exclude, temperature, seed, normalize) -> list:
        k = check_k(k)
        temperature = check_temperature(temperature)
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
            raise InvalidRequest("seed", f"must be a non-negative integer or None, got {seed!r}")
        excluded, _ = _split(self.vocab, as_id_list(exclude, "exclude"), "exclude")
        seq_NxL, known, unknown = self._windows(sessions, fields)
        live = np.flatnonzero((seq_NxL != PAD).any(axis=1))
        short = None  # large catalogues: the int8 shortlist path, when it can answer every live session
        if self._shortlist is not None and temperature == 0 and not normalize and len(live):
            short = self._from_shortlist(
                self._shortlist, seq_NxL[live], [known[r] for r in live], excluded, exclude_seen, k
            )
        scores_NxV1 = self._scores(seq_NxL[live]) if len(live) and short is None else None
        row_of = {int(r): j for j, r in enumerate(live)}

        out = []
        for r in range(len(seq_NxL)):
            fallback = r not in row_of
            if short is not None and not fallback:
                idx, picked = short[row_of[r]]
                out.append(Recommendation(tuple(self.vocab.decode(idx)), tuple(picked.tolist()), False,
                                          tuple(unknown[r])))  # fmt: skip
                continue
            if fallback:
                s_V1 = self._popular_V1
            elif scores_NxV1 is not None:  # a live session the shortlist did not answer was scored above
                s_V1 = _finite_scores(scores_NxV1[row_of[r]], fields[r])
            else:
                raise RuntimeError(f"session {r} has neither shortlist nor full scores")  # cannot happen
            rng = np.random.default_rng(seed) if temperature > 0 else None
            drop = [*excluded, *(known[r] if exclude_seen else ())]
            order, picked = ranking.rank(s_V1, k, drop, temperature=temperature, rng=rng, normalize=normalize)
            out.append(Recommendation(tuple(self.vocab.decode(order)), tuple(picked.tolist()), fallback,
                                      tuple(unknown[r])))  # fmt: skip
        return out

    def _from_shortlist(self, shortlist: ShortlistScorer, seq_NxL, known, excluded, exclude_seen, k):
        """Per live session: (item indices, exact scores) of its top k from `shortlist`, or None when
        exclusions (or non-finite scores) leave fewer than k candidates in some session (then every session
        takes the full path)."""
        h_NxD = self._encode(seq_NxL)
        if not np.isfinite(h_NxD).all():
            raise B.BundleError(f"{B.ENCODER} gave a non-finite session embedding")
        cand_NxS = shortlist.candidates(h_NxD)
        out = []
        for h_D, cand_S, seen in zip(h_NxD, cand_NxS, known):
            idx, exact = shortlist.rerank(h_D, cand_S, k, [*excluded, *(seen if exclude_seen else [])])
            finite = np.isfinite(exact)
            if len(idx) < k or not finite.all():
                return None
            out.append((idx, exact.astype(np.float64)))
        return out

    def score_items(self, sessions) -> np.ndarray:
        """Raw model scores [N, V] float32 for each session; column j is item `vocab.ids[j]`. A session without
        known items gets the model's scores for an empty window (no popularity fallback here). Raises
        BundleError if the model gives a NaN or infinite score."""
        fields = self._session_fields(sessions)
        seq_NxL, _, _ = self._windows(sessions, fields)
        scores_NxV = self._scores(seq_NxL)[:, 1:]
        bad = ~np.isfinite(scores_NxV).all(axis=1)
        if bad.any():
            raise B.BundleError(f"the model gave non-finite scores for {fields[int(np.argmax(bad))]}")
        return scores_NxV

    def session_embedding(self, items) -> np.ndarray:
        """The encoder's [D] float32 vector for a session (scores = it · item_embeddings[1:].T)."""
        seq_NxL, known, _ = self._windows([items], ["items"])
        if not known[0]:
            raise NoKnownItems("items", "no item of the session is in the catalogue")
        h_D = self._encode(seq_NxL)[0]
        if not np.isfinite(h_D).all():
            raise B.BundleError(f"{B.ENCODER} gave a non-finite session embedding")
        return h_D

    def item_similarity(self, a, b) -> float:
        """Cosine similarity in [-1, 1] of two items' embeddings; UnknownItem if either is not in the catalogue."""
        vecs = []
        for field, v in (("a", a), ("b", b)):
            idx, _ = _split(self.vocab, [v], field)
            if not idx:
                raise UnknownItem(field, f"item {v!r} is not in the catalogue")
            vecs.append(self.item_embeddings[idx[0]])
        u_2xD = unit_rows(np.stack(vecs))
        return float(np.clip(u_2xD[0] @ u_2xD[1], -1.0, 1.0))


def _read_json(bundle_dir: Path, name: str):
    try:
        raw = (bundle_dir / name).read_bytes()
    except OSError as e:
        raise B.BundleError(f"{name} cannot be read: {e.strerror}") from None
    return B.parse_json(raw, name)


def _read_table(bundle_dir: Path, num_items: int, dim: int) -> np.ndarray:
    """item_embeddings.npy memory-mapped: float32 [V + 1, D], every entry finite (checked in blocks of rows, so
    a 1M-item table needs no second copy in memory)."""
    try:
        table_V1xD = np.load(bundle_dir / B.ITEM_EMBEDDINGS, mmap_mode="r", allow_pickle=False)
    except OSError as e:
        raise B.BundleError(f"{B.ITEM_EMBEDDINGS} cannot be read: {e.strerror}") from None
    except ValueError as e:
        raise B.BundleError(f"{B.ITEM_EMBEDDINGS} is not a numpy array file: {str(e)[:200]}") from None
    if table_V1xD.dtype != np.float32 or table_V1xD.shape != (num_items + 1, dim):
        raise B.BundleError(
            f"{B.ITEM_EMBEDDINGS} is {table_V1xD.dtype} {list(table_V1xD.shape)}, expected float32 "
            f"[{num_items + 1}, {dim}] (V + 1, D)"
        )
    rows = max(1, (1 << 22) // max(dim, 1))  # 16 MB of float32 per block
    for start in range(0, len(table_V1xD), rows):
        if not np.isfinite(table_V1xD[start : start + rows]).all():
            raise B.BundleError(f"{B.ITEM_EMBEDDINGS} holds NaN or infinite values")
    return table_V1xD


def _finite_count(c) -> bool:
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        return False
    try:
        return math.isfinite(float(c)) and c >= 0
    except OverflowError:  # an int beyond float's range
        return False


def _finite_scores(scores_V1: np.ndarray, field: str) -> np.ndarray:
    s_V1 = ranking.finite(scores_V1)
    if s_V1 is None:
        raise B.BundleError(f"the model gave no finite score for {field}")
    return s_V1


def _split(vocab: ItemVocab, values, field: str) -> tuple[list[int], list]:
    """`vocab.split` with a value that is no id reported as InvalidRequest naming `field[j]`."""
    try:
        return vocab.split(values)
    except IdError as e:
        raise InvalidRequest(f"{field}[{e.position}]" if e.position is not None else field, str(e)) from None


def unit_rows(x_NxD: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float64); a zero row stays zero."""
    x_NxD = np.asarray(x_NxD, dtype=np.float64)
    return x_NxD / np.maximum(np.linalg.norm(x_NxD, axis=1, keepdims=True), 1e-12)
