"""FAISS search equals a brute-force numpy top-k; indexes and their ids survive a save and a load."""

import numpy as np
import pytest

from retromae.retrieval.index import DenseIndex, run_from_hits


def brute_force(docs, queries, k):
    scores = queries @ docs.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def test_exact_search_equals_numpy_top_k():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((3000, 48)).astype(np.float32)
    queries = rng.standard_normal((70, 48)).astype(np.float32)
    ids = [f"doc{i}" for i in range(len(docs))]
    index = DenseIndex(48, use_gpu=False)
    index.add(docs[:1000], ids[:1000])
    index.add(docs[1000:], ids[1000:])  # added in two parts
    scores, hits = index.search(queries, 25, batch=16)
    expected_scores, expected_order = brute_force(docs, queries, 25)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-4)
    position = {d: i for i, d in enumerate(ids)}
    for q, (row, row_scores) in enumerate(zip(hits, scores)):
        true = np.array([queries[q] @ docs[position[d]] for d in row])
        np.testing.assert_allclose(true, row_scores, rtol=1e-5, atol=1e-4)  # each id carries its own score
        assert len(set(row)) == len(row) == 25
    # with the same scores as numpy's top-k, ids can only differ between exact ties: here there are none
    assert hits == [[ids[i] for i in order] for order in expected_order]


def test_depth_beyond_the_corpus_and_run_building():
    index = DenseIndex(4, use_gpu=False)
    index.add(np.eye(4, dtype=np.float32)[:3], ["a", "b", "c"])
    scores, hits = index.search(np.array([[0, 1, 0, 0]], dtype=np.float32), 10)
    assert hits[0][0] == "b" and sorted(hits[0]) == ["a", "b", "c"]
    run = run_from_hits(["q"], scores, hits)
    assert run["q"]["b"] == 1.0 and len(run["q"]) == 3


def test_save_and_load(tmp_path):
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((500, 16)).astype(np.float32)
    index = DenseIndex(16, use_gpu=False)
    index.add(docs, [f"id {i}" for i in range(500)])  # ids with spaces are fine
    index.save(tmp_path / "idx")
    loaded = DenseIndex.load(tmp_path / "idx", use_gpu=False)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    assert loaded.search(q, 7)[1] == index.search(q, 7)[1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_factory_string_for_approximate_search():
    rng = np.random.default_rng(2)
    docs = rng.standard_normal((2000, 32)).astype(np.float32)
    queries = docs[:50] + 0.01 * rng.standard_normal((50, 32)).astype(np.float32)
    index = DenseIndex(32, "HNSW32", use_gpu=False)
    index.add(docs, [str(i) for i in range(2000)])
    _, hits = index.search(queries, 1)
    assert sum(h[0] == str(i) for i, h in enumerate(hits)) >= 45  # near-duplicates found


def test_gpu_request_without_gpu_faiss_is_refused():
    from retromae.retrieval.index import faiss_gpus

    if faiss_gpus():
        pytest.skip("this faiss has GPUs")
    with pytest.raises(RuntimeError, match="no GPU support"):
        DenseIndex(8, use_gpu=True)
