"""Fine-tuning and evaluation at MS MARCO scale: search spread over processes and merged exactly, the torch search
backend, faiss indexes built the way multi-GPU faiss needs, compact training data, and MS MARCO's protocol."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retromae.retrieval.encoder import EncodeConfig
from retromae.retrieval.evaluate import SearchConfig, evaluate_model
from retromae.retrieval.index import DenseIndex
from retromae.retrieval.search import TorchExact, merge_top_k, search_shard


def vectors(n, d=24, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# ----- search --------------------------------------------------------------------------------------------------


def test_the_finished_index_is_cloned_once_so_a_sharded_gpu_index_works():
    """faiss's multi-GPU cloner turns a Flat index into IndexShards(successive_ids=True), which accepts a single
    add; adding the corpus batch by batch to it failed. Simulated on the CPU with a cloner that builds such an
    IndexShards: the index is now built on the CPU and cloned once, and searches exactly."""
    import faiss

    def sharded_clone(cpu_index, options, shards=3):
        flat = faiss.rev_swig_ptr(faiss.downcast_index(cpu_index).get_xb(), cpu_index.ntotal * cpu_index.d)
        data = np.array(flat).reshape(cpu_index.ntotal, cpu_index.d)
        index = faiss.IndexShards(cpu_index.d, True, True)  # threaded, successive ids: one add only
        for part in np.array_split(data, shards):
            sub = faiss.IndexFlatIP(cpu_index.d)
            sub.add(np.ascontiguousarray(part))
            alive.append(sub)  # the shards must outlive this function
            index.add_shard(sub)
        return index

    alive = []

    docs, queries = vectors(3000), vectors(20, seed=1)
    sharded = DenseIndex(24, use_gpu=True, cloner=sharded_clone)
    for start in range(0, 3000, 700):  # added in five batches
        sharded.add(docs[start : start + 700], [f"d{i}" for i in range(start, min(3000, start + 700))])
    plain = DenseIndex(24, use_gpu=False)
    plain.add(docs, [f"d{i}" for i in range(3000)])
    assert sharded.search(queries, 10)[1] == plain.search(queries, 10)[1]
    # the old way: adding batch by batch to the sharded clone
    shards = sharded_clone(plain.cpu_index, None)
    with pytest.raises(RuntimeError):
        shards.add(docs[:10])


class FakeGpuFaiss:
    """faiss with 4 "GPUs" on the CPU: the real module, plus the GPU calls DenseIndex makes, each recording the
    device it touches (a GPU index here is a CPU index)."""

    def __init__(self):
        import faiss

        self.real, self.touched = faiss, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def get_num_gpus(self):
        return 4

    def StandardGpuResources(self):  # noqa: N802 (faiss's names)
        return object()

    def GpuIndexFlatConfig(self):  # noqa: N802
        return type("Config", (), {"device": 0, "useFloat16": False})()

    def GpuIndexFlatIP(self, resources, dimension, config):  # noqa: N802
        self.touched.append(config.device)
        return self.real.IndexFlatIP(dimension)

    def GpuClonerOptions(self):  # noqa: N802
        return type("Options", (), {"useFloat16": False})()

    def GpuMultipleClonerOptions(self):  # noqa: N802
        return type("Options", (), {"useFloat16": False, "shard": False})()

    def GpuParameterSpace(self):  # noqa: N802
        return self.real.ParameterSpace()

    def index_cpu_to_gpu(self, resources, device, index, options=None):
        self.touched.append(device)
        return self.real.clone_index(index)

    def index_cpu_to_all_gpus(self, index, options=None):
        self.touched.extend(range(4))
        return self.real.clone_index(index)

    def index_gpu_to_cpu(self, index):
        return self.real.clone_index(index)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_each_process_of_a_launch_puts_its_index_on_its_own_gpu_only(monkeypatch, factory):
    """Under a launch of 4 processes with faiss-gpu, process r touches GPU r only (before: every process cloned its
    index onto all 4 GPUs) and keeps no CPU copy of its vectors; a process alone shards over all GPUs."""
    import retromae.distributed
    import retromae.retrieval.index as index_module

    docs, queries = vectors(3000), vectors(20, seed=1)
    expected = search_shard(queries, docs, 10, backend="faiss", use_gpu=False)
    for rank in range(4):
        fake = FakeGpuFaiss()
        monkeypatch.setattr(index_module, "_faiss", lambda fake=fake: fake)
        monkeypatch.setattr(retromae.distributed, "world", lambda rank=rank: (rank, 4))
        index = DenseIndex(24, factory, device=torch.device("cuda", rank))
        for start in range(0, 3000, 1000):  # repeated adds
            index.add(docs[start : start + 1000])
        scores, positions = index.search_positions(queries, 10)
        assert fake.touched == [rank], f"process {rank} touched GPUs {fake.touched}"
        assert index.cpu_index.ntotal == 0, "no CPU copy of the vectors is kept"
        if factory == "Flat":
            assert np.array_equal(positions, expected[1]) and np.allclose(scores, expected[0], atol=1e-4)
    fake = FakeGpuFaiss()
    monkeypatch.setattr(index_module, "_faiss", lambda: fake)
    monkeypatch.setattr(retromae.distributed, "world", lambda: (0, 1))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = DenseIndex(24, factory, device=torch.device("cuda", 0))
    alone.add(docs)
    alone.search_positions(queries, 10)
    assert sorted(fake.touched) == [0, 1, 2, 3] and alone.cpu_index.ntotal == 0


def test_ivf_is_trained_on_a_sample_of_everything_and_searches_nprobe_lists():
    """IVF searched 1 list (faiss's default nprobe) found 0.13 of the exact top-10 on uniform data; 32 lists find
    0.82. And its training sample is drawn from all the rows added, not the first ones."""
    rng = np.random.default_rng(3)
    docs = rng.standard_normal((20_000, 24)).astype(np.float32)
    queries = rng.standard_normal((100, 24)).astype(np.float32)
    exact = search_shard(queries, docs, 10, backend="faiss", use_gpu=False)[1]
    one_list = search_shard(queries, docs, 10, "IVF256,Flat", "faiss", False, nprobe=1)[1]
    default = search_shard(queries, docs, 10, "IVF256,Flat", "faiss", False)[1]  # nprobe 32
    recall = lambda found: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])  # noqa: E731
    assert recall(one_list) < 0.3 and recall(default) > 0.75
    ordered = docs[np.argsort(docs[:, 0])]  # the first rows alone would be a biased sample
    index = DenseIndex(24, "IVF16,Flat", use_gpu=False)
    index.add(ordered[:10_000])
    index.add(ordered[10_000:])
    sample = index._sample()
    assert len(sample) == 16 * 256, "256 per list"
    assert sample[:, 0].min() < ordered[2000, 0] and sample[:, 0].max() > ordered[18_000, 0], "from all the rows"


def test_hnsw_stays_on_the_cpu_where_gpus_are_used():
    index = DenseIndex(8, "HNSW16", use_gpu=True, cloner=lambda index, options: index)
    assert not index.on_gpu


def test_torch_search_equals_faiss_flat():
    docs, queries = vectors(5000, 32), vectors(64, 32, seed=2)
    faiss_scores, faiss_positions = search_shard(queries, docs, 50, backend="faiss", use_gpu=False)
    devices = [torch.device("cpu")] * 3  # the corpus split over three "devices", merged exactly
    torch_scores, torch_positions = TorchExact(docs, devices, chunk_rows=700).search(queries, 50, query_batch=17)
    assert np.array_equal(torch_positions, faiss_positions)
    np.testing.assert_allclose(torch_scores, faiss_scores, rtol=1e-5, atol=1e-4)
    half = TorchExact(docs, [torch.device("cpu")], dtype=torch.bfloat16).search(queries, 50)
    assert np.mean([len(set(a) & set(b)) / 50 for a, b in zip(half[1], faiss_positions)]) > 0.9
    # bf16 rounding (8 bits of mantissa) of 32-dim products of ~N(0,1): relative to the score, plus a little
    np.testing.assert_allclose(half[0], faiss_scores, rtol=2 ** -7, atol=0.05)


def dot_product_vectors(n, seed, d=768):
    """CLS vectors of a dot-product model (RetroMAE, tau = 1): anisotropic, a shared direction of norm ~14 plus a
    spread, so that scores are ~170-230 (fp16 steps there are 0.125 apart)."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).standard_normal(d)
    direction /= np.linalg.norm(direction)
    spread = np.random.default_rng(98).uniform(0.3, 1.7, d)
    return (14 * direction + 0.25 * rng.standard_normal((n, d)) * spread).astype(np.float32)


@pytest.mark.parametrize("dtype, margin, devices, chunk_rows", [(torch.float16, None, 2, 5000), (torch.float16, 0, 1, 30_000),
                                                                (torch.bfloat16, None, 2, 5000)])
def test_half_precision_torch_search_is_fp32_exact_on_dot_product_vectors(dtype, margin, devices, chunk_rows):
    """The GPU path of the torch backend (a first pass in fp16/bf16, run here on the CPU) returns the top-k and the
    scores of an fp32 brute force. Before, its scores were fp16-rounded: 0.125 apart at ~200, with ties and a
    different order in most top-10 lists. margin 0 leaves the proof no room, so every query is searched again in
    fp32 (the fallback): with the corpus in one chunk, a search without it would miss passages at the k-th rank."""
    docs, queries = dot_product_vectors(24_000, 0), dot_product_vectors(60, 1)
    brute = queries @ docs.T  # fp32
    exact = queries.astype(np.float64) @ docs.astype(np.float64).T
    assert 150 < exact.min() and exact.max() < 250, "realistic dot-product scores"
    search = TorchExact(docs, [torch.device("cpu")] * devices, dtype=dtype, chunk_rows=chunk_rows, margin=margin)
    for k in (10, 100):
        scores, positions = search.search(queries, k, query_batch=25)
        order = np.argsort(-brute, axis=1, kind="stable")[:, :k]
        expected = np.take_along_axis(brute, order, 1)
        tolerance = 1e-5 * float(np.abs(expected).max())  # fp32 brute forces differ by summation order (~1e-4 here)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=tolerance)
        np.testing.assert_allclose(scores, np.take_along_axis(brute, positions, 1), rtol=0, atol=tolerance)
        # the same passages in the same order, except where two of them are closer than fp32's own rounding
        truth = np.take_along_axis(exact, order, 1)
        separated = np.ones_like(truth, dtype=bool)
        separated[:, 1:] &= np.diff(truth, axis=1) < -tolerance
        separated[:, :-1] &= np.diff(truth, axis=1) < -tolerance
        assert separated.mean() > 0.7, "most positions are compared"
        assert np.array_equal(positions[separated], order[separated])
        assert all(len(set(row)) == len(row) for row in positions), "no passage twice (fallbacks replace)"
    if margin == 0:
        assert search.fallbacks > 0


def test_a_memory_mapped_shard_is_searched_in_chunks_with_query_shards_in_turn(tmp_path):
    """The CPU exact search reads the shard a chunk at a time (no copy of it in an index) and takes the queries as
    several memory-mapped shards without concatenating them: the same result as one Flat index over everything."""
    from retromae.retrieval.search import search_chunked_flat

    docs, queries = vectors(5000, 32), vectors(90, 32, seed=2)
    np.save(tmp_path / "docs.npy", docs)
    for i, part in enumerate(np.array_split(queries, 3)):
        np.save(tmp_path / f"q{i}.npy", part)
    index = DenseIndex(32, use_gpu=False)
    index.add(docs)
    whole = index.search_positions(queries, 40)
    shard = np.load(tmp_path / "docs.npy", mmap_mode="r")
    query_shards = [np.load(tmp_path / f"q{i}.npy", mmap_mode="r") for i in range(3)]
    chunked = search_chunked_flat(query_shards, shard, 40, chunk_rows=700, query_batch=16)
    assert np.array_equal(chunked[1], whole[1]) and np.allclose(chunked[0], whole[0], atol=1e-5)
    assert np.array_equal(search_shard(query_shards, shard, 40, use_gpu=False)[1], whole[1])


def test_merged_shards_equal_one_search():
    docs, queries = vectors(999, 16), vectors(30, 16, seed=5)
    whole = search_shard(queries, docs, 40, backend="faiss", use_gpu=False)
    bounds = [0, 300, 301, 999]
    parts = [search_shard(queries, docs[a:b], 40, backend="faiss", use_gpu=False) for a, b in zip(bounds, bounds[1:])]
    merged = merge_top_k([s for s, _ in parts], [p + a for (_, p), a in zip(parts, bounds)], 40)
    assert np.array_equal(merged[1], whole[1]) and np.allclose(merged[0], whole[0])


class FakeProcess:
    """The launch state of process `rank` of `world`, the processes being threads of this one: a barrier is a
    threading.Barrier."""

    def __init__(self, rank, world, barrier=None):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.device, self.barrier = torch.device("cpu"), barrier

    def wait_for_everyone(self):
        if self.barrier is not None:
            self.barrier.wait(timeout=120)


@pytest.mark.parametrize("representation", ["dense", "dupmae"])
def test_sharded_search_over_three_processes_equals_one(tiny_model, beir_task, tmp_path, representation):
    from retromae.retrieval.data import load_dataset
    from retromae.retrieval.evaluate import dense_run, hybrid_run, make_encoder

    data = load_dataset(str(beir_task))
    search = SearchConfig(representation=representation)
    # every text cut to 12 tokens: no padding, so a text's vector does not depend on the shard it is encoded in
    encoder = make_encoder(str(tiny_model), EncodeConfig(precision="no", passage_max_len=12, query_max_len=12),
                           search, "cpu")
    run = hybrid_run if representation == "dupmae" else dense_run
    import threading
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "one").mkdir()
    one = run(encoder, data, search, tmp_path / "one", FakeProcess(0, 1), 60)
    (tmp_path / "three").mkdir()
    barrier = threading.Barrier(3)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda r: run(encoder, data, search, tmp_path / "three", FakeProcess(r, 3, barrier), 60),
                                range(3)))
    three = results[0]
    assert results[1] is None and results[2] is None, "the others leave the merge to the main process"
    # the same scores, up to the last bit: the CPU's BLAS may round a text's vector differently when it is encoded in
    # a batch of another size or alignment (seen once: 1 ulp of ~32, where the tiny model's scores differ by ~1e-6)
    assert one[0] == three[0]
    np.testing.assert_allclose(three[1], one[1], rtol=0, atol=1e-5)
    # the same documents, except among documents within that noise of the last one kept (a search may keep any of
    # them); at the same place where a document's score stands apart from its neighbours' by more than the noise
    above = one[1] > one[1][:, -1:] + 1e-5
    assert above.mean() > 0.5
    for row in range(one[1].shape[0]):
        assert set(one[2][row][above[row]]) <= set(three[2][row]), row
    gaps = -np.diff(one[1], axis=1)  # each document's lead over the next
    apart = np.ones_like(above)  # a place whose document is more than the noise from both neighbours
    apart[:, 1:] &= gaps > 1e-5
    apart[:, :-1] &= gaps > 1e-5
    apart &= above
    assert apart.any() and np.array_equal(one[2][apart], three[2][apart])


