"""Learned sparse retrieval (methods.md §4): SPLADE vectors, an exact sparse search, Seismic, sparsity reports and
the fusion of several runs.

- **The representation** (`SpladeRepresentation`): w_j = max_i log(1 + ReLU(S_ij)) over the attended positions i
  ([CLS] / [SEP] included, as sentence-transformers' SpladePooling does), S the MLM head's logits. log(1 + ReLU(.))
  is monotone, so the max is taken on the logits first (`max_pooled_logits`, a bounded block of positions at a time:
  the (B, L, V) logits never exist at once) and transformed after: the same value, and the same gradient (only the
  argmax position of each term receives one).
- **Exact search** (`ExactSparseIndex`): the corpus shard's CSR matrix transposed once into an inverted index (term ->
  postings, `docs.T` in CSR), each block of queries times each block of it as a sparse product (SpGEMM), top-k per
  block and an exact merge. Only documents sharing a term with the query are retrieved (as an inverted index does);
  ties go to the lower position, as in `merge_top_k`, so the merge does not depend on the blocks.
- **Seismic** (`SeismicSearch`, pyseismic-lsr): the approximate index built for learned sparse vectors (Bruch et al.,
  SIGIR 2024); its candidates are re-scored exactly from the CSR rows (Seismic stores values as f16).
- Under `accelerate launch`, every process encodes its share of the corpus and of the queries, searches every query
  against its own corpus shard and the shards' top-k are merged into the exact top-k (`evaluate._gather_results`), as
  the dense search is.

Written here rather than taken from sentence-transformers' SparseEncoder: evaluation needs the corpus sharded over
processes, sparse matrices kept compact (SparseEncoder.encode returns torch sparse COO tensors of the whole corpus)
and an exact search against which Seismic's recall can be measured; the vectors are the same (a test compares them).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retromae.architectures import encoder_of
from retromae.config import ConfigError

logger = logging.getLogger(__name__)

# Scores held at once by the exact search's dense blocks (query rows x documents): 2^25 float32 = 128 MB.
SCORE_BUDGET = 1 << 25


# ----- the representation ------------------------------------------------------------------------------------


def splade_from_pooled(pooled_logits: torch.Tensor) -> torch.Tensor:
    """log(1 + ReLU(mu)) of max-pooled logits: SPLADE's weights (monotone, so pooling first changes nothing)."""
    return torch.log1p(torch.relu(pooled_logits))


