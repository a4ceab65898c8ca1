"""Seismic against exact sparse search on a synthetic corpus of SPLADE-like vectors: recall@10 of Seismic's top 10
against the exact top 10, queries/s of each on the same machine and queries, the size of each index.

    python scripts/bench_sparse.py [--docs 100000] [--queries 1000] [--threads 1]

The corpus imitates SPLADE++ on MS MARCO passages: a BERT vocabulary (30,522 terms), term frequencies following a
Zipf law (exponent 1.0, the 100 most common terms left out as a trained model's FLOPS penalty leaves them weak), a
log-normal number of non-zeros per document around 150 (SPLADE++ ED reports ~170 per passage) and per query around
30, weights log(1 + ReLU)-like (a gamma law), and topical structure as real text has: `--topics` topics of 300 terms
each (drawn from the Zipf law), a document takes 70% of its terms from its topic (Zipf within the topic) and the rest
from the whole vocabulary. Queries take half of their terms from a random document, so that they have real matches,
and the rest as a document of that topic would.

Exact search: `retromae.retrieval.sparse.ExactSparseIndex` (the corpus CSR transposed into an inverted index, queries
in blocks times it, exact top-k), what `retromae evaluate --representation splade` runs by default. Seismic:
pyseismic-lsr 0.5.4 with the settings below (`--n-postings`, `--centroid-fraction`, `--summary-energy`,
`--max-fraction`, `--query-cut`, `--heap-factor`), both timed single-threaded by default (`--threads`), queries
searched as one batch, after a warm-up batch. Index sizes: the CSR (values float32, term ids int32) and the inverted
index for exact search; Seismic's saved index file. Prints a table and, last, ratio=<Seismic q/s / exact q/s>.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def zipf_terms(rng, count: int, vocabulary: int, skip: int, exponent: float) -> np.ndarray:
    ranks = np.arange(skip + 1, skip + vocabulary + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -exponent)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(count)), vocabulary - 1)


def sparse_rows(rng, rows: int, mean_nonzeros: float, vocabulary: int, skip: int, exponent: float,
                forced: list[np.ndarray] | None = None, topics: np.ndarray | None = None,
                row_topics: np.ndarray | None = None, topical: float = 0.7):
    """A CSR matrix of `rows` rows, each with ~mean_nonzeros distinct terms (plus `forced` terms): a share `topical` of
    them drawn from the row's topic (a row of `topics`, term ids), the rest from the Zipf law."""
    from scipy.sparse import csr_matrix

    sizes = np.maximum(4, rng.lognormal(np.log(mean_nonzeros), 0.4, rows).astype(np.int64))
    row_of = np.repeat(np.arange(rows), sizes)
    terms = zipf_terms(rng, int(sizes.sum()), vocabulary, skip, exponent)
    if topics is not None:
        from_topic = rng.random(len(terms)) < topical
        pick = zipf_terms(rng, int(from_topic.sum()), topics.shape[1], 0, 1.0)
        terms[from_topic] = topics[row_topics[row_of[from_topic]], pick]
    if forced is not None:
        row_of = np.concatenate([row_of, np.repeat(np.arange(rows), [len(f) for f in forced])])
        terms = np.concatenate([terms] + forced)
    keys = np.unique(row_of.astype(np.int64) * vocabulary + terms)
    row_of, terms = keys // vocabulary, (keys % vocabulary).astype(np.int32)
    values = rng.gamma(1.2, 0.6, len(terms)).astype(np.float32) + 0.01
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=rows))])
    return csr_matrix((values, terms, indptr), shape=(rows, vocabulary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--vocabulary", type=int, default=30522)
    parser.add_argument("--doc-nonzeros", type=float, default=220.0, help="drawn per document (~150 distinct)")
    parser.add_argument("--query-nonzeros", type=float, default=40.0, help="drawn per query (~30 distinct)")
    parser.add_argument("--topics", type=int, default=2000, help="topics: 300 terms each")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-postings", type=int, default=1000)
    parser.add_argument("--centroid-fraction", type=float, default=0.1)
    parser.add_argument("--summary-energy", type=float, default=0.4)
    parser.add_argument("--max-fraction", type=float, default=1.5)
    parser.add_argument("--query-cut", type=int, default=10)
    parser.add_argument("--heap-factor", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from retromae.retrieval.sparse import ExactSparseIndex, SeismicSearch, SparseSearchConfig

    rng = np.random.default_rng(args.seed)
    topics = zipf_terms(rng, args.topics * 300, args.vocabulary, 100, 0.5).reshape(args.topics, 300)
    doc_topics = rng.integers(0, args.topics, args.docs)
    docs = sparse_rows(rng, args.docs, args.doc_nonzeros, args.vocabulary, 100, 1.0, None, topics, doc_topics)
    sources = rng.integers(0, args.docs, args.queries)
    forced = []
    for s in sources:
        row = docs.indices[docs.indptr[s] : docs.indptr[s + 1]]
        forced.append(rng.choice(row, min(len(row), int(args.query_nonzeros // 2)), replace=False))
    queries = sparse_rows(rng, args.queries, args.query_nonzeros / 2, args.vocabulary, 100, 1.0, forced, topics,
                          doc_topics[sources])
    print(f"corpus: {docs.shape[0]:,} documents, {docs.getnnz() / docs.shape[0]:.1f} non-zeros each; "
          f"{queries.shape[0]:,} queries, {queries.getnnz() / queries.shape[0]:.1f} non-zeros each", flush=True)

    started = time.perf_counter()
    exact = ExactSparseIndex(docs)
    exact_build = time.perf_counter() - started
    exact.search(queries[:50], args.k)  # warm-up
    started = time.perf_counter()
    _, truth = exact.search(queries, args.k)
    exact_seconds = time.perf_counter() - started

    cfg = SparseSearchConfig(index="seismic", n_postings=args.n_postings, centroid_fraction=args.centroid_fraction,
                             summary_energy=args.summary_energy, max_fraction=args.max_fraction,
                             query_cut=args.query_cut, heap_factor=args.heap_factor, threads=args.threads)
    started = time.perf_counter()
    seismic = SeismicSearch(docs, cfg)
    seismic_build = time.perf_counter() - started
    seismic.search(queries[:50], args.k)  # warm-up
    started = time.perf_counter()
    _, found = seismic.search(queries, args.k)
    seismic_seconds = time.perf_counter() - started

    recall = np.mean([len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, len(t[t >= 0])) for f, t in zip(found, truth)])
    with tempfile.TemporaryDirectory() as folder:
        seismic.index.save(str(Path(folder) / "index"))
        seismic_bytes = sum(p.stat().st_size for p in Path(folder).iterdir())
    csr_bytes = docs.data.nbytes + docs.indices.nbytes + docs.indptr.nbytes
    inverted_bytes = sum(p.data.nbytes + p.indices.nbytes + p.indptr.nbytes for _, p in exact.blocks)
    exact_qps, seismic_qps = args.queries / exact_seconds, args.queries / seismic_seconds
    print(f"\nSeismic settings: n_postings {args.n_postings}, centroid_fraction {args.centroid_fraction}, "
          f"summary_energy {args.summary_energy}, max_fraction {args.max_fraction}; query_cut {args.query_cut}, "
          f"heap_factor {args.heap_factor}; {args.threads} thread(s)\n")
    print("| search | build s | index MB | queries/s | recall@%d vs exact |\n|---|---:|---:|---:|---:|" % args.k)
    print(f"| exact (inverted index, sparse products) | {exact_build:.1f} | {inverted_bytes / 2**20:.0f} "
          f"(+ CSR {csr_bytes / 2**20:.0f}) | {exact_qps:.1f} | 1.0000 |")
    print(f"| Seismic | {seismic_build:.1f} | {seismic_bytes / 2**20:.0f} | {seismic_qps:.1f} | {recall:.4f} |")
    print(f"recall@{args.k}={recall:.4f}")
    print(f"ratio={seismic_qps / exact_qps:.2f}")


if __name__ == "__main__":
    main()
