"""Search with DupMAE's joint representation: score = dense dot + sparse dot.

- exact: for corpora whose sparse matrix fits in memory: query batches times the dense matrix plus query batches
  times the sparse (CSR) matrix, then top-k.
- pooled: for large corpora: FAISS retrieves a candidate pool by the dense part; the documents whose sparse
  score could lift them into the top-k are added; all are re-scored exactly (with a Flat index the top-k is
  exact, see `pooled_search`).
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

        from retromae.modeling import from_pretrained, resolve_model_path
        from retromae.objectives.dupmae import DupMAERepresentation
        from retromae.sentence_config import EncoderSettings, default_max_length, read_settings

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = resolve_model_path(model) if isinstance(model, str) else None
        self.rep = representation if representation is not None else DupMAERepresentation.load(path, self.device)
        self.tokenizer = tokenizer or from_pretrained(AutoTokenizer, path, "model")
        declared = read_settings(path) if path else EncoderSettings()
        self.cfg = (cfg or EncodeConfig()).resolve(declared, default_max_length(self.tokenizer, self.rep.mlm.config))

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
    """(len(rows), N) dense dot + sparse dot for a slice of the queries.

    In float64, as `pooled_search` computes them: a float32 matrix product and a float32 matrix-vector product sum
    in different orders, and near-ties would rank differently on the two paths."""
    dense = queries.dense[rows].astype(np.float64) @ docs.dense.T.astype(np.float64)
    sparse = (queries.sparse[rows] @ docs.sparse.T).toarray()
    return dense + sparse


def exact_search(queries: HybridVectors, docs: HybridVectors, k: int, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(scores, document positions), each (Q, k), best first; ties by position, as `pooled_search` and the merge
    of shards (`merge_top_k`) order them, so that the top-k does not depend on the path or on the corpus's split.
    (A partition alone kept any of the documents tied at the k-th place.)"""
    from retromae.retrieval.sparse import top_k_rows

    k = min(k, docs.dense.shape[0])
    found = [top_k_rows(joint_scores(queries, docs, slice(start, start + batch)), k)
             for start in range(0, queries.dense.shape[0], batch)]
    return np.concatenate([s for s, _ in found]), np.concatenate([p for _, p in found])


def pooled_search(queries: HybridVectors, docs: HybridVectors, k: int, pool: int = 1000, index_factory: str = "Flat",
                  use_gpu="auto", batch: int = 64, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense FAISS retrieval of `pool` candidates per query, completed by a bound, re-scored with dense + sparse.

    A document outside the dense pool scores at most `floor + sparse(d)`, where `floor` is the pool's lowest dense
    score. So every document whose sparse score could lift it above the pool's k-th joint score is added and
    scored exactly: with an exact index ("Flat") the top-k equals `exact_search`'s, whatever the model (a pool
    of dense candidates alone misses documents that win on their sparse part). The sparse scores come from one
    sparse product per query batch (only documents sharing a vocabulary entry with the query have any), so no
    (queries x corpus) dense matrix is ever built. A query whose pool is too shallow for even a zero sparse
    score to be bounded (k-th joint score <= floor) is scored against the whole corpus, and so is one for which an
    approximate index returns fewer than k candidates. `stats`, if given, receives the number of documents added
    by the bound and of queries scored in full.
    """
    from retromae.retrieval.index import DenseIndex

    index = DenseIndex(docs.dense.shape[1], index_factory, use_gpu)
    index.add(docs.dense, [str(i) for i in range(docs.dense.shape[0])])
    pool_scores, hits = index.search(queries.dense, max(pool, k))
    n_docs = docs.dense.shape[0]
    k = min(k, n_docs)
    scores_out = np.zeros((len(hits), k), dtype=np.float32)
    positions_out = np.zeros((len(hits), k), dtype=np.int64)
    added = full = 0
    for start in range(0, len(hits), batch):
        sparse_rows = (queries.sparse[start : start + batch] @ docs.sparse.T).tocsr()
        for offset in range(sparse_rows.shape[0]):
            q = start + offset
            sparse = sparse_rows[offset]
            candidates = np.array([int(h) for h in hits[q]], dtype=np.int64)
            if len(candidates) < k:  # an approximate index found fewer than k: no k-th score to bound with
                candidates = np.arange(n_docs)
                full += 1
            elif len(candidates) < n_docs:
                joint = _joint(queries, docs, q, candidates, sparse)
                kth = np.partition(joint, len(joint) - k)[len(joint) - k]
                floor = float(pool_scores[q, len(candidates) - 1])
                # float32 (or fp16 on GPUs) search scores: a margin keeps borderline documents in rather than out
                margin = 1e-3 * max(abs(kth), 1.0)
                if kth <= floor + margin:  # documents sharing no vocabulary entry with the query could beat the pool
                    candidates = np.arange(n_docs)
                    full += 1
                else:
                    lifted = sparse.indices[sparse.data + floor >= kth - margin]
                    extra = np.setdiff1d(lifted, candidates, assume_unique=False)
                    added += len(extra)
                    candidates = np.concatenate([candidates, extra])
            joint = _joint(queries, docs, q, candidates, sparse)
            order = np.lexsort((candidates, -joint))[:k]
            scores_out[q, : len(order)], positions_out[q, : len(order)] = joint[order], candidates[order]
    if stats is not None:
        stats.update(added_by_bound=added, queries_scored_in_full=full)
    return scores_out, positions_out


def _joint(queries: HybridVectors, docs: HybridVectors, q: int, candidates: np.ndarray, sparse_row) -> np.ndarray:
    """Exact dense + sparse scores of one query against some documents (`sparse_row`: its (1, N) sparse scores)."""
    dense = queries.dense[q].astype(np.float64) @ docs.dense[candidates].T.astype(np.float64)
    return dense + sparse_row[:, candidates].toarray()[0]