def splade_vectors(head: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, V) fp32 SPLADE-max vectors from final hidden states: max over every attended position ([CLS], [SEP]
    included) of log(1 + ReLU(head(hidden))), computed a bounded block of positions at a time."""
    from retromae.objectives.base import max_pooled_logits

    positions = attention_mask.bool()
    return splade_from_pooled(max_pooled_logits(head, hidden, positions)).nan_to_num(0.0, neginf=0.0)


class SpladeRepresentation(nn.Module):
    """A masked-LM model read as SPLADE: forward(input_ids, attention_mask) -> (B, V) fp32 weights."""

    def __init__(self, mlm_model: nn.Module):
        super().__init__()
        self.mlm = mlm_model
        self.arch = encoder_of(mlm_model)

    @property
    def config(self):
        return self.mlm.config

    @property
    def vocab_size(self) -> int:
        return self.arch.head.vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.arch.forward(input_ids, attention_mask)
        return splade_vectors(self.arch.head, hidden, attention_mask)

    @classmethod
    def load(cls, model_dir: str, device=None) -> "SpladeRepresentation":
        """A model folder with its MLM head: a SPLADE export (the whole masked-LM model), or a pretrained export
        whose head is in pretraining/heads.safetensors (loaded), or any masked-LM checkpoint."""
        import safetensors.torch
        from transformers import AutoConfig, AutoModelForMaskedLM

        from retromae.architectures import attention_for
        from retromae.modeling import from_pretrained, heads_path, quiet_loading
        from retromae.objectives.dupmae import load_head_state

        config = from_pretrained(AutoConfig, model_dir, "--model")
        with quiet_loading():
            mlm = from_pretrained(AutoModelForMaskedLM, model_dir, "--model", dtype=torch.float32,
                                  attn_implementation=attention_for(config))
        if Path(heads_path(model_dir)).is_file():
            load_head_state(mlm, safetensors.torch.load_file(heads_path(model_dir)), "encoder.")
        return cls(mlm).eval().to(device or "cpu")


# ----- encoding ----------------------------------------------------------------------------------------------


def to_csr(vectors: torch.Tensor):
    """(B, V) weights (zeros dropped) as a scipy CSR matrix, float32 values, int32 term ids."""
    from scipy.sparse import csr_matrix

    rows, cols = vectors.nonzero(as_tuple=True)
    values = vectors[rows, cols].float().cpu().numpy()
    counts = torch.bincount(rows, minlength=vectors.shape[0]).cpu().numpy()
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return csr_matrix((values, cols.cpu().numpy().astype(np.int32), indptr), shape=tuple(vectors.shape))


class SparseTextEncoder:
    """Queries and passages to SPLADE vectors (scipy CSR), with the model's own lengths and prompts (as
    `SparseEncoder(path).encode_query / encode_document` use them), length-sorted batches, `inference_mode`."""

    def __init__(self, model, cfg=None, device=None, tokenizer=None):
        """`model`: a folder / pkg:MODULE to load, or a loaded `SpladeRepresentation` with its `tokenizer` (a model
        in training)."""
        from transformers import AutoTokenizer

        from retromae.hardware import resolve_precision
        from retromae.modeling import from_pretrained, resolve_model_path
        from retromae.retrieval.encoder import EncodeConfig
        from retromae.sentence_config import EncoderSettings, default_max_length, read_settings

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg = cfg or EncodeConfig()
        path = resolve_model_path(model) if isinstance(model, str) else None
        self.rep = model if isinstance(model, nn.Module) else SpladeRepresentation.load(path, self.device)
        self.tokenizer = tokenizer or from_pretrained(AutoTokenizer, path, "--model")
        declared = read_settings(path) if path and Path(path).is_dir() else EncoderSettings()
        self.cfg = cfg.resolve(declared, default_max_length(self.tokenizer, self.rep.config))
        self.precision = resolve_precision(self.cfg.precision, self.device.type)
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def vocab_size(self) -> int:
        return self.rep.vocab_size

    def settings(self) -> dict:
        c = self.cfg
        return {"representation": "splade", "precision": self.precision, "query_max_len": c.query_max_len,
                "passage_max_len": c.passage_max_len, "query_prefix": c.query_prefix,
                "passage_prefix": c.passage_prefix, "batch_size": c.batch_size, "device": str(self.device)}

    @torch.inference_mode()
    def encode(self, texts, kind: str = "passage"):
        """(len(texts), V) CSR matrix, rows in the order of `texts`."""
        from scipy.sparse import vstack

        max_len = self.cfg.query_max_len if kind == "query" else self.cfg.passage_max_len
        prefix = self.cfg.query_prefix if kind == "query" else self.cfg.passage_prefix
        texts = [texts[i] for i in range(len(texts))]
        order = np.argsort([-len(t) for t in texts], kind="stable")
        blocks, rows_done = [], []
        for start in range(0, len(texts), self.cfg.batch_size):
            rows = order[start : start + self.cfg.batch_size]
            features = self.tokenizer([prefix + texts[i] for i in rows], truncation=True, max_length=max_len,
                                      padding=True, return_tensors="pt").to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                enabled=self.autocast is not None):
                vectors = self.rep(features["input_ids"], features["attention_mask"])
            blocks.append(to_csr(vectors.float()))
            rows_done.append(rows)
        if not blocks:
            from scipy.sparse import csr_matrix

            return csr_matrix((0, self.vocab_size), dtype=np.float32)
        stacked = vstack(blocks, format="csr")
        inverse = np.empty(len(texts), dtype=np.int64)
        inverse[np.concatenate(rows_done)] = np.arange(len(texts))
        return stacked[inverse]

    def top_terms(self, vector, k: int = 10) -> list[list]:
        """The k highest-weighted (token, weight) pairs of one CSR row: what a sparse model matches on."""
        order = np.argsort(-vector.data, kind="stable")[:k]
        tokens = self.tokenizer.convert_ids_to_tokens([int(i) for i in vector.indices[order]])
        return [[t, round(float(w), 4)] for t, w in zip(tokens, vector.data[order])]


def mean_nonzeros(matrix) -> float:
    return float(matrix.getnnz() / max(1, matrix.shape[0]))


# ----- search ------------------------------------------------------------------------------------------------


@dataclass
class SparseSearchConfig:
    index: str = "exact"  # exact (sparse products over an inverted index) | seismic (approximate, pyseismic-lsr)
    n_postings: int = 3500  # seismic: postings kept per term on average (the highest-weighted)
    centroid_fraction: float = 0.1  # seismic: blocks per posting list, as a share of its postings
    summary_energy: float = 0.4  # seismic: share of a block summary's L1 mass kept
    max_fraction: float = 1.5  # seismic: a list keeps at most max_fraction x n_postings postings
    query_cut: int = 10  # seismic: the query's highest-weighted terms visited
    heap_factor: float = 0.8  # seismic: a block is skipped when its summary score < heap_factor x the k-th score
    threads: int = 0  # seismic: search threads (0: all cores)
    top_terms_queries: int = 3  # the evaluation report lists the top-weighted terms of this many queries
    compare_exact: bool = True  # seismic: also search exactly (same vectors) and report Seismic's recall@10 against it

    def validate(self) -> None:
        if self.index not in ("exact", "seismic"):
            raise ConfigError(f"sparse.index={self.index!r} must be 'exact' or 'seismic'", key="index")
        if not 0 < self.heap_factor <= 1 or self.query_cut < 1:
            raise ConfigError("sparse.heap_factor must be in (0, 1] and sparse.query_cut >= 1", key="heap_factor")


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best columns of a dense block (-inf: not retrieved): scores descending, ties by column
    ascending; missing slots are (-inf, -1)."""
    k_eff = min(k, scores.shape[1])
    if k_eff == 0:
        return np.full((scores.shape[0], k), -np.inf, np.float32), np.full((scores.shape[0], k), -1, np.int64)
    part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff] if k_eff < scores.shape[1] else \
        np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    values = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -values), axis=-1)
    part, values = np.take_along_axis(part, order, 1), np.take_along_axis(values, order, 1)
    # a tie at the k-th place may have chosen a later column than an equal one left out: rebuild exactly
    kth = values[:, -1:]
    needs = np.isfinite(kth[:, 0]) & ((scores == kth).sum(1) > (values == kth).sum(1))
    for r in np.nonzero(needs)[0]:
        row = scores[r]
        cols = np.lexsort((np.arange(len(row)), -row))[:k_eff]
        part[r], values[r] = cols, row[cols]
    positions = np.where(np.isfinite(values), part, -1)
    if k_eff < k:
        pad = k - k_eff
        values = np.pad(values, ((0, 0), (0, pad)), constant_values=-np.inf)
        positions = np.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    return values.astype(np.float32), positions.astype(np.int64)


