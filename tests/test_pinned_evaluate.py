"""The rules of `retromae.retrieval.evaluate` and `retromae.retrieval.hybrid`, pinned on tiny inputs whose expected
values are worked out by hand in the comments (issue 18: mutation testing). Pure functions on numpy arrays where
possible; the suite runner with `evaluate_model` replaced by a table of hand-made results."""

from __future__ import annotations

import json
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix

from retromae.config import ConfigError
from retromae.data.corpus import CorpusError
from retromae.retrieval import evaluate as ev
from retromae.retrieval.data import RetrievalData
from retromae.retrieval.evaluate import SearchConfig, SuiteConfig
from retromae.retrieval.hybrid import HybridVectors, exact_search, joint_scores, pooled_search
from retromae.retrieval.sparse import SparseSearchConfig
from test_scale import FakeProcess

pytestmark = pytest.mark.usefixtures("one_thread")


def in_threads(world, work):
    """work(state) run by `world` fake processes at once; their results in rank order."""
    barrier = threading.Barrier(world)

    def process(rank):
        try:
            return work(FakeProcess(rank, world, barrier))
        except BaseException:
            barrier.abort()  # the others stop waiting for this one
            raise

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(process, range(world)))


class FakeCorpus:
    def __init__(self, ids):
        self.ids, self.takes = ids, []

    def ids_at(self, positions):
        self.takes.append(list(positions))
        return [self.ids[p] for p in positions]

    def passages(self, separator=" "):
        return self.ids, [f"text of {i}" for i in self.ids]

    def __len__(self):
        return len(self.ids)


def data_of(qrels=None, kind="beir", ids=("d0", "d1", "d2"), queries=None):
    return RetrievalData("tiny", FakeCorpus(list(ids)), queries or {}, qrels or {}, kind=kind)


# ----- SearchConfig ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("representation", ["dense", "dupmae", "splade"])
@pytest.mark.parametrize("backend", ["auto", "faiss", "torch"])
def test_search_config_accepts_each_representation_and_backend(representation, backend):
    SearchConfig(representation=representation, backend=backend, nprobe=1, shard_dtype="float16").validate()


@pytest.mark.parametrize("change, key", [
    ({"representation": "sparse"}, "representation"),
    ({"backend": "cuda"}, "backend"),
    ({"nprobe": 0}, "nprobe"),
    ({"layers": [1]}, "layers"),  # layers without dims
    ({"dims": [8]}, "layers"),  # dims without layers
    ({"layers": [1], "dims": [8], "representation": "dupmae"}, "layers"),  # the grid is for dense vectors only
    ({"layers": [1], "dims": [8], "representation": "splade"}, "layers"),
    ({"shard_dtype": "int8"}, "shard_dtype"),
    ({"sparse": SparseSearchConfig(index="annoy")}, "index"),  # the sparse section is validated too
])
def test_search_config_refuses_one_step_beyond_each_boundary(change, key):
    with pytest.raises(ConfigError) as err:
        SearchConfig(**change).validate()
    assert err.value.key == key


def test_search_config_grid_of_layers_and_dims_on_dense_vectors_is_accepted():
    SearchConfig(layers=[1, 2], dims=[8]).validate()
    SearchConfig(layers=[], dims=[]).validate()


@pytest.mark.parametrize("depth, metrics, expected", [
    (1, ["ndcg@1000"], 1),  # a depth > 0 is used as it is, whatever the metrics
    (0, ["ndcg@10"], 100),  # otherwise the largest cut-off, at least 100
    (0, ["map"], 100),  # an uncut metric adds no cut-off
    (0, ["ndcg@10", "recall@101", "mrr@10"], 101),
    (0, ["recall@1000", "ndcg@10"], 1000),  # the largest, wherever it stands
])
def test_retrieval_depth(depth, metrics, expected):
    assert SearchConfig(depth=depth, metrics=metrics).retrieval_depth() == expected


def test_identical_ids_are_dropped_for_beir_kept_for_msmarco_unless_told():
    beir, msmarco = data_of(kind="beir"), data_of(kind="msmarco")
    assert SearchConfig().drops_identical_ids(beir) is True
    assert SearchConfig().drops_identical_ids(msmarco) is False
    assert SearchConfig(ignore_identical_ids=False).drops_identical_ids(beir) is False
    assert SearchConfig(ignore_identical_ids=True).drops_identical_ids(msmarco) is True


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("TRUE", True), ("false", False),
                                             ("False", False), (True, True), (False, False), ("maybe", "auto")])
def test_gpu_setting(value, expected):
    assert ev._gpu_setting(value) is expected if isinstance(expected, bool) else ev._gpu_setting(value) == expected


def test_check_metrics_names_the_metric_it_refuses():
    ev.check_metrics(["ndcg@10", "map", "mrr", "recall@100"])
    with pytest.raises(ConfigError, match=r"unknown metric 'bleu@4'"):
        ev.check_metrics(["ndcg@10", "bleu@4"])
    with pytest.raises(ConfigError, match=r"metric 'ndcg' needs a cut-off"):
        ev.check_metrics(["ndcg"])


# ----- merging, runs, scoring -----------------------------------------------------------------------------------


def _parts():
    """Two processes' (scores, positions) for 5 queries, 2 each; process B holds the lower positions. -1 pads."""
    a_scores = np.array([[5, 3], [4, 4], [6, 7], [1, 0], [2, 1]], np.float32)
    a_pos = np.array([[5, 6], [7, 5], [8, -1], [5, 6], [9, 8]])
    b_scores = np.array([[4, 2], [4, 1], [6, 5], [1, 1], [3, 2]], np.float32)
    b_pos = np.array([[0, 1], [2, 3], [4, 0], [3, 1], [0, 2]])
    return [(a_scores, a_pos), (b_scores, b_pos)]


