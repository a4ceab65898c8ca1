"""Retrieval metrics with trec_eval semantics, computed by `pytrec_eval`.

Metric names: `ndcg@k`, `recall@k`, `map` / `map@k`, `precision@k`, `mrr@k`, `mrr` (uncut).
trec_eval has no cut-off for the reciprocal rank, so `mrr@k` is pytrec_eval's `recip_rank` on the run cut to
its top k in trec_eval's own order (score descending, ties by document id descending), which is MS MARCO's
MRR@10. Means are over the queries that are both judged and in the run (as trec_eval and BEIR do); a query
that is in the run with no documents counts as 0. BEIR's rule of dropping documents whose id equals the
query id (it matters for ArguAna and Quora) is on by default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map")

_PATTERN = re.compile(r"^(ndcg|recall|map|precision|mrr)(?:@(\d+))?$")
_TREC = {"ndcg": "ndcg_cut", "recall": "recall", "map": "map_cut", "precision": "P"}


def parse_metric(name: str) -> tuple[str, int | None]:
    m = _PATTERN.match(name.lower())
    if not m:
        raise ValueError(f"unknown metric {name!r}: use ndcg@k, recall@k, map, map@k, precision@k, mrr, mrr@k")
    kind, k = m.group(1), m.group(2)
    if kind in ("ndcg", "recall", "precision") and k is None:
        raise ValueError(f"metric {name!r} needs a cut-off, e.g. {kind}@10")
    return kind, int(k) if k else None


def top_k_trec_order(docs: dict[str, float], k: int) -> dict[str, float]:
    """The first k documents in trec_eval's order: score descending, ties broken by document id descending."""
    ranked = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return dict(ranked[:k])


def drop_identical_ids(run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {qid: {d: s for d, s in docs.items() if d != qid} for qid, docs in run.items()}


def evaluate(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    metrics: Iterable[str] = DEFAULT_METRICS,
    ignore_identical_ids: bool = True,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean of each metric, {query id: {metric: value}}) for `run` against `qrels`."""
    import pytrec_eval

    metrics = list(dict.fromkeys(metrics))
    parsed = {m: parse_metric(m) for m in metrics}
    if ignore_identical_ids:
        run = drop_identical_ids(run)
    run = {qid: docs for qid, docs in run.items() if qid in qrels}
    per_query: dict[str, dict[str, float]] = {qid: {} for qid in run}

    measures = set()
    for kind, k in parsed.values():
        if kind == "mrr":
            continue
        measures.add(f"{_TREC[kind]}.{k}" if k is not None else kind)
    if measures:
        scores = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
        for name, (kind, k) in parsed.items():
            if kind == "mrr":
                continue
            key = f"{_TREC[kind]}_{k}" if k is not None else kind
            for qid in per_query:
                per_query[qid][name] = scores[qid][key]

    for name, (kind, k) in parsed.items():
        if kind != "mrr":
            continue
        cut = run if k is None else {qid: top_k_trec_order(docs, k) for qid, docs in run.items()}
        scores = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        for qid in per_query:
            per_query[qid][name] = scores[qid]["recip_rank"]

    n = len(per_query)
    means = {name: (sum(q[name] for q in per_query.values()) / n if n else 0.0) for name in metrics}
    return means, per_query