# ----- training data -------------------------------------------------------------------------------------------


def msmarco_folder(root: Path, passages=60, queries=12):
    root.mkdir(parents=True, exist_ok=True)
    (root / "collection.tsv").write_text("".join(f"{p}\tpassage number {p} about topic {p % 7}\n"
                                                 for p in range(passages)))
    (root / "queries.train.tsv").write_text("".join(f"{100 + q}\tquestion {q} on topic {q % 7}\n"
                                                    for q in range(queries)))
    (root / "qrels.train.tsv").write_text("".join(f"{100 + q} 0 {q} 1\n" for q in range(queries)))
    return root


def test_qidpidtriples_are_sampled_per_query_in_a_stream(tmp_path, monkeypatch):
    from retromae.finetune.data import load_training_data

    monkeypatch.setenv("RETROMAE_CACHE", str(tmp_path / "cache"))
    root = msmarco_folder(tmp_path / "msmarco")
    rng = np.random.default_rng(0)
    lines = []
    for q in range(12):
        for neg in rng.permutation(60)[:40]:  # 40 negatives (one is the positive: dropped), each in 2 triples
            lines += [f"{100 + q}\t{q}\t{neg}\n"] * 2
    rng.shuffle(lines)
    (root / "triples.tsv").write_text("".join(lines))
    data = load_training_data(str(root), "msmarco", negatives=str(root / "triples.tsv"), negatives_per_query=10)
    first = [data.negatives.row(q).tolist() for q in range(12)]
    for q in range(12):
        row = data.negatives.row(q)
        assert len(row) == 10 and len(set(row.tolist())) == 10, "10 distinct negatives"
        assert q not in row.tolist(), "never the query's positive"
    # the sample is seeded (the same again, from the cache or not) and differs with the seed
    again = load_training_data(str(root), "msmarco", negatives=str(root / "triples.tsv"), negatives_per_query=10)
    assert [again.negatives.row(q).tolist() for q in range(12)] == first
    other = load_training_data(str(root), "msmarco", negatives=str(root / "triples.tsv"), negatives_per_query=10,
                               seed=7)
    assert [other.negatives.row(q).tolist() for q in range(12)] != first
    # train_negs lists: positives and the query's own id filtered out too
    (root / "train_negs.tsv").write_text("100\t0,5,6,100\n101\t1,1,2\n")
    (root / "collection.tsv").write_text((root / "collection.tsv").read_text() + "100\tthe query's own id\n")
    lists = load_training_data(str(root), "msmarco", negatives=str(root / "train_negs.tsv"))
    assert lists.negatives.row(0).tolist() == [5, 6] and lists.negatives.row(1).tolist() == [2]