class ExactSparseIndex:
    """Exact dot-product search over a CSR matrix of documents: an inverted index (term -> postings) in blocks of
    documents, sparse products with blocks of queries (see the module docstring)."""

    def __init__(self, docs, doc_block: int = 1 << 18):
        self.n = docs.shape[0]
        self.blocks = [(lo, docs[lo : lo + doc_block].T.tocsr()) for lo in range(0, self.n, doc_block)]

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        from retromae.retrieval.search import merge_top_k

        q = queries.shape[0]
        out_scores = np.full((q, k), -np.inf, np.float32)
        out_positions = np.full((q, k), -1, np.int64)
        if self.n == 0 or q == 0:
            return out_scores, out_positions
        for lo, postings in self.blocks:
            width = postings.shape[1]
            rows_per_block = max(1, SCORE_BUDGET // max(1, width))
            for start in range(0, q, rows_per_block):
                product = (queries[start : start + rows_per_block] @ postings).tocsr()
                dense = np.full(product.shape, -np.inf, dtype=np.float32)
                row_of = np.repeat(np.arange(product.shape[0]), np.diff(product.indptr))
                dense[row_of, product.indices] = product.data
                scores, positions = top_k_rows(dense, k)
                positions = np.where(positions >= 0, positions + lo, -1)
                stop = start + product.shape[0]
                merged = merge_top_k([out_scores[start:stop], scores], [out_positions[start:stop], positions], k)
                out_scores[start:stop], out_positions[start:stop] = merged
        return out_scores, out_positions


def seismic_module():
    try:
        import seismic
    except ImportError:
        raise ConfigError("sparse.index=seismic needs pyseismic-lsr (pip install pyseismic-lsr)") from None
    return seismic


class SeismicSearch:
    """A Seismic index over a CSR matrix of documents (term ids as its string components); candidates re-scored
    exactly from the CSR rows."""

    def __init__(self, docs, cfg: SparseSearchConfig):
        seismic = seismic_module()
        self.cfg, self.docs = cfg, docs
        self.kind = seismic.get_seismic_string()
        self.terms = np.array([str(i) for i in range(docs.shape[1])], dtype=self.kind)
        dataset = seismic.SeismicDataset()
        for row in range(docs.shape[0]):
            lo, hi = docs.indptr[row], docs.indptr[row + 1]
            if hi > lo:
                dataset.add_document(str(row), self.terms[docs.indices[lo:hi]], docs.data[lo:hi].astype(np.float32))
        self.index = None
        if dataset.len:
            self.index = seismic.SeismicIndex.build_from_dataset(
                dataset, n_postings=cfg.n_postings, centroid_fraction=cfg.centroid_fraction,
                summary_energy=cfg.summary_energy, max_fraction=cfg.max_fraction, num_threads=cfg.threads)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = queries.shape[0]
        out_scores = np.full((q, k), -np.inf, np.float32)
        out_positions = np.full((q, k), -1, np.int64)
        if self.index is None or q == 0:
            return out_scores, out_positions
        ids = np.array([str(i) for i in range(q)], dtype=self.kind)
        components = [self.terms[queries.indices[queries.indptr[i] : queries.indptr[i + 1]]] for i in range(q)]
        values = [queries.data[queries.indptr[i] : queries.indptr[i + 1]].astype(np.float32) for i in range(q)]
        found = self.index.batch_search(ids, components, values, k, self.cfg.query_cut, self.cfg.heap_factor,
                                        num_threads=self.cfg.threads)
        pairs = [(int(q), int(doc)) for hits in found for q, _, doc in hits]  # hits come in no particular order
        if not pairs:
            return out_scores, out_positions
        rows, positions = np.array(pairs, dtype=np.int64).T
        exact = np.asarray(self.docs[positions].multiply(queries[rows]).sum(1), dtype=np.float32).ravel()
        order = np.lexsort((positions, -exact, rows))
        rows, positions, exact = rows[order], positions[order], exact[order]
        rank = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
        keep = rank < k
        out_scores[rows[keep], rank[keep]], out_positions[rows[keep], rank[keep]] = exact[keep], positions[keep]
        return out_scores, out_positions


def search_sparse(queries, docs, k: int, cfg: SparseSearchConfig) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions in `docs`) of every query's top-k, best first; (-inf, -1) where fewer docs match."""
    if cfg.index == "seismic":
        return SeismicSearch(docs, cfg).search(queries, k)
    return ExactSparseIndex(docs).search(queries, k)


