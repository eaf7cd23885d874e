"""Top-k over a large catalogue from an int8 shortlist graph plus an exact float32 re-rank (numpy + onnxruntime).

    scorer = ShortlistScorer(session, item_embeddings)   # session: sasrec_export.shortlist's graph in onnxruntime
    top_NxK = scorer.top_k(h_NxD, k=10)

The graph reads a 64 MB int8 table instead of 256 MB of float32 (1M × 64) and returns S candidates per
session; their exact scores come from the float32 rows (S × D reads from a memory-mapped .npy), so the
result equals the float32 top-k whenever that lies inside the shortlist.
"""

from __future__ import annotations

import numpy as np

from sasrec_serve.ids import PAD


class ShortlistScorer:
    def __init__(self, session, item_embeddings_V1xD: np.ndarray):
        self.session = session
        self.table_V1xD = item_embeddings_V1xD

    def candidates(self, h_NxD: np.ndarray) -> np.ndarray:
        return self.session.run(["candidates"], {"session_embedding": np.asarray(h_NxD, np.float32)})[0]

    def rerank(self, h_D: np.ndarray, cand_S: np.ndarray, k: int, drop=()) -> tuple[np.ndarray, np.ndarray]:
        """The k best of one session's candidates by exact float32 score (best first), after dropping the
        padding row and `drop` (item indices); fewer than k when fewer remain."""
        cand_S = np.sort(cand_S[~np.isin(cand_S, np.asarray([PAD, *drop], np.int64))])  # sorted: sequential mmap reads
        exact_S = self.table_V1xD[cand_S] @ h_D
        kk = min(k, len(cand_S))
        top = np.argpartition(-exact_S, kk - 1)[:kk] if 0 < kk < len(cand_S) else np.arange(kk)
        top = top[np.argsort(-exact_S[top], kind="stable")]
        return cand_S[top], exact_S[top]

    def top_k(self, h_NxD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Item indices [N, k'] (best first) and their exact float32 scores, k' = min(k, S - 1) so that every
        row has as many even when the padding row was among its candidates; padding never appears."""
        h_NxD = np.asarray(h_NxD, np.float32)
        cand_NxS = self.candidates(h_NxD)
        kk = min(k, cand_NxS.shape[1] - 1)
        pairs = [self.rerank(h_D, cand_S, kk) for h_D, cand_S in zip(h_NxD, cand_NxS)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