SAMPLE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from retromae.finetune.data import load_training_data
data = load_training_data(sys.argv[1], "msmarco", negatives=sys.argv[2], negatives_per_query=10)
print("ROWS", [data.negatives.row(q).tolist() for q in range(len(data))])
print("MAPPED", type(data.passages.index.sorted).__name__, type(data.passages.index.order).__name__)
"""


def test_triples_are_sampled_once_for_all_processes_and_the_id_index_is_memory_mapped(tmp_path):
    """Two processes load the same MS MARCO training data at once: the qidpidtriples file (397M lines, ~40 minutes at
    MS MARCO's size) is sampled by one of them while the other waits on a lock, and both read the same memory-mapped
    result; the collection's id index is read from the collection cache, memory-mapped, not rebuilt per process."""
    import os
    import subprocess
    import sys

    root = msmarco_folder(tmp_path / "msmarco", passages=3000, queries=300)
    rng = np.random.default_rng(0)
    lines = [f"{100 + q}\t{q}\t{n}\n" for q in range(300) for n in rng.integers(0, 3000, 200)]
    (root / "triples.tsv").write_text("".join(lines))
    env = {**os.environ, "RETROMAE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}
    runs = [subprocess.Popen([sys.executable, "-c", SAMPLE, str(root), str(root / "triples.tsv")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    assert sum(err.count("sampling 10 negatives per query") for _, err in outputs) == 1, "sampled once"
    rows = [next(line for line in out.splitlines() if line.startswith("ROWS")) for out, _ in outputs]
    assert rows[0] == rows[1] and "[]" not in rows[0]
    assert all("MAPPED memmap memmap" in out for out, _ in outputs)
    cached = sorted(p.name for p in (tmp_path / "cache" / "triples").iterdir() if not p.name.startswith("."))
    assert len(cached) == 2 and all(name.endswith(".npy") for name in cached)
    assert isinstance(np.load(tmp_path / "cache" / "triples" / cached[0], mmap_mode="r"), np.memmap)


def test_mined_negatives_are_filtered_against_positives(beir_task, tmp_path):
    from retromae.finetune.data import load_training_data

    path = tmp_path / "mined.jsonl"
    path.write_text(json.dumps({"query_id": "q0", "query": "a question", "positive_ids": ["doc0"],
                                "negative_ids": ["doc0", "doc3", "doc3", "doc4"]}) + "\n")
    data = load_training_data(str(path), "mined", corpus=str(beir_task))
    ids = data.passages.ids_at(data.negatives.row(0))
    assert ids == ["doc3", "doc4"]


def test_tevatron_distillation_uses_the_teacher(tmp_path, tiny_model):
    """Teacher scores are keyed by (query id, docid): a Tevatron-format run distils (KL > 0); a file that matches
    no training pair stops the run instead of silently doing nothing."""
    from retromae.config import ConfigError
    from retromae.demo import docstring_corpus, split_first_sentence
    from retromae.finetune.run import load_finetune_config, run

    rows, teacher = [], []
    pairs = [split_first_sentence(r["text"]) for r in docstring_corpus(limit=200)]
    pairs = [p for p in pairs if p[0]][:24]
    for i, (query, positive) in enumerate(pairs):
        negatives = [(f"n{i}-{k}", pairs[(i + k + 1) % len(pairs)][1]) for k in range(3)]
        rows.append({"query_id": f"q{i}", "query": query,
                     "positive_passages": [{"docid": f"d{i}", "text": positive}],
                     "negative_passages": [{"docid": d, "text": t} for d, t in negatives]})
        teacher += [f"q{i}\td{i}\t5.0\n"] + [f"q{i}\t{d}\t{-k}.0\n" for k, (d, _) in enumerate(negatives)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "teacher.tsv").write_text("".join(teacher))
    overrides = {"model.name_or_path": str(tiny_model), "data.train": str(tmp_path / "train.jsonl"),
                 "data.teacher_scores": str(tmp_path / "teacher.tsv"), "data.group_size": 4,
                 "loss.distill_weight": 1.0, "train.per_device_batch_size": 8, "train.max_steps": 2,
                 "train.report_to": "none", "train.cpu": True, "train.mixed_precision": "no",
                 "train.output_dir": str(tmp_path / "out"), "train.logging_steps": 1}
    result = run(load_finetune_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
    assert all(h["loss/distill"] > 1e-3 for h in result["history"])
    (tmp_path / "teacher.tsv").write_text("".join("Q" + line[1:] for line in teacher))  # other query ids
    overrides["train.output_dir"] = str(tmp_path / "out2")
    with pytest.raises(ConfigError, match="none of the training pairs has a teacher score"):
        run(load_finetune_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))


def test_scores_are_fp32_under_bf16_autocast():
    from retromae.finetune.model import BiEncoder, LossConfig

    bi = BiEncoder(torch.nn.Identity(), LossConfig(temperature=1.0))
    queries = torch.randn(4, 768) * 0.5
    passages = torch.randn(8, 768) * 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = bi.scores(queries.bfloat16(), passages.bfloat16())
    exact = queries.bfloat16().float() @ passages.bfloat16().float().T
    assert scores.dtype == torch.float32 and torch.allclose(scores, exact, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = queries.bfloat16() @ passages.bfloat16().T
    assert (rounded.float() - exact).abs().max() > 1e-3, "bf16 products would have rounded these scores"


# ----- evaluation protocol --------------------------------------------------------------------------------------


def test_separate_towers_encode_queries_with_the_query_encoder(tiny_model, beir_task, tmp_path):
    from retromae.finetune.run import load_finetune_config, run
    from retromae.retrieval.encoder import TextEncoder

    overrides = {"model.name_or_path": str(tiny_model), "data.train": str(beir_task), "data.group_size": 1,
                 "loss.shared_encoder": False, "train.per_device_batch_size": 8, "train.max_steps": 3, "train.lr": 1e-2,
                 "train.report_to": "none", "train.cpu": True, "train.mixed_precision": "no",
                 "train.output_dir": str(tmp_path / "out"), "data.passage_max_len": 32}
    model = run(load_finetune_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))["model_dir"]
    encoder = TextEncoder(model, EncodeConfig(precision="no"), device="cpu")
    assert encoder.settings()["query_encoder"] == "separate"
    text = ["open a file and read it"]
    as_query, as_passage = encoder.encode(text, "query", False), encoder.encode(text, "passage", False)
    assert not np.allclose(as_query, as_passage), "queries and passages go through different towers"
    tower = TextEncoder(str(Path(model) / "query_encoder"), EncodeConfig(precision="no"), device="cpu")
    assert np.allclose(tower.encode(text, "query", False), as_query, atol=1e-6)


def test_msmarco_keeps_a_passage_whose_id_is_the_query_id(tmp_path, st_model):
    root = tmp_path / "msmarco"
    root.mkdir()
    (root / "collection.tsv").write_text("7\tthe answer to question seven\n8\tsomething else entirely\n")
    (root / "queries.dev.small.tsv").write_text("7\tquestion seven answer\n")
    (root / "qrels.dev.small.tsv").write_text("7 0 7 1\n")
    result = evaluate_model(str(st_model), str(root), None, EncodeConfig(precision="no"), SearchConfig(
        metrics=["mrr@10"]))
    assert not result["settings"]["ignore_identical_ids"] and result["mrr@10"] > 0
    beir_rule = evaluate_model(str(st_model), str(root), None, EncodeConfig(precision="no"), SearchConfig(
        metrics=["mrr@10"], ignore_identical_ids=True))
    assert beir_rule["mrr@10"] == 0, "with BEIR's rule the only relevant passage is dropped"


def test_mining_drops_the_query_itself(tiny_model, tmp_path):
    """Quora-like data, where queries are also documents: the query's own document is no negative."""
    from retromae.finetune.mine import MineConfig, mine_negatives

    root = tmp_path / "quora"
    (root / "qrels").mkdir(parents=True)
    texts = [f"how do I learn topic {i} quickly" for i in range(30)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                               for i, t in enumerate(texts)))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                for i, t in enumerate(texts)))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\tq{(i + 1) % 30}\t1\n" for i in range(30)))
    out = tmp_path / "mined.jsonl"
    mine_negatives(str(tiny_model), str(root), str(out), "train", EncodeConfig(precision="no"),
                   MineConfig(depth=28))
    for row in map(json.loads, out.read_text().splitlines()):
        assert row["query_id"] not in row["negative_ids"] and len(row["negative_ids"]) == 28