def test_merge_in_blocks_of_a_range_of_queries_by_hand():
    # queries 1..3, blocks of 2 (rows 1-2, then 3), top 3; ties by position ascending, padding (-1) never wins:
    # q1: (4,7) (4,5) (4,2) (1,3)     -> 4 4 4 at 2 5 7
    # q2: (6,8) (7,-1) (6,4) (5,0)    -> 6 6 5 at 4 8 0 (the padded 7 is out)
    # q3: (1,5) (0,6) (1,3) (1,1)     -> 1 1 1 at 1 3 5
    scores, positions = ev.merge_in_blocks(_parts(), 3, lo=1, hi=4, block=2)
    assert scores.dtype == np.float32 and positions.dtype == np.int64
    assert scores.tolist() == [[4, 4, 4], [6, 6, 5], [1, 1, 1]]
    assert positions.tolist() == [[2, 5, 7], [4, 8, 0], [1, 3, 5]]


def test_merge_in_blocks_deeper_than_the_parts_keeps_all_of_them():
    # depth 10 > 2 + 2 columns: 4 columns; q2's padding comes last as (-inf, -1)
    scores, positions = ev.merge_in_blocks(_parts(), 10, lo=2, hi=3, block=1)
    assert positions.tolist() == [[4, 8, 0, -1]]
    assert scores.tolist() == [[6, 6, 5, -np.inf]]


def test_merge_in_blocks_defaults_to_every_query():
    # the best of each query: q0 5@5, q1 4@2 (tie with 5 and 7), q2 6@4, q3 1@1, q4 3@0
    scores, positions = ev.merge_in_blocks(_parts(), 1)
    assert positions[:, 0].tolist() == [5, 2, 4, 1, 0] and scores[:, 0].tolist() == [5, 4, 6, 1, 3]


def _two_ranks():
    # rank 0 and rank 1 of 2 queries, global positions; merged top 3:
    # q0: (3,0) (1,1) (2,3) (1,2) -> 3 2 1 at 0 3 1;  q1: (2,1) (2,0) (5,2) (0,3) -> 5 2 2 at 2 0 1
    return ([np.array([[3, 1], [2, 2]], np.float32), np.array([[2, 1], [5, 0]], np.float32)],
            [np.array([[0, 1], [1, 0]]), np.array([[3, 2], [2, 3]])])


def test_gather_results_of_two_processes_merges_on_the_main_one(tmp_path):
    scores, positions = _two_ranks()

    def work(state):
        r = state.process_index
        first = ev._gather_results(["q0", "q1"], scores[r], positions[r], 3, tmp_path, state, "a")
        # a second gather in the same folder (as the (layer, dim) grid does), another tag, other results
        second = ev._gather_results(["q0", "q1"], -scores[r], positions[r], 1, tmp_path, state, "b")
        return first, second

    (first, second), rest = in_threads(2, work)[0], in_threads(2, work)[1:]
    assert rest == [(None, None)], "the others leave the merge to the main process"
    assert first[0] == ["q0", "q1"]
    assert first[1].tolist() == [[3, 2, 1], [5, 2, 2]] and first[2].tolist() == [[0, 3, 1], [2, 0, 1]]
    # negated: q0 best -1 at 1 or 2 -> position 1; q1 best 0 at 3
    assert second[1].tolist() == [[-1], [0]] and second[2].tolist() == [[1], [3]]


def test_gather_results_of_one_process_writes_nothing(tmp_path):
    scores, positions = _two_ranks()
    both = ev._gather_results(["q0", "q1"], np.concatenate(scores, 1), np.concatenate(positions, 1), 3, tmp_path,
                              FakeProcess(0, 1))
    assert both[1].tolist() == [[3, 2, 1], [5, 2, 2]] and both[2].tolist() == [[0, 3, 1], [2, 0, 1]]
    assert list(tmp_path.iterdir()) == []


def test_to_run_reads_the_ids_in_one_take_and_skips_padding():
    data = data_of(ids=["a", "b", "c"])
    run = ev._to_run(data, ["q1", "q2"], np.array([[0.9, 0.5, 0.1], [0.25, 0.2, 0.1]], np.float32),
                     np.array([[2, 0, -1], [1, -1, -1]]))
    assert run == {"q1": {"c": 0.8999999761581421, "a": 0.5}, "q2": {"b": 0.25}}
    assert all(type(s) is float for docs in run.values() for s in docs.values())
    assert data.corpus.takes == [[2, 0, 1]]


def test_score_run_drops_the_query_id_then_cuts_to_depth(tmp_path):
    run = {"q1": {"q1": 9.0, "d1": 5.0, "d2": 4.0, "d3": 3.0}}
    qrels = {"q1": {"d1": 1}}
    search = SearchConfig(depth=2, metrics=["mrr@10", "recall@10"])
    # BEIR: q1 dropped, then the first 2: d1 d2 -> d1 at rank 1: mrr 1, recall 1
    means, per_query = ev.score_run(run, data_of(qrels, "beir"), search, str(tmp_path / "beir.trec"))
    assert means == {"mrr@10": 1.0, "recall@10": 1.0} and per_query == {"q1": {"mrr@10": 1.0, "recall@10": 1.0}}
    assert [line.split()[2] for line in (tmp_path / "beir.trec").read_text().splitlines()] == ["d1", "d2"]
    # MS MARCO: q1 kept, the first 2: q1 d1 -> d1 at rank 2: mrr 1/2
    means, _ = ev.score_run(run, data_of(qrels, "msmarco"), search, str(tmp_path / "msmarco.trec"))
    assert means == {"mrr@10": 0.5, "recall@10": 1.0}
    assert [line.split()[2] for line in (tmp_path / "msmarco.trec").read_text().splitlines()] == ["q1", "d1"]
    # depth 1 under MS MARCO: only q1 -> nothing relevant
    means, _ = ev.score_run(run, data_of(qrels, "msmarco"), SearchConfig(depth=1, metrics=["mrr@10"]))
    assert means == {"mrr@10": 0.0}
    assert not (tmp_path / "none.trec").exists()


