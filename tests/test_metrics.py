"""Metrics equal pytrec_eval run directly and BEIR's EvaluateRetrieval; MRR@k follows trec_eval's order."""

import random

import pytest
import pytrec_eval

from retromae.retrieval.metrics import evaluate, top_k_trec_order


def tricky_case(seed: int = 0):
    """Graded judgements, tied scores, a query whose run is empty, a document id equal to its query id."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(60)]
    qrels, run = {}, {}
    for q in range(25):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 8))
        qrels[qid] = {d: rng.choice([0, 1, 1, 2]) for d in judged}
        scores = {}
        for d in rng.sample(docs, 40):
            scores[d] = round(rng.random(), 1)  # one decimal: many ties
        run[qid] = scores
    run["q3"] = {}  # a query without hits
    qrels["q5"]["q5"] = 2  # a document whose id is the query id, judged relevant...
    run["q5"]["q5"] = 9.9  # ...and retrieved first
    return qrels, run


def test_equals_pytrec_eval_directly():
    qrels, run = tricky_case()
    metrics = ["ndcg@10", "ndcg@5", "recall@20", "map", "precision@5"]
    means, per_query = evaluate(qrels, run, metrics, ignore_identical_ids=False)
    direct = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10,5", "recall.20", "map", "P.5"}).evaluate(run)
    keys = {"ndcg@10": "ndcg_cut_10", "ndcg@5": "ndcg_cut_5", "recall@20": "recall_20", "map": "map",
            "precision@5": "P_5"}
    assert set(per_query) == set(direct)
    for m, key in keys.items():
        for qid in direct:
            assert abs(per_query[qid][m] - direct[qid][key]) < 1e-12
        assert abs(means[m] - sum(d[key] for d in direct.values()) / len(direct)) < 1e-9
    assert per_query["q3"]["ndcg@10"] == 0.0, "a query without hits counts as 0"


def test_uncut_mrr_equals_recip_rank_and_cut_mrr_follows_trec_order():
    qrels, run = tricky_case(1)
    means, per_query = evaluate(qrels, run, ["mrr", "mrr@100", "mrr@3"], ignore_identical_ids=False)
    direct = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
    for qid in direct:
        assert abs(per_query[qid]["mrr"] - direct[qid]["recip_rank"]) < 1e-12
        assert abs(per_query[qid]["mrr@100"] - direct[qid]["recip_rank"]) < 1e-12  # 100 > run length
        # by hand: first relevant among the top 3 in trec_eval order (score desc, then doc id desc)
        top = list(top_k_trec_order(run[qid], 3))
        ranks = [i + 1 for i, d in enumerate(top) if qrels[qid].get(d, 0) >= 1]
        assert per_query[qid]["mrr@3"] == (1 / ranks[0] if ranks else 0.0)


def test_tie_order_is_trec_evals():
    assert list(top_k_trec_order({"a": 1.0, "c": 1.0, "b": 1.0, "z": 0.5}, 3)) == ["c", "b", "a"]
    # recip_rank of pytrec_eval agrees: the relevant 'a' ties with 'c' and 'b' and comes third
    direct = pytrec_eval.RelevanceEvaluator({"q": {"a": 1}}, {"recip_rank"}).evaluate({"q": {"a": 1.0, "c": 1.0, "b": 1.0}})
    assert direct["q"]["recip_rank"] == pytest.approx(1 / 3)
    assert evaluate({"q": {"a": 1}}, {"q": {"a": 1.0, "c": 1.0, "b": 1.0}}, ["mrr@2"])[0]["mrr@2"] == 0.0


def test_equals_beir_evaluate_retrieval():
    from beir.retrieval.evaluation import EvaluateRetrieval

    qrels, run = tricky_case(2)
    # BEIR's MRR breaks ties by insertion order: give tied documents trec_eval's order so both agree
    run = {q: top_k_trec_order(docs, len(docs)) for q, docs in run.items()}
    ks = [1, 3, 10, 100]
    metrics = [f"{m}@{k}" for m in ("ndcg", "recall", "map", "precision", "mrr") for k in ks]
    ours, _ = evaluate(qrels, run, metrics, ignore_identical_ids=True)
    beir_run = {q: dict(d) for q, d in run.items()}
    ndcg, _map, recall, precision = EvaluateRetrieval.evaluate(qrels, beir_run, ks, ignore_identical_ids=True)
    mrr = EvaluateRetrieval.evaluate_custom(qrels, beir_run, ks, metric="mrr")
    for k in ks:  # BEIR rounds to 5 decimals
        assert ours[f"ndcg@{k}"] == pytest.approx(ndcg[f"NDCG@{k}"], abs=5e-6)
        assert ours[f"recall@{k}"] == pytest.approx(recall[f"Recall@{k}"], abs=5e-6)
        assert ours[f"map@{k}"] == pytest.approx(_map[f"MAP@{k}"], abs=5e-6)
        assert ours[f"precision@{k}"] == pytest.approx(precision[f"P@{k}"], abs=5e-6)
        assert ours[f"mrr@{k}"] == pytest.approx(mrr[f"MRR@{k}"], abs=5e-6)


def test_identical_ids_are_dropped_unless_asked_not_to():
    qrels = {"q1": {"q1": 1, "d2": 1}}
    run = {"q1": {"q1": 5.0, "d2": 4.0, "d3": 3.0}}
    dropped, _ = evaluate(qrels, run, ["mrr@10", "recall@1"])
    kept, _ = evaluate(qrels, run, ["mrr@10", "recall@1"], ignore_identical_ids=False)
    assert dropped == {"mrr@10": 1.0, "recall@1": 0.5} and kept == {"mrr@10": 1.0, "recall@1": 0.5}
    qrels = {"q1": {"d2": 1}}
    assert evaluate(qrels, run, ["mrr@10"])[0]["mrr@10"] == 1.0
    assert evaluate(qrels, run, ["mrr@10"], ignore_identical_ids=False)[0]["mrr@10"] == 0.5


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, ["ndgc@10"])
    with pytest.raises(ValueError, match="needs a cut-off"):
        evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, ["ndcg"])
    for name in ("recall", "precision", "RECALL"):  # a set-based metric over the whole run is refused too
        with pytest.raises(ValueError, match="needs a cut-off"):
            evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, [name])


def test_a_run_with_no_judged_query_scores_zero():
    """Means are over the queries both judged and in the run: none here, so every metric is 0, not an error."""
    means, per_query = evaluate({"q1": {"d": 1}}, {"q2": {"d": 1.0}}, ["ndcg@10", "mrr@10", "recall@100"])
    assert per_query == {} and means == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 0.0}
