"""Rules of the search backends pinned on tiny inputs whose answers are worked out by hand: which devices the torch
backend uses, the fp16 error bound and the proof that decides which queries are searched again in fp32, and the
faiss index's GPU placement, training sample, saving and loading (GPUs faked on the CPU, as in test_scale.py)."""

import sys

import numpy as np
import pytest
import torch

import retromae.distributed
import retromae.retrieval.index as index_module
from retromae.config import ConfigError
from retromae.retrieval.index import DenseIndex, faiss_gpus, own_gpu
from retromae.retrieval.search import TorchExact, approximation_bound, faiss_has_gpus, torch_devices, unit_roundoff
from test_scale import FakeGpuFaiss

# ----- which devices the torch backend uses ---------------------------------------------------------------------


def cuda(i):
    return torch.device("cuda", i)


def test_torch_devices_are_every_gpu_for_a_process_alone_else_its_own(monkeypatch):
    monkeypatch.setattr(retromae.distributed, "world", lambda: (0, 1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_devices(None) == [torch.device("cpu")]  # no GPU: the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    every_gpu = [cuda(0), cuda(1), cuda(2)]
    assert torch_devices(None) == every_gpu  # alone, no device named: all 3 GPUs
    assert torch_devices(cuda(0)) == every_gpu and torch_devices("cuda") == every_gpu
    assert torch_devices(torch.device("cpu")) == [torch.device("cpu")]  # a CPU device asked for stays the CPU
    assert torch_devices(cuda(1)) == [cuda(1)]  # a GPU other than the first: only that one
    for rank in (0, 2):  # a process of a launch of 4: its own device only, the first GPU included
        monkeypatch.setattr(retromae.distributed, "world", lambda rank=rank: (rank, 4))
        assert torch_devices(cuda(rank)) == [cuda(rank)]


def test_faiss_has_gpus_only_with_a_gpu_count_above_zero(monkeypatch):
    class Faiss:
        def __init__(self, gpus):
            self.gpus = gpus

        def get_num_gpus(self):
            return self.gpus

    monkeypatch.setitem(sys.modules, "faiss", Faiss(1))
    assert faiss_has_gpus() is True
    monkeypatch.setitem(sys.modules, "faiss", Faiss(0))
    assert faiss_has_gpus() is False
    monkeypatch.setitem(sys.modules, "faiss", object())  # a faiss without the GPU calls (CPU build)
    assert faiss_has_gpus() is False
    monkeypatch.setitem(sys.modules, "faiss", None)  # faiss not installed: `import faiss` fails
    assert faiss_has_gpus() is False


# ----- the fp16 first pass and its proof ------------------------------------------------------------------------

# fp16 has 10 explicit mantissa bits: eps = 2^-10, unit roundoff u = 2^-11; bf16: eps = 2^-7, u = 2^-8
U16 = 2.0**-11
# the bound for 4-dim vectors: 2 (3u + u^2 + 4 * 2^-24) = 2 (0.00146484375 + 2.384e-7 + 2.384e-7) = 0.0029306412
C16_D4 = 2 * (3 * U16 + U16 * U16 + 4 * 2.0**-24)


def test_unit_roundoff_and_the_fp16_error_bound_by_hand():
    assert unit_roundoff(torch.float16) == 2.0**-11 and unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff(torch.float32) == 2.0**-24
    # 768 dims in fp16: 2 (3 * 2^-11 + 2^-22 + 768 * 2^-24) = 2 (0.00146484375 + 0.000000238418579 + 0.0000457763671875)
    assert approximation_bound(torch.float16, 768) == pytest.approx(0.003021717071533203, rel=1e-12)
    assert approximation_bound(torch.float16, 4) == pytest.approx(0.0029306411743164062, rel=1e-12)
    # the bound holds: |fp16 product (fp32 accumulation) - exact| <= c |q| |d|, on random 768-dim vectors
    rng = np.random.default_rng(0)
    q, d = rng.standard_normal((8, 768)), 3 * rng.standard_normal((50, 768))
    half = (torch.tensor(q).half().float() @ torch.tensor(d).half().float().T).half().double().numpy()
    limit = approximation_bound(torch.float16, 768) * np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(d, axis=1)
    assert (np.abs(half - q @ d.T) <= limit).all()


def e(i, value=1.0, d=4):
    row = np.zeros(d, np.float32)
    row[i] = value
    return row


def rows(*first, extra=()):
    """Passages whose score for the query e(0) is the given first coordinate (all exact in fp16), then `extra`."""
    return np.array([e(0, v) for v in first] + list(extra), np.float32)


def fp16_search(docs, queries, k, margin=None, chunk_rows=1 << 20, query_batch=1024):
    """The GPU path of the torch backend (fp16 first pass, fp32 re-score) run on the CPU; its result must equal the
    numpy brute force: the scores, and the positions wherever the top-k scores are not tied."""
    search = TorchExact(docs, [torch.device("cpu")], dtype=torch.float16, chunk_rows=chunk_rows, margin=margin)
    scores, positions = search.search(np.asarray(queries, np.float32), k, query_batch=query_batch)
    brute = np.asarray(queries, np.float64) @ docs.astype(np.float64).T
    order = np.argsort(-brute, axis=1, kind="stable")[:, :k]
    expected = np.take_along_axis(brute, order, 1)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-3)
    np.testing.assert_allclose(np.take_along_axis(brute, positions, 1), expected, rtol=0, atol=1e-3)
    return search, scores, positions


def test_the_proof_holds_when_the_last_candidate_plus_the_bound_is_below_the_kth_score():
    # k = 2, margin 1: candidates are the top 3 by fp16 (10, 9, 8); the k-th exact score is 9; the largest passage
    # norm is 10, so a passage left out scores at most 8 + 0.00293 * 1 * 10 = 8.029 < 9: proven, no fallback
    docs = rows(10, 9, 8, 1, 1, 1)
    search, scores, positions = fp16_search(docs, [e(0)], 2, margin=1)
    assert positions.tolist() == [[0, 1]] and scores.tolist() == [[10, 9]]
    assert search.fallbacks == 0
    # the 2nd candidate (9) in place of the last would give 9.03 >= 9: unproven


def test_a_tie_at_the_kth_score_is_searched_again():
    # top 3 by fp16: 10, 9, 9; k-th exact score 9; ceiling 9 + 0.0293 >= 9: unproven (a passage left out could tie
    # the k-th and win by its position), searched again in fp32: one fallback per query and chunk
    docs = rows(10, 9, 9, 1, 1, 1)
    search, scores, _ = fp16_search(docs, [e(0)], 2, margin=1)
    assert scores.tolist() == [[10, 9]] and search.fallbacks == 1
    # two queries searched one block at a time: the count adds up over blocks
    search, _, _ = fp16_search(docs, [e(0), e(0)], 2, margin=1, query_batch=1)
    assert search.fallbacks == 2


def test_a_zero_query_proves_nothing_and_is_searched_again():
    # the zero query scores 0 everywhere with an error bound of 0: ceiling 0, k-th score 0; 0 < 0 fails, so it is
    # searched again (a passage left out may tie); the query e(0) is proven as above: 1 fallback in all
    docs = rows(10, 9, 8, 1, 1, 1)
    search, scores, positions = fp16_search(docs, [np.zeros(4), e(0)], 2, margin=1)
    assert scores.tolist() == [[0, 0], [10, 9]] and positions[1].tolist() == [0, 1]
    assert search.fallbacks == 1


def test_the_error_bound_is_per_query_norm_times_the_largest_passage_norm():
    # k = 1, margin 1: candidates 10 and 9.75; three passages of norm 64 (score 0) make the largest norm 64:
    # ceiling = 9.75 + 0.0029306 * |q| * 64 = 9.75 + 0.18756 = 9.93756 < 10: proven for each query of norm 1.
    # A bound 1.5 x larger (0.281), or |q| taken over the block of 2 queries (sqrt 2: 0.265), or the norm of the whole
    # chunk (~112: 0.33) would reach 10.
    big = [e(1, 64), e(2, 64), e(3, 64)]
    docs = rows(10, 9.75, 9.5, 1, extra=big)
    assert 9.75 + C16_D4 * 64 < 10 < 9.75 + C16_D4 * 64 * 2**0.5
    search, scores, positions = fp16_search(docs, [e(0), e(0)], 1, margin=1)
    assert positions.tolist() == [[0], [0]] and scores.tolist() == [[10], [10]]
    assert search.fallbacks == 0
    # with the 2nd-to-last candidate (10) as the ceiling the proof would fail: 10 + 0.19 >= 10


def test_a_given_margin_sets_the_candidates_and_all_candidates_need_no_proof():
    tied = rows(1, 1, 1, 1, 1, 1)
    # margin 1, k 1: 2 candidates of 6; ceiling 1 + bound >= 1: searched again
    search, _, _ = fp16_search(tied, [e(0)], 1, margin=1)
    assert search.fallbacks == 1
    # k + margin = 3 = every passage of the chunk: all are re-scored in fp32, none left out, nothing to prove
    search, scores, _ = fp16_search(tied[:3], [e(0)], 2, margin=1)
    assert scores.tolist() == [[1, 1]] and search.fallbacks == 0
    # k + margin beyond the chunk: the same
    search, _, _ = fp16_search(tied[:2], [e(0)], 1, margin=5)
    assert search.fallbacks == 0


def test_the_default_margin_is_64_or_a_quarter_of_k():
    # k = 1: 1 + 64 = 65 candidates; 66 tied passages leave one out: searched again; 65 passages leave none
    tied = np.tile(e(0), (501, 1))
    assert fp16_search(tied[:66], [e(0)], 1)[0].fallbacks == 1
    assert fp16_search(tied[:65], [e(0)], 1)[0].fallbacks == 0
    # k = 400: 400 + 400 // 4 = 500 candidates; 500 passages leave none out, 501 leave one
    assert fp16_search(tied[:500], [e(0)], 400)[0].fallbacks == 0
    assert fp16_search(tied, [e(0)], 400)[0].fallbacks == 1


def test_a_query_whose_fp16_scores_overflow_is_searched_again_alone():
    # 300 * 300 = 90000 > 65504 (fp16's largest): the first query's fp16 scores overflow, it is searched again; the
    # second query of the same block (largest passage norm 300: 8 + 0.0029306 * 300 = 8.88 < 9) is proven
    docs = rows(10, 9, 8, 1, 1, 1, extra=[e(1, 300)])
    search, scores, positions = fp16_search(docs, [e(1, 300), e(0)], 2, margin=1)
    assert positions[0, 0] == 6 and scores[0].tolist() == [90000, 0]
    assert positions[1].tolist() == [0, 1] and search.fallbacks == 1


def test_the_first_pass_is_fp16_on_gpus_and_fp32_with_one_copy_elsewhere():
    # no rows: nothing is copied to the (absent) GPU, only the precision is chosen
    assert TorchExact(np.zeros((0, 4), np.float32), [cuda(0)]).dtype == torch.float16
    docs = rows(10, 9, 8, 1, 1, 1)
    search = TorchExact(docs, [torch.device("cpu")], chunk_rows=4)
    assert search.dtype == torch.float32
    assert [low for _, _, low, _ in search.chunks] == [None, None], "fp32: no second copy of any chunk"
    scores, positions = search.search(np.array([e(0)]), 3)
    assert positions.tolist() == [[0, 1, 2]] and scores.tolist() == [[10, 9, 8]] and search.fallbacks == 0


# ----- faiss indexes ---------------------------------------------------------------------------------------------


def vectors(n, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def top(docs, queries, k):
    return np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :k]


def test_own_gpu_is_the_device_index_else_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(retromae.distributed, "world", lambda: (0, 1))
    assert own_gpu(cuda(3)) is None  # alone: every GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one process group per node: still one GPU each
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert own_gpu(None) == 1
    monkeypatch.setattr(retromae.distributed, "world", lambda: (1, 2))
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert own_gpu(None) == 3 and own_gpu(cuda(2)) == 2
    assert own_gpu(torch.device("cpu")) == own_gpu(torch.device("cpu", 0)) == 3  # only a CUDA device names a GPU
    monkeypatch.delenv("LOCAL_RANK")
    assert own_gpu(None) == 0


def test_an_index_without_ids_answers_positions_and_clips_k(tmp_path):
    if faiss_gpus():
        pytest.skip("the default use_gpu is a CPU index only where faiss has no GPUs")
    docs = np.eye(4, dtype=np.float32)[:3] * np.array([[3], [2], [1]], np.float32)  # scores 3, 2, 1 for all-ones
    index = DenseIndex(4)  # use_gpu "auto" on a CPU faiss: a CPU index
    assert not index.on_gpu
    index.add(docs)
    assert len(index) == 3
    scores, positions = index.search_positions(np.ones((1, 4), np.float32), 10)
    assert positions.tolist() == [[0, 1, 2]] and scores.tolist() == [[3, 2, 1]]  # k clipped to the 3 vectors
    assert index.search(np.ones((1, 4), np.float32), 2)[1] == [["0", "1"]]  # ids are the positions
    empty = index.search_positions(np.zeros((0, 4), np.float32), 10)
    assert empty[0].shape == empty[1].shape == (0, 3)
    assert empty[0].dtype == np.float32 and empty[1].dtype == np.int64
    index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "ids.txt").read_text() == "0\n1\n2\n"
    assert DenseIndex.load(tmp_path / "idx").search(np.ones((1, 4), np.float32), 1)[1] == [["0"]]