# ----- searches -------------------------------------------------------------------------------------------------


def test_shard_search_turns_shard_positions_into_global_ones(tmp_path):
    rng = np.random.default_rng(3)
    docs = rng.standard_normal((200, 4)).astype(np.float32)
    np.save(tmp_path / "shard.npy", docs)
    queries = rng.standard_normal((3, 4)).astype(np.float32)
    search = SearchConfig(index="Flat", use_gpu="false")
    scores, positions = ev.shard_search(queries, tmp_path / "shard.npy", 1000, 200, search, "cpu")
    # every document (position 0 included) at 1000 + its place in the shard, best first, with its dot product
    assert sorted(positions[0].tolist()) == list(range(1000, 1200))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ docs.T, positions - 1000, 1), rtol=1e-5)
    # IVF, 4 lists: probing one list returns fewer than 200 documents: the missing places stay -1, the others
    # are global positions; probing all 4 finds every document again
    one = ev.shard_search(queries, tmp_path / "shard.npy", 1000, 200, SearchConfig(index="IVF4,Flat", nprobe=1,
                                                                                    use_gpu="false"), "cpu")[1]
    assert (one == -1).any() and ((one == -1) | ((one >= 1000) & (one < 1200))).all()
    four = ev.shard_search(queries, tmp_path / "shard.npy", 1000, 200, SearchConfig(index="IVF4,Flat", nprobe=4,
                                                                                     use_gpu="false"), "cpu")[1]
    assert sorted(four[1].tolist()) == list(range(1000, 1200))


def _hybrid():
    """2 queries and 3 documents: dense 3 dims, sparse over a vocabulary of 4.
    dense:  q0 = [1, 2, 0], q1 = [0, 1, -2];  d0 = [1, 0, 0], d1 = [0, 1, 1], d2 = [2, 2, 2]
            q0.d = 1, 2, 6;   q1.d = 0, -1, -2
    sparse: q0 = {0: 1, 2: 2}, q1 = {3: 0.5};  d0 = {0: 3}, d1 = {2: 1, 3: 4}, d2 = {}
            q0.d = 3, 2, 0;   q1.d = 0, 2, 0
    joint:  q0 = 4, 4, 6;     q1 = 0, 1, -2"""
    queries = HybridVectors(np.array([[1, 2, 0], [0, 1, -2]], np.float32),
                            csr_matrix(np.array([[1, 0, 2, 0], [0, 0, 0, 0.5]], np.float32)))
    docs = HybridVectors(np.array([[1, 0, 0], [0, 1, 1], [2, 2, 2]], np.float32),
                         csr_matrix(np.array([[3, 0, 0, 0], [0, 0, 1, 4], [0, 0, 0, 0]], np.float32)))
    return queries, docs


def test_joint_scores_are_dense_plus_sparse_dots_by_hand():
    queries, docs = _hybrid()
    both = joint_scores(queries, docs, slice(0, 2))
    assert both.dtype == np.float64 and both.tolist() == [[4, 4, 6], [0, 1, -2]]
    assert joint_scores(queries, docs, slice(1, 2)).tolist() == [[0, 1, -2]]


def test_exact_search_ranks_by_joint_score_ties_by_position_in_batches():
    queries, docs = _hybrid()
    # q0: 6@2 then the tie 4@0, 4@1; q1: 1@1 0@0 -2@2; batches of one query
    scores, positions = exact_search(queries, docs, 2, batch=1)
    assert scores.dtype == np.float32 and scores.tolist() == [[6, 4], [1, 0]]
    assert positions.tolist() == [[2, 0], [1, 0]]
    scores, positions = exact_search(queries, docs, 10)  # k beyond the corpus: all 3
    assert scores.tolist() == [[6, 4, 4], [1, 0, -2]] and positions.tolist() == [[2, 0, 1], [1, 0, 2]]


def test_exact_search_keeps_the_first_of_documents_tied_at_the_cut():
    # 1000 documents whose scores are 0, 1 or 2: the top 5 are the first 5 documents scoring 2, as the pooled search
    # and the merge of shards rank ties (the partition alone could keep any of the tied ones)
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 3, (1000, 1)).astype(np.float32)
    docs = HybridVectors(dense, csr_matrix((1000, 5), dtype=np.float32))
    queries = HybridVectors(np.ones((2, 1), np.float32), csr_matrix((2, 5), dtype=np.float32))
    first_twos = np.flatnonzero(dense[:, 0] == 2)[:5].tolist()
    assert exact_search(queries, docs, 5)[1].tolist() == [first_twos, first_twos]
    assert pooled_search(queries, docs, 5, pool=10, use_gpu=False)[1].tolist() == [first_twos, first_twos]


def _pool_case():
    """Two identical queries, dense [1]; 4 documents with dense 4, 3, 2, 1; the query shares vocabulary entry 0 with d3 only
    (sparse 5) and entry 1 with d2 (0.5): joint d0 4, d1 3, d2 2.5, d3 6."""
    queries = HybridVectors(np.array([[1], [1]], np.float32), csr_matrix(np.array([[1, 1], [1, 1]], np.float32)))
    docs = HybridVectors(np.array([[4], [3], [2], [1]], np.float32),
                         csr_matrix(np.array([[0, 0], [0, 0], [0, 0.5], [5, 0]], np.float32)))
    return queries, docs