# ----- evaluation and mining (one branch each in retrieval/evaluate.py and finetune/mine.py) ------------------


def _save_csr(path: Path, matrix) -> None:
    from scipy.sparse import save_npz

    tmp = path.with_name(f".{path.name}.tmp.npz")
    save_npz(tmp, matrix)
    tmp.replace(path)


def _load_all(folder: Path, world: int):
    from scipy.sparse import load_npz, vstack

    return vstack([load_npz(folder / f"shard-{r:05d}.npz") for r in range(world)], format="csr")


def sparse_shard_results(encoder: SparseTextEncoder, doc_texts, query_texts: list[str], depth: int,
                         cfg: SparseSearchConfig, work: Path, state) -> tuple[np.ndarray, np.ndarray, dict]:
    """This process's share of the corpus encoded and searched for every query (each process encodes its share of
    the queries; all of them are read back): (scores, global corpus positions, this shard's sparsity sums)."""
    from retromae.retrieval.encoder import Window, shard_range

    rank, world = state.process_index, state.num_processes
    lo, hi = shard_range(len(doc_texts), rank, world)
    started = time.perf_counter()
    docs = encoder.encode(Window(doc_texts, lo, hi), "passage")
    qlo, qhi = shard_range(len(query_texts), rank, world)
    own_queries = encoder.encode(query_texts[qlo:qhi], "query")
    if world == 1:
        queries = own_queries
    else:
        (work / "sparse_queries").mkdir(parents=True, exist_ok=True)
        _save_csr(work / "sparse_queries" / f"shard-{rank:05d}.npz", own_queries)
        state.wait_for_everyone()
        queries = _load_all(work / "sparse_queries", world)
    encoded = time.perf_counter()
    scores, positions = search_sparse(queries, docs, depth, cfg)
    searched = time.perf_counter()
    stats = {"doc_nonzeros": int(docs.getnnz()), "docs": int(docs.shape[0]),
             "query_nonzeros": int(own_queries.getnnz()), "queries": int(own_queries.shape[0]),
             "encode_seconds": encoded - started, "search_seconds": searched - encoded}
    if cfg.index == "seismic" and cfg.compare_exact:  # the same vectors searched exactly, for Seismic's recall
        exact_scores, exact_positions = ExactSparseIndex(docs).search(queries, depth)
        stats["exact_search_seconds"] = time.perf_counter() - searched
        stats["exact"] = (exact_scores, np.where(exact_positions >= 0, exact_positions + lo, -1))
    if rank == 0:
        stats["top_terms"] = [encoder.top_terms(queries[i]) for i in range(min(cfg.top_terms_queries,
                                                                                queries.shape[0]))]
    return scores, np.where(positions >= 0, positions + lo, -1), stats