def test_queries_are_searched_batch_rows_at_a_time():
    index = DenseIndex(4, use_gpu=False)
    index.add(vectors(20, 4))
    live = index._live()
    sizes = []

    class Spy:
        def search(self, block, k):
            sizes.append(len(block))
            return live.search(block, k)

    index.index = Spy()
    queries = vectors(1025, 4, seed=1)
    index.search(queries, 2)
    index.search_positions(queries, 2)
    index.search(queries[:40], 2, batch=16)
    assert sizes == [1024, 1, 1024, 1, 16, 16, 8]  # the default batch is 1024 rows


def test_a_large_add_is_copied_in_pieces_without_losing_or_repeating_a_row():
    docs = vectors(262_144 + 1000, 2)  # one piece of 262,144 rows and one of 1,000
    docs[262_144] = [50, 50]  # the first row of the second piece: everyone's best
    index = DenseIndex(2, use_gpu=False)
    index.add(docs)
    scores, positions = index.search_positions(np.array([[1, 1], [1, -1]], np.float32), 1)
    assert index.index.ntotal == len(docs)
    assert positions[0, 0] == 262_144 and positions[1, 0] == top(docs, np.array([[1, -1]], np.float32), 1)[0, 0]


def test_a_too_small_corpus_for_the_ivf_lists_is_refused_with_a_suggestion():
    def build(factory, n):
        index = DenseIndex(8, factory, use_gpu=False)
        index.add(vectors(n))
        return index.search_positions(vectors(2, seed=1), 3)

    # 4 * sqrt(100) = 40 lists; 4 * sqrt(16) = 16; below 16 vectors only Flat is suggested
    with pytest.raises(ConfigError) as refused:
        build("IVF256,Flat", 100)
    assert str(refused.value).endswith("this corpus has 100; use IVF40,Flat (about 4 x sqrt(N) clusters) or Flat")
    with pytest.raises(ConfigError, match=r"has 16; use IVF16,Flat \("):
        build("IVF32,Flat", 16)
    with pytest.raises(ConfigError) as refused:
        build("IVF32,Flat", 15)
    assert str(refused.value).endswith("this corpus has 15; use Flat")
    build("IVF4,Flat", 4)  # one vector per list is enough