def test_pooled_search_adds_what_the_sparse_part_lifts_over_the_pool():
    queries, docs = _pool_case()
    # pool of 2 dense candidates: d0 d1, joint 4 3; k = 1: the k-th joint score 4, the pool's floor 3, margin 0.004.
    # 4 > 3.004: bounded; d3 can reach 3 + 5 = 8 >= 3.996: added; d2 only 3 + 0.5 = 3.5: not. Best: d3 at 6
    stats = {}
    scores, positions = pooled_search(queries, docs, 1, pool=2, use_gpu=False, stats=stats)
    assert positions.tolist() == [[3], [3]] and scores.tolist() == [[6], [6]]
    assert stats == {"added_by_bound": 2, "queries_scored_in_full": 0}  # counted over both queries
    # k = 2: the k-th joint score of the pool is 3 = the floor: nothing bounds the rest: every document scored
    stats = {}
    scores, positions = pooled_search(queries, docs, 2, pool=2, use_gpu=False, stats=stats)
    assert positions.tolist() == [[3, 0], [3, 0]] and scores.tolist() == [[6, 4], [6, 4]]
    assert stats == {"added_by_bound": 0, "queries_scored_in_full": 2}


def test_pooled_search_with_a_pool_of_the_whole_corpus_needs_no_bound():
    # 3 documents, dense 3 2 1, no sparse overlap; pool 5 >= 3 documents: all are candidates, none added, none
    # counted as scored in full (the k-th joint score 1 equals the floor 1 here, so a bound would have fired)
    queries = HybridVectors(np.array([[1]], np.float32), csr_matrix((1, 2), dtype=np.float32))
    docs = HybridVectors(np.array([[3], [2], [1]], np.float32), csr_matrix((3, 2), dtype=np.float32))
    stats = {}
    scores, positions = pooled_search(queries, docs, 3, pool=5, use_gpu=False, stats=stats)
    assert positions.tolist() == [[0, 1, 2]] and scores.tolist() == [[3, 2, 1]]
    assert stats == {"added_by_bound": 0, "queries_scored_in_full": 0}
    # k beyond the corpus: 3 columns
    assert pooled_search(queries, docs, 10, pool=2, use_gpu=False)[1].shape == (1, 3)
    # the defaults: a pool of 1000 (all 3 here) in an exact index, on a GPU if there is one
    assert pooled_search(queries, docs, 2)[1].tolist() == [[0, 1]]


def test_pooled_search_in_batches_equals_exact_by_hand():
    queries, docs = _hybrid()
    # pool of 1 dense candidate per query, batches of one query: q0 d2 (dense 6), q1 d0 (dense 0, the best of 0 -1 -2)
    stats = {}
    scores, positions = pooled_search(queries, docs, 2, pool=1, use_gpu=False, batch=1, stats=stats)
    assert scores.tolist() == [[6, 4], [1, 0]] and positions.tolist() == [[2, 0], [1, 0]]


def test_pooled_search_margin_is_a_thousandth_of_at_least_one():
    # dense d0 0.5, d1 0.4985, d2 0; no sparse; pool 2, k 1: kth 0.5, floor 0.4985, margin 1e-3 * max(0.5, 1) = 0.001:
    # 0.5 > 0.4995: bounded, nothing added, not scored in full
    queries = HybridVectors(np.array([[1]], np.float32), csr_matrix((1, 2), dtype=np.float32))
    docs = HybridVectors(np.array([[0.5], [0.4985], [0]], np.float32), csr_matrix((3, 2), dtype=np.float32))
    stats = {}
    assert pooled_search(queries, docs, 1, pool=2, use_gpu=False, stats=stats)[1].tolist() == [[0]]
    assert stats == {"added_by_bound": 0, "queries_scored_in_full": 0}
    # d1 at 0.4995 instead: within the margin of the k-th score: scored in full
    docs.dense[1, 0] = 0.49951
    pooled_search(queries, docs, 1, pool=2, use_gpu=False, stats=stats)
    assert stats == {"added_by_bound": 0, "queries_scored_in_full": 1}


def test_pooled_search_bounds_are_inclusive():
    # at 1000 the margin is 1e-3 x 1000 = 1 exactly, and every sum below is exact in float32 and float64.
    # dense d0 1000, d1 999, d2 0; pool 2, k 1: kth 1000 <= floor 999 + margin 1: scored in full
    query = HybridVectors(np.array([[1]], np.float32), csr_matrix(np.array([[1, 1]], np.float32)))
    docs = HybridVectors(np.array([[1000], [999], [0]], np.float32), csr_matrix((3, 2), dtype=np.float32))
    stats = {}
    assert pooled_search(query, docs, 1, pool=2, use_gpu=False, stats=stats)[1].tolist() == [[0]]
    assert stats == {"added_by_bound": 0, "queries_scored_in_full": 1}
    # dense d0 1000, d1 998, d2 0, d3 0; sparse d2 1, d3 0.5: kth 1000 > 998 + 1: bounded. d2 may reach
    # 998 + 1 = 999 = kth - margin: added (the bound is inclusive); d3 only 998.5: not
    docs = HybridVectors(np.array([[1000], [998], [0], [0]], np.float32),
                         csr_matrix(np.array([[0, 0], [0, 0], [1, 0], [0, 0.5]], np.float32)))
    stats = {}
    assert pooled_search(query, docs, 1, pool=2, use_gpu=False, stats=stats)[1].tolist() == [[0]]
    assert stats == {"added_by_bound": 1, "queries_scored_in_full": 0}


