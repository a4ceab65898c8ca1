"""Search with DupMAE's joint representation: score = dense dot + sparse dot.

- exact: for corpora whose sparse matrix fits in memory: query batches times the dense matrix plus query batches
  times the sparse (CSR) matrix, then top-k.
- pooled: for large corpora: FAISS retrieves a candidate pool by the dense part, which is re-scored exactly
  with the sparse part (the top-k is exact whenever every true top-k document is in the pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retromae.retrieval.encoder import EncodeConfig


@dataclass
class HybridVectors:
    dense: np.ndarray  # (N, d) float32
    sparse: "object"  # scipy.sparse.csr_matrix (N, V) float32


class HybridEncoder:
    """Encodes texts into DupMAE's [W h ; top-k mu] with length-sorted batches (no sharding yet)."""

    def __init__(self, model: str | None, cfg: EncodeConfig | None = None, device=None, representation=None,
                 tokenizer=None):
        """`model`: an exported folder (or pkg:MODULE) to load; or None with a loaded `representation` and its
        `tokenizer` (e.g. a model in training)."""
        from transformers import AutoTokenizer

        from retromae.modeling import resolve_model_path
        from retromae.objectives.dupmae import DupMAERepresentation

        self.cfg = cfg or EncodeConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = resolve_model_path(model) if isinstance(model, str) else None
        self.rep = representation if representation is not None else DupMAERepresentation.load(path, self.device)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)

    @torch.inference_mode()
    def encode(self, texts: list[str], kind: str = "passage") -> HybridVectors:
        from scipy.sparse import csr_matrix

        max_len = self.cfg.query_max_len if kind == "query" else self.cfg.passage_max_len
        prefix = self.cfg.query_prefix if kind == "query" else self.cfg.passage_prefix
        order = np.argsort([-len(t) for t in texts], kind="stable")
        dense = np.zeros((len(texts), self.rep.cfg.dense_dim), dtype=np.float32)
        k = min(self.rep.cfg.topk, self.rep.vocab_size)
        values = np.zeros((len(texts), k), dtype=np.float32)
        ids = np.zeros((len(texts), k), dtype=np.int64)
        for start in range(0, len(texts), self.cfg.batch_size):
            rows = order[start : start + self.cfg.batch_size]
            features = self.tokenizer([prefix + texts[i] for i in rows], truncation=True, max_length=max_len,
                                      padding=True, return_tensors="pt").to(self.device)
            d, v, i = self.rep(features["input_ids"], features["attention_mask"])
            dense[rows], values[rows], ids[rows] = d.cpu().numpy(), v.cpu().numpy(), i.cpu().numpy()
        indptr = np.arange(0, len(texts) * k + 1, k)
        sparse = csr_matrix((values.ravel(), ids.ravel(), indptr), shape=(len(texts), self.rep.vocab_size))
        sparse.eliminate_zeros()
        return HybridVectors(dense, sparse)


def joint_scores(queries: HybridVectors, docs: HybridVectors, rows: slice) -> np.ndarray:
    """(len(rows), N) dense dot + sparse dot for a slice of the queries."""
    dense = queries.dense[rows] @ docs.dense.T
    sparse = (queries.sparse[rows] @ docs.sparse.T).toarray()
    return dense + sparse


def exact_search(queries: HybridVectors, docs: HybridVectors, k: int, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(scores, document positions), each (Q, k), best first."""
    k = min(k, docs.dense.shape[0])
    all_scores, all_positions = [], []
    for start in range(0, queries.dense.shape[0], batch):
        scores = joint_scores(queries, docs, slice(start, start + batch))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, 1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        all_positions.append(np.take_along_axis(top, order, 1))
        all_scores.append(np.take_along_axis(top_scores, order, 1))
    return np.concatenate(all_scores), np.concatenate(all_positions)


def pooled_search(queries: HybridVectors, docs: HybridVectors, k: int, pool: int = 1000, index_factory: str = "Flat",
                  use_gpu="auto") -> tuple[np.ndarray, np.ndarray]:
    """Dense FAISS retrieval of `pool` candidates per query, re-scored with dense + sparse; (scores, positions)."""
    from retromae.retrieval.index import DenseIndex

    index = DenseIndex(docs.dense.shape[1], index_factory, use_gpu)
    index.add(docs.dense, [str(i) for i in range(docs.dense.shape[0])])
    _, hits = index.search(queries.dense, max(pool, k))
    k = min(k, docs.dense.shape[0])
    scores_out = np.zeros((len(hits), k), dtype=np.float32)
    positions_out = np.zeros((len(hits), k), dtype=np.int64)
    for q, row in enumerate(hits):
        candidates = np.array([int(h) for h in row])
        scores = queries.dense[q] @ docs.dense[candidates].T + (queries.sparse[q] @ docs.sparse[candidates].T).toarray()[0]
        order = np.argsort(-scores, kind="stable")[:k]
        scores_out[q, : len(order)], positions_out[q, : len(order)] = scores[order], candidates[order]
    return scores_out, positions_out