def sparse_run(encoder: SparseTextEncoder, data, search, work: Path, state, depth: int):
    """SPLADE's evaluation run, shard by shard, merged as the dense one: ((query ids, scores, positions), report)
    on the main process, (None, None) elsewhere."""
    from retromae.retrieval.evaluate import _gather_results

    _, texts = data.passages(search.title_separator)
    query_ids = list(data.queries)
    scores, positions, stats = sparse_shard_results(encoder, texts, [data.queries[q] for q in query_ids], depth,
                                                    search.sparse, work, state)
    found = _gather_results(query_ids, scores, positions, depth, work, state, "sparse")
    exact = stats.pop("exact", None)
    if exact is not None:
        exact = _gather_results(query_ids, *exact, depth, work, state, "sparse-exact")
    report = _merge_stats(stats, work, state)
    if found is None:
        return None, None
    if exact is not None:
        report["seismic_recall@10_vs_exact"] = overlap_at(found[2], exact[2], 10)
        report["exact_run"] = exact
    names = query_ids[: len(report.pop("top_terms", []))]
    report["top_terms"] = {q: t for q, t in zip(names, stats.get("top_terms", []))}
    return found, report


def _merge_stats(stats: dict, work: Path, state) -> dict:
    """Sparsity over every process's share: mean non-zeros per query and per document."""
    parts = [stats]
    if state.num_processes > 1:
        (work / "sparse_stats").mkdir(parents=True, exist_ok=True)
        (work / "sparse_stats" / f"{state.process_index}.json").write_text(json.dumps(stats))
        state.wait_for_everyone()
        parts = [json.loads((work / "sparse_stats" / f"{r}.json").read_text()) for r in range(state.num_processes)]
    total = {k: sum(p[k] for p in parts) for k in ("doc_nonzeros", "docs", "query_nonzeros", "queries")}
    merged = {"mean_nonzeros_per_query": total["query_nonzeros"] / max(1, total["queries"]),
              "mean_nonzeros_per_document": total["doc_nonzeros"] / max(1, total["docs"]),
              "encode_seconds": max(p["encode_seconds"] for p in parts),
              "search_seconds": max(p["search_seconds"] for p in parts),
              "top_terms": stats.get("top_terms", [])}
    if "exact_search_seconds" in stats:
        merged["exact_search_seconds"] = max(p["exact_search_seconds"] for p in parts)
    return merged


def overlap_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found top-k & true top-k| / |true top-k| (documents the query matches at all)."""
    shares = []
    for f, t in zip(found[:, :k], truth[:, :k]):
        t = set(t[t >= 0].tolist())
        if t:
            shares.append(len(t & set(f[f >= 0].tolist())) / len(t))
    return float(np.mean(shares)) if shares else 1.0


def format_sparsity(report: dict) -> str:
    """The evaluation report's sparse part: non-zeros and the top-weighted terms of a few queries."""
    lines = [f"mean non-zeros: {report['mean_nonzeros_per_query']:.1f} per query, "
             f"{report['mean_nonzeros_per_document']:.1f} per document"]
    if "seismic_recall@10_vs_exact" in report:
        exact = ", ".join(f"{k} {v:.4f}" for k, v in report.get("exact", {}).items())
        lines.append(f"Seismic: recall@10 against exact search {report['seismic_recall@10_vs_exact']:.4f}; index "
                     f"build + search {report['search_seconds']:.2f} s, exact {report['exact_search_seconds']:.2f} s; "
                     f"exact search's metrics: {exact}")
    for qid, terms in report.get("top_terms", {}).items():
        lines.append(f"query {qid}: " + ", ".join(f"{t} {w:.2f}" for t, w in terms))
    return "\n".join(lines)