class FakeHybridEncoder:
    """Texts 'text of dN' and query texts map to the rows of `_hybrid()`."""

    device = torch.device("cpu")

    def __init__(self):
        self.queries, self.docs = _hybrid()

    def encode(self, texts, kind):
        assert kind in ("query", "passage")
        source = self.queries if kind == "query" else self.docs
        rows = [int(t.split()[-1][1:]) for t in texts]
        return HybridVectors(source.dense[rows], source.sparse[rows])


@pytest.mark.parametrize("hybrid_search", ["exact", "pooled"])
def test_hybrid_run_over_four_processes_with_one_empty_shard(tmp_path, hybrid_search, monkeypatch):
    # 3 documents over 4 processes: one process holds none; the merged top 2 is exact_search's by hand
    from retromae.retrieval import hybrid

    calls = []
    for name in ("exact_search", "pooled_search"):
        def spy(*args, _name=name, _search=getattr(hybrid, name), **kwargs):
            calls.append((_name, args[2:], kwargs))
            return _search(*args, **kwargs)
        monkeypatch.setattr(hybrid, name, spy)
    data = data_of(ids=["d0", "d1", "d2"], queries={"x": "q0", "y": "q1"})
    search = SearchConfig(representation="dupmae", hybrid_search=hybrid_search, candidate_pool=1, use_gpu="false")
    found = in_threads(4, lambda state: ev.hybrid_run(FakeHybridEncoder(), data, search, tmp_path, state, 2))
    # the 3 processes holding a document search it the way asked: pooled with the pool, index and GPU setting
    expected = ("exact_search", (2,), {}) if hybrid_search == "exact" else ("pooled_search", (2, 1, "Flat", False), {})
    assert calls == [expected] * 3
    assert found[1:] == [None, None, None]
    query_ids, scores, positions = found[0]
    assert query_ids == ["x", "y"]
    assert scores.tolist() == [[6, 4], [1, 0]] and positions.tolist() == [[2, 0], [1, 0]]


class FakeLayerEncoder:
    """Dense vectors of 2 layers x 3 coordinates: [layer 1 | layer 3], from a table by text."""

    device = torch.device("cpu")
    tokenizer = None
    table = {"text of d0": [1, 0, 0, 0, 0, 1], "text of d1": [0, 2, 0, 0, 1, 0], "text of d2": [0, 0, 3, 1, 0, 0],
             "q0": [1, 1, 1, 1, 2, 3], "q1": [0, 1, 0, 3, 0, 0]}

    def __init__(self):
        self.dimension, self.layers = 3, None

    def with_layers(self, layers):
        self.layers, self.dimension = list(layers), 3 * len(layers)
        return self

    def encode(self, texts, kind, show_progress=False, out=None):
        assert kind in ("query", "passage")
        # the table's blocks are the layers in the order asked: a run of fewer layers (or a dense run) gets the
        # first `dimension` coordinates (a shard row holds exactly that many: ShardWriter refuses more)
        out[0:len(texts)] = np.array([self.table[t][:self.dimension] for t in texts], np.float32)


def test_layer_and_dim_grid_scores_the_first_dims_of_each_layers_own_vector(tmp_path):
    # 3 documents over 2 processes (d0 | d1 d2), top 2, ties by position; q . d over the first `dim` coordinates of
    # the layer's block of 3 (layer 1: columns 0-2, layer 3: columns 3-5), no re-normalisation:
    # (1, 1): q0 1 0 0 -> d0 d1 (1 0);  q1 0 0 0 -> d0 d1 (0 0)
    # (1, 3): q0 1 2 3 -> d2 d1 (3 2);  q1 0 2 0 -> d1 d0 (2 0)
    # (3, 1): q0 0 0 1 -> d2 d0 (1 0);  q1 0 0 3 -> d2 d0 (3 0)
    # (3, 3): q0 3 2 1 -> d0 d1 (3 2);  q1 0 0 3 -> d2 d0 (3 0)
    data = data_of(ids=["d0", "d1", "d2"], queries={"x": "q0", "y": "q1"})
    search = SearchConfig(layers=[1, 3], dims=[1, 3], use_gpu="false")
    found = in_threads(2, lambda state: ev.matryoshka_run(FakeLayerEncoder(), data, search, tmp_path, state, 2))
    assert found[1] is None
    expected = {(1, 1): ([[0, 1], [0, 1]], [[1, 0], [0, 0]]), (1, 3): ([[2, 1], [1, 0]], [[3, 2], [2, 0]]),
                (3, 1): ([[2, 0], [2, 0]], [[1, 0], [3, 0]]), (3, 3): ([[0, 1], [2, 0]], [[3, 2], [3, 0]])}
    assert sorted(found[0]) == sorted(expected)
    for cell, (positions, scores) in expected.items():
        query_ids, got_scores, got_positions = found[0][cell]
        assert query_ids == ["x", "y"]
        assert (got_positions.tolist(), got_scores.tolist()) == (positions, scores), cell
    # one process, the same grid; a dim of the layer's whole width (3) is accepted, one more is refused
    (tmp_path / "one").mkdir()
    (tmp_path / "four").mkdir()
    one = ev.matryoshka_run(FakeLayerEncoder(), data, search, tmp_path / "one", FakeProcess(0, 1), 2)
    # (the untied places only: a single FAISS search may keep either of two documents tied at the cut)
    assert one[(1, 3)][2][0].tolist() == [2, 1] and one[(3, 3)][2][:, 0].tolist() == [0, 2]
    with pytest.raises(ConfigError, match="dims: 4 is wider than the model's 3"):
        ev.matryoshka_run(FakeLayerEncoder(), data, SearchConfig(layers=[1, 3], dims=[4]), tmp_path / "four",
                          FakeProcess(0, 1), 2)