def test_the_training_sample_is_seeded_and_drawn_from_every_part():
    parts = [vectors(3, seed=1).astype(np.float16), vectors(2, seed=2).astype(np.float16)]  # an fp16 shard
    index = DenseIndex(8, "IVF4,Flat", use_gpu=False)  # wants 4 * 256 vectors: all 5 are taken
    for part in parts:
        index.add(part)
    sample = index._sample()
    assert sample.dtype == np.float32, "faiss trains on fp32 rows"
    np.testing.assert_array_equal(sample, np.concatenate(parts).astype(np.float32))
    # not an IVF index (a product quantizer): at most 100,000 vectors, the same ones for the same seed (default 0)
    many = np.arange(100_001 * 2, dtype=np.float32).reshape(-1, 2)

    def sample_of(**seed):
        pq = DenseIndex(2, "PQ1x4", use_gpu=False, **seed)
        pq.add(many)
        return pq._sample()

    default = sample_of()
    assert len(default) == 100_000
    assert np.array_equal(default, sample_of(seed=0)) and not np.array_equal(default, sample_of(seed=1))


def test_save_and_load_keep_the_factory_and_a_missing_factory_file_means_flat(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path written in the wrong place would land here, not be read from elsewhere
    docs, queries = vectors(200), vectors(5, seed=1)
    index = DenseIndex(8, "IVF4,Flat", use_gpu=False, nprobe=4)  # 4 of 4 lists: exact
    index.add(docs, [f"d{i}" for i in range(200)])
    index.save(tmp_path / "ivf")
    loaded = DenseIndex.load(tmp_path / "ivf", use_gpu=False)
    assert loaded.factory == "IVF4,Flat" and len(loaded) == 200
    expected = top(docs, queries, 3)
    assert DenseIndex.load(str(tmp_path / "ivf"), use_gpu=False).search(queries, 3)[1] == [
        [f"d{i}" for i in row] for row in expected]
    flat = DenseIndex(8, use_gpu=False)
    flat.add(docs)
    flat.save(tmp_path / "flat")
    (tmp_path / "flat" / "factory.txt").unlink()  # written before factory.txt existed
    old = DenseIndex.load(tmp_path / "flat", use_gpu=False)
    assert old.factory == "Flat" and np.array_equal(old.search_positions(queries, 3)[1], expected)


class Resources:
    """A StandardGpuResources stand-in: GPU indexes must be given the one the index keeps alive."""


class RecordingGpuFaiss(FakeGpuFaiss):
    """FakeGpuFaiss that also records what each GPU call was given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def StandardGpuResources(self):  # noqa: N802 (faiss's names)
        return Resources()

    def GpuIndexFlatIP(self, resources, dimension, config):  # noqa: N802
        assert isinstance(resources, Resources)
        self.calls.append(("flat on", config.device, "fp16", config.useFloat16))
        return super().GpuIndexFlatIP(resources, dimension, config)

    def index_cpu_to_gpu(self, resources, device, index, options=None):
        assert isinstance(resources, Resources)
        self.calls.append(("clone to", device, "fp16", options.useFloat16))
        return super().index_cpu_to_gpu(resources, device, index, options)

    def index_cpu_to_all_gpus(self, index, options=None):
        self.calls.append(("clone to all", "shard", options.shard, "fp16", options.useFloat16))
        return super().index_cpu_to_all_gpus(index, options)

    def GpuParameterSpace(self):  # noqa: N802
        self.calls.append(("gpu parameters",))
        return self.real.ParameterSpace()

    def ParameterSpace(self):  # noqa: N802
        self.calls.append(("cpu parameters",))
        return self.real.ParameterSpace()


def fake_gpus(monkeypatch, rank, world):
    fake = RecordingGpuFaiss()
    monkeypatch.setattr(index_module, "_faiss", lambda: fake)
    monkeypatch.setattr(retromae.distributed, "world", lambda: (rank, world))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return fake


def nprobe_of(index):
    import faiss

    return faiss.extract_index_ivf(index.index).nprobe


def test_a_process_of_a_launch_builds_flat_on_its_gpu_and_clones_ivf_there(monkeypatch):
    docs, queries = vectors(300), vectors(4, seed=1)
    fake = fake_gpus(monkeypatch, 2, 4)
    flat = DenseIndex(8, device=cuda(2))  # fp16 storage by default
    flat.add(docs)
    assert np.array_equal(flat.search_positions(queries, 3)[1], top(docs, queries, 3))
    assert fake.calls == [("flat on", 2, "fp16", True)], "a Flat index is built on the GPU directly"
    assert isinstance(flat.gpu_resources, Resources)
    fake = fake_gpus(monkeypatch, 1, 4)
    ivf = DenseIndex(8, "IVF4,Flat", fp16=False, device=cuda(1))
    ivf.add(docs)
    ivf.search_positions(queries, 3)
    assert fake.calls == [("clone to", 1, "fp16", False), ("gpu parameters",)], "trained on the CPU, cloned once"
    assert nprobe_of(ivf) == 32 and isinstance(ivf.gpu_resources, Resources)


def test_a_process_alone_shards_over_all_gpus_and_a_cpu_index_takes_cpu_parameters(monkeypatch):
    docs = vectors(300)
    fake = fake_gpus(monkeypatch, 0, 1)
    alone = DenseIndex(8, "IVF4,Flat")
    alone.add(docs)
    alone.search_positions(vectors(2, seed=1), 3)
    assert fake.calls == [("clone to all", "shard", True, "fp16", True), ("gpu parameters",)]
    fake = fake_gpus(monkeypatch, 0, 1)
    cpu = DenseIndex(8, "IVF4,Flat", use_gpu=False)
    cpu.add(docs)
    cpu.search_positions(vectors(2, seed=1), 3)
    assert fake.calls == [("cpu parameters",)] and nprobe_of(cpu) == 32


def test_a_cloner_gets_no_options_from_a_faiss_without_multi_gpu_options():
    import faiss

    if hasattr(faiss, "GpuMultipleClonerOptions"):
        pytest.skip("this faiss has GPU options")
    given = []
    index = DenseIndex(8, use_gpu=True, cloner=lambda cpu, options: given.append(options) or faiss.clone_index(cpu))
    index.add(vectors(10))
    index.search_positions(vectors(1, seed=1), 2)
    assert given == [None]


def test_a_gpu_index_is_saved_from_the_gpu_and_loaded_back_onto_the_gpus(tmp_path, monkeypatch):
    docs, queries = vectors(300), vectors(4, seed=1)
    fake_gpus(monkeypatch, 0, 1)
    index = DenseIndex(8)
    index.add(docs)
    expected = index.search_positions(queries, 3)[1]
    assert index.cpu_index.ntotal == 0  # the vectors are on the GPUs only: saved from there
    index.save(tmp_path / "idx")
    for kwargs, fp16 in (({}, True), ({"use_gpu": True, "fp16": False}, False)):
        fake = fake_gpus(monkeypatch, 0, 1)
        loaded = DenseIndex.load(tmp_path / "idx", **kwargs)
        assert loaded.on_gpu and len(loaded) == 300
        assert np.array_equal(loaded.search_positions(queries, 3)[1], expected)
        assert fake.calls == [("clone to all", "shard", True, "fp16", fp16)]