# ----- fusion ------------------------------------------------------------------------------------------------


@dataclass
class FusionConfig:
    method: str = "rrf"  # rrf (reciprocal rank fusion) | linear (weighted sum of min-max normalised scores)
    rrf_k: int = 60  # rrf: score = sum over runs of weight / (rrf_k + rank)
    weights: list[float] = field(default_factory=list)  # one per run (the evaluated model first); empty: all 1

    def validate(self, runs: int) -> None:
        if self.method not in ("rrf", "linear"):
            raise ConfigError(f"fusion method {self.method!r} must be rrf or linear", key="method")
        if self.weights and len(self.weights) != runs:
            raise ConfigError(f"{len(self.weights)} fusion weights for {runs} runs", key="weights")


def fuse_runs(runs: list[dict], cfg: FusionConfig) -> dict:
    """One run from several ({query: {doc: score}}): reciprocal rank fusion, or a weighted sum of each run's
    min-max normalised scores (a document missing from a run adds 0). Ranks and ties follow trec_eval's order
    (score descending, then doc id descending)."""
    weights = cfg.weights or [1.0] * len(runs)
    fused: dict[str, dict[str, float]] = {}
    for run, weight in zip(runs, weights):
        for qid, docs in run.items():
            target = fused.setdefault(qid, {})
            ranked = sorted(docs.items(), key=lambda item: (-item[1], _desc(item[0])))
            if cfg.method == "rrf":
                for rank, (doc, _) in enumerate(ranked, start=1):
                    target[doc] = target.get(doc, 0.0) + weight / (cfg.rrf_k + rank)
            else:
                values = [s for _, s in ranked]
                low, high = (min(values), max(values)) if values else (0.0, 0.0)
                for doc, score in ranked:
                    norm = (score - low) / (high - low) if high > low else 1.0
                    target[doc] = target.get(doc, 0.0) + weight * norm
    return {q: dict(sorted(d.items(), key=lambda item: (-item[1], _desc(item[0])))) for q, d in fused.items()}


class _desc(str):
    """A string that sorts in descending order (trec_eval's tie-break by document id)."""

    def __lt__(self, other):
        return str.__gt__(self, other)


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 5:
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
    return run


def evaluate_fused(models: list[tuple[str, str]], dataset: str, split: str | None, encode_cfg, search,
                   fusion: FusionConfig, output: str | None = None, run_file: str | None = None) -> dict | None:
    """Evaluate each (model, representation) alone, then their fusion: the fused metrics with "parts" (each one's
    metrics), on the main process. Each part runs through `evaluate_model` (so under a launch, spread over processes),
    or, for a model given as a TREC run file (`... --run RUN.trec` of an earlier evaluation), is read from it."""
    import tempfile
    from dataclasses import replace

    from retromae.distributed import process_state
    from retromae.io import atomic_write_text
    from retromae.retrieval.data import load_dataset
    from retromae.retrieval.evaluate import evaluate_model, score_run

    fusion.validate(len(models))
    data = load_dataset(dataset, split, search.title_separator)
    folder = Path(tempfile.mkdtemp(prefix="retromae-fusion-"))
    parts, runs = [], []
    for i, (model, representation) in enumerate(models):
        path = folder / f"run{i}.trec"
        if model.endswith(".trec") and Path(model).is_file():
            path, representation = Path(model), "run file"
            part = score_run(read_trec_run(path), data, search)[0] if process_state().is_main_process else None
        else:
            part = evaluate_model(model, data, split, encode_cfg, replace(search, representation=representation),
                                  run_file=str(path))
        if part is not None:
            if model == "bm25":
                representation = "lexical"
            parts.append({"model": model, "representation": representation,
                          **{m: part[m] for m in search.metrics}})
            runs.append(read_trec_run(path))
    if not process_state().is_main_process:
        return None
    fused = fuse_runs(runs, fusion)
    means, per_query = score_run(fused, data, search, run_file)
    result = {**means, "dataset": data.name, "split": data.split, "model": " + ".join(m for m, _ in models),
              "fusion": asdict(fusion), "parts": parts, "num_queries": len(per_query)}
    if output:
        atomic_write_text(output, json.dumps({**result, "per_query": per_query}, indent=1))
    return result