def test_dense_run_over_two_processes(tmp_path):
    # the whole vectors (dimension 3: the layer-1 block only, as no layers are asked): q0 . d = 1 2 3, q1 . d = 0 2 0
    data = data_of(ids=["d0", "d1", "d2"], queries={"x": "q0", "y": "q1"})

    class Dense(FakeLayerEncoder):
        table = {t: v[:3] for t, v in FakeLayerEncoder.table.items()}

    found = in_threads(2, lambda state: ev.dense_run(Dense(), data, SearchConfig(use_gpu="false"), tmp_path, state, 2))
    assert found[1] is None
    assert found[0][0] == ["x", "y"]
    assert found[0][1].tolist() == [[3, 2], [2, 0]] and found[0][2].tolist() == [[2, 1], [1, 0]]


# ----- scratch folders -------------------------------------------------------------------------------------------


def test_check_space_everywhere_stops_when_the_folder_is_short(tmp_path):
    ev.check_space_everywhere(tmp_path, 0, "nothing")
    with pytest.raises(ConfigError, match=r"encoding the corpus needs"):
        ev.check_space_everywhere(tmp_path, 10**18, "encoding the corpus")


def test_shared_work_dir_is_a_fresh_hidden_folder_under_the_root(tmp_path):
    work = ev._shared_work_dir(FakeProcess(0, 1), tmp_path / "root")
    assert work.is_dir() and work.parent == tmp_path / "root"
    assert work.name.startswith(".retromae-shards-") and work.name.endswith(".tmp")


# ----- tables ----------------------------------------------------------------------------------------------------


def test_format_table_exact_text():
    rows = [{"dataset": "a", "ndcg@10": 0.5, "map": 1}, {"dataset": "b", "ndcg@10": 0.12345, "map": None}]
    assert ev.format_table(rows, ["ndcg@10", "map"]) == (
        "| dataset | ndcg@10 | map |\n|---|---:|---:|\n| a | 0.5000 | 1.0000 |\n| b | 0.1235 | – |\n")
    assert ev.format_table([{"model": "m", "mrr": 0.25}], ["mrr"], first="model") == (
        "| model | mrr |\n|---|---:|\n| m | 0.2500 |\n")


def _grid_result():
    cells = {"1x8": (0.1, 0.5), "1x16": (0.2, 0.6), "2x8": (0.3, 0.7), "2x16": (0.4, 0.8)}
    return {"dataset": "tiny", "matryoshka": {k: {"ndcg@10": a, "map": b} for k, (a, b) in cells.items()}}


def test_matryoshka_table_rows_are_layers_columns_dims():
    search = SearchConfig(metrics=["ndcg@10", "map"], layers=[1, 2], dims=[8, 16])
    head = "by layer (rows) and dimensions (columns)\n\n| layer | 8 | 16 |\n|---|---:|---:|\n"
    assert ev.matryoshka_table(_grid_result(), search) == (
        "ndcg@10 " + head + "| 1 | 0.1000 | 0.2000 |\n| 2 | 0.3000 | 0.4000 |\n")
    assert ev.matryoshka_table(_grid_result(), search, "map") == (
        "map " + head + "| 1 | 0.5000 | 0.6000 |\n| 2 | 0.7000 | 0.8000 |\n")


def _png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk
    return width, height


def test_write_matryoshka_table_and_heatmap(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    search = SearchConfig(metrics=["map", "ndcg@10"], layers=[1, 2], dims=[8, 16])
    ev.write_matryoshka(_grid_result(), search, tmp_path / "out.json")
    assert (tmp_path / "out.matryoshka.md").read_text() == ev.matryoshka_table(_grid_result(), search)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.matryoshka.md", "out.matryoshka.png"]
    # figure (1.2 + 0.9 x 2 dims) x (1.0 + 0.6 x 2 layers) inches at 120 dpi
    assert _png_size(tmp_path / "out.matryoshka.png") == (360, 264)
    ax = figures[0].axes[0]
    assert ax.get_title() == "tiny: map" and (ax.get_xlabel(), ax.get_ylabel()) == ("dimensions", "layer")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2"]
    image = ax.get_images()[0]
    assert image.get_array().tolist() == [[0.5, 0.6], [0.7, 0.8]] and image.origin == "lower"
    assert image.get_cmap().name == "viridis"
    # the cells' values at (column, row); white on the darker half (below the mean 0.65), black on the lighter
    texts = [(t.get_position(), t.get_text(), t.get_color()) for t in ax.texts]
    assert texts == [((0, 0), "0.500", "white"), ((1, 0), "0.600", "white"), ((0, 1), "0.700", "black"),
                     ((1, 1), "0.800", "black")]
    assert all((t.get_ha(), t.get_va(), t.get_fontsize()) == ("center", "center", 7) for t in ax.texts)
    assert len(figures[0].axes) == 2, "the colour bar"


# ----- suites ----------------------------------------------------------------------------------------------------


def test_load_suite_applies_overrides_over_the_file(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("name: beir\ndatasets: [a, b]\nsearch:\n  metrics: [ndcg@10]\n")
    suite = ev.load_suite(str(path), {"name": "other", "split": "dev"})
    assert (suite.name, suite.datasets, suite.split, suite.search.metrics) == ("other", ["a", "b"], "dev", ["ndcg@10"])
    assert ev.load_suite(str(path)).name == "beir"
    path.write_text("name: beir\ndatasetz: [a]\n")
    with pytest.raises(ConfigError, match=r"suite\.yaml"):
        ev.load_suite(str(path))


def write_beir(folder: Path, docs: dict, queries: dict, qrels: list[tuple[str, str]]) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                                                 for i, t in docs.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n"
                                                                                      for q, d in qrels))
    return folder


def tiny_beir(folder: Path) -> Path:
    return write_beir(folder, {"d0": "apple", "d1": "pear"}, {"q0": "apple"}, [("q0", "d0")])


@pytest.fixture
def fake_evaluations(monkeypatch):
    """evaluate_model replaced: each dataset's results from a table (by the folder's name); its calls recorded."""
    results = {"a": {"ndcg@10": 0.5, "recall@100": 1.0}, "p1": {"ndcg@10": 0.2, "recall@100": 0.0},
               "p2": {"ndcg@10": 0.4, "recall@100": 1.0}}
    calls, built = [], []

    def evaluate_model(model, data, split, encode, search, encoder=None):
        calls.append({"model": model, "dataset": Path(data.sources["corpus"]).parent.name, "split": data.split,
                      "asked_split": split, "encode": encode, "search": search, "encoder": encoder})
        return dict(results[calls[-1]["dataset"]])

    def make_encoder(model, encode, search, device):
        built.append((model, encode, search))
        return f"encoder of {model}"

    monkeypatch.setattr(ev, "evaluate_model", evaluate_model)
    monkeypatch.setattr(ev, "make_encoder", make_encoder)
    return calls, built


def test_run_suite_table_groups_average_and_notes(tmp_path, fake_evaluations, capsys):
    calls, built = fake_evaluations
    root = tmp_path / "root"
    for name in ("a", "g/p1", "g/p2"):
        tiny_beir(root / name)
    suite = SuiteConfig(name="t", data_root=str(root), datasets=["a", "missing"], groups={"g": ["p1", "p2"]},
                        search=SearchConfig(metrics=["ndcg@10", "recall@100"]))
    rows, table = ev.run_suite("m", suite, str(tmp_path / "out" / "t.md"))
    # g = mean of p1 and p2: ndcg (0.2 + 0.4) / 2 = 0.3, recall (0 + 1) / 2 = 0.5
    # average of the 2 rows: ndcg (0.5 + 0.3) / 2 = 0.4, recall (1 + 0.5) / 2 = 0.75
    assert rows == [{"dataset": "a", "ndcg@10": 0.5, "recall@100": 1.0},
                    {"dataset": "g", "ndcg@10": pytest.approx(0.3), "recall@100": 0.5}]
    note = (f"skipped missing: not found at {root / 'missing'} (missing: not among the public datasets `retromae "
            "data get` knows; put it there in BEIR layout, or set data_root)")
    assert table == ("### t: m\n\n| dataset | ndcg@10 | recall@100 |\n|---|---:|---:|\n"
                     "| a | 0.5000 | 1.0000 |\n| g | 0.3000 | 0.5000 |\n| **average (2 of 3)** | 0.4000 | 0.7500 |\n"
                     f"\n- {note}\n")
    assert (tmp_path / "out" / "t.md").read_text() == table
    # said as it happens: a, then the missing one, then the group
    assert capsys.readouterr().out.splitlines() == ["a: ndcg@10 0.5000  recall@100 1.0000", note,
                                                    "g: ndcg@10 0.3000  recall@100 0.5000"]
    # one encoder for the suite, passed to every evaluation; the scratch beside the output; the suite's split
    assert [c["dataset"] for c in calls] == ["a", "p1", "p2"] and len(built) == 1
    assert all(c["encoder"] == "encoder of m" and c["model"] == "m" for c in calls)
    assert all(c["search"].work_dir == str((tmp_path / "out").resolve()) for c in calls)
    assert all(c["asked_split"] is None and c["split"] == "test" for c in calls)
    assert suite.search.work_dir is None, "the caller's suite is not changed"


def test_run_suite_keeps_a_given_work_dir_builds_no_encoder_for_bm25_and_writes_only_when_asked(tmp_path,
                                                                                              fake_evaluations):
    calls, built = fake_evaluations
    tiny_beir(tmp_path / "a")
    (tmp_path / "a" / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td1\t1\n")
    suite = SuiteConfig(name="t", data_root=str(tmp_path), datasets=["a"], split="dev",
                        search=SearchConfig(metrics=["ndcg@10"], work_dir=str(tmp_path / "scratch")))
    rows, table = ev.run_suite("bm25", suite, str(tmp_path / "t.md"))
    assert built == [] and calls[0]["encoder"] is None and (calls[0]["asked_split"], calls[0]["split"]) == ("dev",) * 2
    assert calls[0]["search"].work_dir == str(tmp_path / "scratch")
    assert table.endswith("| a | 0.5000 |\n| **average (1 of 1)** | 0.5000 |\n")
    rows, table = ev.run_suite("m", SuiteConfig(name="t", data_root=str(tmp_path), datasets=["a"],
                                                search=SearchConfig(metrics=["ndcg@10"])), None)
    assert calls[-1]["search"].work_dir is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "t.md"]


def test_run_suite_skips_an_unreadable_dataset_and_stops_when_none_is_left(tmp_path, fake_evaluations):
    tiny_beir(tmp_path / "a")
    (tmp_path / "broken").mkdir()  # a folder without a corpus
    # the unreadable one last: what was evaluated before it still counts; a group named by its first missing part
    suite = SuiteConfig(name="t", data_root=str(tmp_path), datasets=["a", "broken"], groups={"h": ["x1", "x2"]},
                        search=SearchConfig(metrics=["ndcg@10"]))
    rows, table = ev.run_suite("m", suite)
    assert [r["dataset"] for r in rows] == ["a"] and "average (1 of 3)" in table
    assert "\n- skipped broken: " in table
    assert f"\n- skipped h: not found at {tmp_path / 'h' / 'x1'} (x1: not among" in table
    with pytest.raises(CorpusError, match=r"^suite 't': no dataset could be evaluated; skipped broken: "):
        ev.run_suite("m", SuiteConfig(name="t", data_root=str(tmp_path), datasets=["broken"],
                                      search=SearchConfig(metrics=["ndcg@10"])))
    with pytest.raises(CorpusError, match=r"^suite 't': none of its datasets \(x, y\) is under "):
        ev.run_suite("m", SuiteConfig(name="t", data_root=str(tmp_path), datasets=["x"], groups={"y": ["z"]}))


def test_empty_suite_message_in_each_case(tmp_path, monkeypatch):
    suite = SuiteConfig(name="s", data_root=str(tmp_path))
    assert ev.empty_suite_message(suite, [], []) == "suite 's' names no dataset (datasets: [...] in its file)"
    entries = [("x", [tmp_path / "x"]), ("y", [tmp_path / "y"])]
    notes = [f"skipped x: not found at {tmp_path / 'x'}", "skipped y: bad line", "skipped z: no queries"]
    assert ev.empty_suite_message(suite, entries, notes) == (
        "suite 's': no dataset could be evaluated; skipped y: bad line; skipped z: no queries")
    get = ("x, y: not among the public datasets `retromae data get` knows; put them there in BEIR layout")
    assert ev.empty_suite_message(suite, entries, notes[:1]) == (
        f"suite 's': none of its datasets (x, y) is under {tmp_path}; {get}, or point --data-root at a folder "
        "that holds them")
    monkeypatch.chdir(tmp_path)
    relative = SuiteConfig(name="s", data_root="data")
    assert ev.empty_suite_message(relative, entries, []) == (
        f"suite 's': none of its datasets (x, y) is under data (relative to {tmp_path}); {get}, or point "
        "--data-root at a folder that holds them")


# ----- evaluate_model --------------------------------------------------------------------------------------------


def test_one_more_document_is_retrieved_when_the_query_id_is_dropped(tmp_path):
    # the query's id is d1's; BM25 ranks d1 (3 x apple) above d2 (1 x apple in 5 words). Depth 1 under BEIR's rule:
    # 2 retrieved, d1 dropped, d2 kept: recall@1 = 1 (retrieving 1 only would leave nothing)
    folder = write_beir(tmp_path / "t", {"d1": "apple apple apple", "d2": "apple pie crust with cream", "d3": "zebra"},
                        {"d1": "apple"}, [("d1", "d2")])
    out, run_file = tmp_path / "out.json", tmp_path / "run.trec"
    result = ev.evaluate_model("bm25", str(folder), None, None, SearchConfig(depth=1, metrics=["recall@1"]),
                               str(run_file), str(out))
    assert result["recall@1"] == 1.0
    assert (result["dataset"], result["split"], result["model"]) == ("t", "test", "bm25")
    assert (result["settings"]["k1"], result["settings"]["b"]) == (0.9, 0.4), "BM25's parameters with the run"
    assert json.loads(out.read_text()) == {**result, "per_query": {"d1": {"recall@1": 1.0}}}
    assert [line.split()[2] for line in run_file.read_text().splitlines()] == ["d2"]
    assert (result["settings"]["depth"], result["settings"]["ignore_identical_ids"]) == (1, True)
    assert result["settings"]["model"] == "bm25" and (result["num_queries"], result["num_documents"]) == (1, 3)
    kept = ev.evaluate_model("bm25", str(folder), None, None, SearchConfig(depth=1, metrics=["recall@1"],
                                                                           ignore_identical_ids=False))
    assert kept["recall@1"] == 0.0 and kept["settings"]["ignore_identical_ids"] is False


def test_readability_is_checked_once_per_collection_and_tokenizer_on_an_even_sample(monkeypatch):
    import retromae.inputs

    seen = []
    monkeypatch.setattr(retromae.inputs, "warn_if_unreadable", lambda tok, texts, name: seen.append((tok, texts, name)))
    monkeypatch.setattr(retromae.inputs, "SAMPLE_TEXTS", 3)
    monkeypatch.setattr(ev, "_READABILITY_CHECKED", set())

    class Tokenizer:
        def __init__(self, name):
            self.name_or_path = name

    data = data_of(ids=[f"d{i}" for i in range(7)])
    data.sources = {"corpus": "/c/corpus.jsonl"}
    one = Tokenizer("one")
    # 7 texts, 3 sampled: every 7 // 3 = 2nd text, the first 3 of them: d0 d2 d4
    ev.warn_if_unreadable_once(one, data, " ")
    assert seen == [(one, ["text of d0", "text of d2", "text of d4"], "/c/corpus.jsonl")]
    ev.warn_if_unreadable_once(Tokenizer("one"), data, " ")  # the same collection and tokenizer name: not again
    ev.warn_if_unreadable_once(None, data, " ")  # no tokenizer: nothing to check
    assert len(seen) == 1
    ev.warn_if_unreadable_once(Tokenizer("two"), data, " ")
    other = data_of(ids=["d0", "d1"])  # 2 texts: every one; no corpus source: the collection's name
    ev.warn_if_unreadable_once(one, other, " ")
    assert [(t.name_or_path, texts, name) for t, texts, name in seen[1:]] == [
        ("two", ["text of d0", "text of d2", "text of d4"], "/c/corpus.jsonl"), ("one", ["text of d0", "text of d1"], "tiny")]
