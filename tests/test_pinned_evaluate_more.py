"""More rules of `retromae.retrieval.evaluate`, pinned on tiny inputs whose expected values are worked out by hand in
the comments (issue 18: mutation testing, the survivors of the first pass). The fakes of test_pinned_evaluate are
reused: fake processes are threads of this one."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from test_pinned_evaluate import (FakeCorpus, FakeHybridEncoder, FakeLayerEncoder, FakeProcess, _grid_result,
                                  data_of, in_threads, tiny_beir)

import retromae.distributed
import retromae.retrieval.search
from retromae.config import ConfigError
from retromae.retrieval import evaluate as ev
from retromae.retrieval.data import RetrievalData
from retromae.retrieval.evaluate import SearchConfig, SuiteConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class DenseEncoder(FakeLayerEncoder):
    """The layer-1 block of FakeLayerEncoder's table only: q0 . d = 1 2 3, q1 . d = 0 2 0."""

    table = {t: v[:3] for t, v in FakeLayerEncoder.table.items()}


def _three_docs_two_queries():
    return data_of(ids=["d0", "d1", "d2"], queries={"x": "q0", "y": "q1"})


# ----- the scratch space asked for -------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("shard_dtype, size", [("float32", 4), ("float16", 2)])
def test_space_checked_counts_the_vectors_and_every_process_s_results(tmp_path, monkeypatch, grid, shard_dtype, size):
    # 3 documents + 2 queries of `size` bytes a coordinate; dimension 3 (dense) or 2 layers x 3 = 6 (the grid):
    #   float32: dense (3 + 2) x 3 x 4 = 60, grid (3 + 2) x 6 x 4 = 120;  float16: half of that, 30 and 60
    # plus the results: 2 processes x 2 queries x depth 2 x 12 bytes (float32 score + int64 position) = 96
    asked = []
    monkeypatch.setattr(ev, "check_space_everywhere", lambda work, needed, what: asked.append((needed, what)))
    data = _three_docs_two_queries()
    if grid:
        search = SearchConfig(layers=[1, 3], dims=[1], use_gpu="false", shard_dtype=shard_dtype)
        in_threads(2, lambda state: ev.matryoshka_run(FakeLayerEncoder(), data, search, tmp_path, state, 2))
    else:
        in_threads(2, lambda state: ev.dense_run(DenseEncoder(), data, SearchConfig(use_gpu="false",
                                                                                    shard_dtype=shard_dtype),
                                                 tmp_path, state, 2))
    vectors = 5 * (6 if grid else 3) * size
    assert asked == [(vectors + 96, "encoding the corpus and the queries")] * 2


class TitledCorpus(FakeCorpus):
    def passages(self, separator=" "):
        return self.ids, [f"T{separator}text of {i}" for i in self.ids]


class RecordingDenseEncoder(DenseEncoder):
    """DenseEncoder's vectors for 'T | text of dN' too; each call's kind, progress setting, texts and the dtype of
    the array it fills recorded."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def encode(self, texts, kind, show_progress=False, out=None):
        texts = list(texts[:])  # a Window is read by slices, as the real encoder reads it
        self.calls.append((kind, show_progress, out.dtype, texts))
        super().encode([t.removeprefix("T | ") for t in texts], kind, out=out)


def test_encoding_shards_texts_and_queries_with_progress_on_the_main_process_in_the_shard_dtype(tmp_path):
    # 3 titled documents and 2 queries over 2 processes: documents d0 | d1 d2 (shard_range), queries q0 | q1; the
    # title joined by the configured separator; only the main process shows the corpus's progress, nobody the
    # queries'; every shard in float16
    data = RetrievalData("tiny", TitledCorpus(["d0", "d1", "d2"]), {"x": "q0", "y": "q1"}, {})
    search = SearchConfig(use_gpu="false", title_separator=" | ", shard_dtype="float16")
    encoders = [RecordingDenseEncoder(), RecordingDenseEncoder()]
    found = in_threads(2, lambda state: (ev.encode_corpus_and_queries(encoders[state.process_index], data, search,
                                                                      tmp_path, state, 2)))
    half = np.dtype(np.float16)
    assert encoders[0].calls == [("passage", True, half, ["T | text of d0"]), ("query", False, half, ["q0"])]
    assert encoders[1].calls == [("passage", False, half, ["T | text of d1", "T | text of d2"]),
                                 ("query", False, half, ["q1"])]
    for rank, (query_ids, shard, queries, first) in enumerate(found):
        assert query_ids == ["x", "y"] and first == [0, 1][rank]
        # every query shard, in order, on every process: q0 = [1, 1, 1], q1 = [0, 1, 0]
        assert [q.dtype for q in queries] == [half, half]
        assert np.concatenate(queries).tolist() == [[1, 1, 1], [0, 1, 0]]
        assert np.load(shard).dtype == half
        assert np.load(shard).tolist() == [[[1, 0, 0]], [[0, 2, 0], [0, 0, 3]]][rank]


# ----- the search's settings -------------------------------------------------------------------------------------


def _search_spy(monkeypatch, answer=None):
    """evaluate's search_shard replaced: each call's arguments by name (defaults filled in) recorded; the real search
    run, or `answer(queries)` returned instead."""
    real = retromae.retrieval.search.search_shard
    signature, calls = inspect.signature(real), []

    def search_shard(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return answer(bound.arguments["queries"]) if answer else real(*args, **kwargs)

    monkeypatch.setattr(ev, "search_shard", search_shard)
    return calls


def test_dense_run_passes_index_backend_gpu_nprobe_and_the_encoder_s_device(tmp_path, monkeypatch):
    calls = _search_spy(monkeypatch)
    encoder = DenseEncoder()
    encoder.device = torch.device("cpu")  # its own object: passed on as it is, not a default
    search = SearchConfig(use_gpu="FALSE", backend="faiss", nprobe=7)
    found = ev.dense_run(encoder, _three_docs_two_queries(), search, tmp_path, FakeProcess(0, 1), 2)
    assert len(calls) == 1 and calls[0]["device"] is encoder.device
    assert (calls[0]["k"], calls[0]["factory"], calls[0]["backend"], calls[0]["nprobe"]) == (2, "Flat", "faiss", 7)
    assert calls[0]["use_gpu"] is False, "'FALSE' read as no GPU"
    # q0 . d = 1 2 3 -> d2 d1;  q1 . d = 0 2 0 -> d1, then d0 (the tie 0 0 by position)
    assert found[2].tolist() == [[2, 1], [1, 0]]


def test_grid_search_passes_index_backend_gpu_nprobe_and_device_of_the_config(tmp_path, monkeypatch):
    calls = _search_spy(monkeypatch)
    encoder = FakeLayerEncoder()
    encoder.device = torch.device("cpu")
    search = SearchConfig(layers=[1, 3], dims=[1, 3], use_gpu="FALSE", backend="faiss", nprobe=7)
    ev.matryoshka_run(encoder, _three_docs_two_queries(), search, tmp_path, FakeProcess(0, 1), 2)
    assert len(calls) == 4  # 2 layers x 2 dims
    for call in calls:
        assert (call["k"], call["factory"], call["backend"], call["nprobe"]) == (2, "Flat", "faiss", 7)
        assert call["use_gpu"] is False, "'FALSE' read as no GPU"
        assert call["device"] is encoder.device


def test_grid_keeps_a_process_s_padding_as_padding(tmp_path, monkeypatch):
    # every search finds one document, at shard position 0 with score 1, and pads its second place (-1): 3 documents
    # over 2 processes (shard_range: 3 x 1 // 2 = 1: d0 | d1 d2), so rank 1's first position is 1. Merged to depth 4
    # (2 + 2 columns): (1, 0) (1, 1), then the two pads, which stay -1
    def answer(queries):
        count = len(queries)
        return (np.tile(np.array([[1, -np.inf]], np.float32), (count, 1)), np.tile(np.array([[0, -1]]), (count, 1)))

    _search_spy(monkeypatch, answer)
    search = SearchConfig(layers=[1], dims=[2], use_gpu="false")
    found = in_threads(2, lambda state: ev.matryoshka_run(FakeLayerEncoder(), _three_docs_two_queries(), search,
                                                          tmp_path, state, 4))
    _, scores, positions = found[0][(1, 2)]
    assert positions.tolist() == [[0, 1, -1, -1]] * 2
    assert scores.tolist() == [[1, 1, -np.inf, -np.inf]] * 2


def _record_loads(monkeypatch) -> list:
    """np.load recorded: (file name, mmap_mode) per call."""
    loads, real_load = [], np.load

    def load(file, *args, **kwargs):
        loads.append((Path(file).name, kwargs.get("mmap_mode", args[0] if args else None)))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", load)
    return loads


@pytest.mark.parametrize("grid", [False, True])
def test_shards_are_read_memory_mapped(tmp_path, monkeypatch, grid):
    # a corpus shard (all layers' vectors for the grid) is mapped, never read whole into memory: the search reads it
    # a chunk at a time, the grid one cell's columns at a time
    loads = _record_loads(monkeypatch)
    data = _three_docs_two_queries()
    if grid:
        search = SearchConfig(layers=[1, 3], dims=[3], use_gpu="false")
        positions = ev.matryoshka_run(FakeLayerEncoder(), data, search, tmp_path, FakeProcess(0, 1), 2)[(1, 3)][2]
    else:
        positions = ev.dense_run(DenseEncoder(), data, SearchConfig(use_gpu="false"), tmp_path, FakeProcess(0, 1),
                                 2)[2]
    shards = [mode for name, mode in loads if name.startswith("shard-")]
    assert len(shards) == 2 and set(shards) == {"r"}, "the corpus shard and the query shard"
    assert positions[0].tolist() == [2, 1]  # q0 . d = 1 2 3 at layer 1: d2 d1


# ----- merging a block of queries at a time ------------------------------------------------------------------------


def test_merge_in_blocks_merges_each_block_of_queries_once(monkeypatch):
    merged = []
    real = ev.merge_top_k

    def merge_top_k(scores, positions, k):
        merged.append(len(scores[0]))
        return real(scores, positions, k)

    monkeypatch.setattr(ev, "merge_top_k", merge_top_k)
    parts = [(np.arange(10, dtype=np.float32).reshape(5, 2), np.arange(10).reshape(5, 2))]
    # 5 queries in blocks of 2: rows 0-1, 2-3, 4: three merges of 2, 2 and 1 rows; each row's best is its second
    # column (1, 3, 5, 7, 9)
    scores, positions = ev.merge_in_blocks(parts, 1, block=2)
    assert merged == [2, 2, 1]
    assert positions[:, 0].tolist() == [1, 3, 5, 7, 9] and scores[:, 0].tolist() == [1, 3, 5, 7, 9]


# ----- DupMAE -----------------------------------------------------------------------------------------------------


class RecordingHybridEncoder(FakeHybridEncoder):
    def __init__(self):
        super().__init__()
        self.texts = []

    def encode(self, texts, kind):
        self.texts.append((kind, list(texts)))
        return super().encode(texts, kind)


def test_hybrid_run_encodes_title_and_text_with_the_configured_separator(tmp_path):
    data = RetrievalData("tiny", TitledCorpus(["d0", "d1", "d2"]), {"x": "q0", "y": "q1"}, {})
    encoder = RecordingHybridEncoder()
    search = SearchConfig(representation="dupmae", title_separator=" | ")
    found = ev.hybrid_run(encoder, data, search, tmp_path, FakeProcess(0, 1), 2)
    assert encoder.texts == [("passage", ["T | text of d0", "T | text of d1", "T | text of d2"]),
                             ("query", ["q0", "q1"])]
    assert found[2].tolist() == [[2, 0], [1, 0]]  # joint scores q0 4 4 6, q1 0 1 -2 (test_pinned_evaluate._hybrid)


def test_hybrid_run_of_a_shard_without_documents_gives_typed_empty_results(tmp_path):
    # one process and no document: (2 queries, 0) results, float32 scores and int64 positions as a search gives
    data = RetrievalData("tiny", FakeCorpus([]), {"x": "q0", "y": "q1"}, {})
    query_ids, scores, positions = ev.hybrid_run(FakeHybridEncoder(), data, SearchConfig(representation="dupmae"),
                                                 tmp_path, FakeProcess(0, 1), 2)
    assert query_ids == ["x", "y"]
    assert (scores.shape, scores.dtype, positions.shape, positions.dtype) == ((2, 0), np.float32, (2, 0), np.int64)
    assert ev._to_run(data, query_ids, scores, positions) == {"x": {}, "y": {}}


# ----- the heatmap ------------------------------------------------------------------------------------------------


def _heatmap(tmp_path, monkeypatch, result, search):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    ev.write_matryoshka(result, search, tmp_path / "out.json")
    return figures[0].axes[0]


def test_heatmap_is_viridis_cells_fill_the_axes_ticks_at_the_cells_whatever_the_user_s_defaults(tmp_path,
                                                                                              monkeypatch):
    # a matplotlibrc of the user's with another colour map and square cells changes nothing
    search = SearchConfig(metrics=["map"], layers=[1, 2], dims=[8, 16])
    with matplotlib.rc_context({"image.cmap": "gray", "image.aspect": "equal"}):
        ax = _heatmap(tmp_path, monkeypatch, _grid_result(), search)
    assert ax.get_images()[0].get_cmap().name == "viridis"
    assert ax.get_aspect() == "auto"
    # ticks at the cells' columns and rows (0, 1), labelled with the dims and the layers
    assert ax.get_xticks().tolist() == [0, 1] and [t.get_text() for t in ax.get_xticklabels()] == ["8", "16"]
    assert ax.get_yticks().tolist() == [0, 1] and [t.get_text() for t in ax.get_yticklabels()] == ["1", "2"]


def test_heatmap_cell_at_the_mean_is_written_in_black(tmp_path, monkeypatch):
    # one layer, 3 dims: 0.25 0.5 0.75, mean (0.25 + 0.5 + 0.75) / 3 = 0.5 exactly: white strictly below it only
    result = {"dataset": "tiny", "matryoshka": {"1x8": {"map": 0.25}, "1x16": {"map": 0.5}, "1x32": {"map": 0.75}}}
    ax = _heatmap(tmp_path, monkeypatch, result, SearchConfig(metrics=["map"], layers=[1], dims=[8, 16, 32]))
    assert [(t.get_text(), t.get_color()) for t in ax.texts] == [("0.250", "white"), ("0.500", "black"),
                                                                 ("0.750", "black")]


# ----- the scratch folder shared by a launch ----------------------------------------------------------------------


class ThreadLaunch:
    """retromae.distributed's world and collectives for fake processes that are threads; `blind` ranks run on a
    machine that does not share the main process's files (their view of the folder check is 'not seen')."""

    def __init__(self, size, blind=()):
        self.size, self.blind, self.local = size, set(blind), threading.local()
        self.barrier, self.box = threading.Barrier(size), {}

    def world(self):
        return self.local.rank, self.size

    def _exchange(self, value):
        self.box[self.local.rank] = value
        self.barrier.wait(timeout=60)
        out = [self.box[r] for r in range(self.size)]
        self.barrier.wait(timeout=60)
        return out

    def broadcast_decision(self, value):
        return self._exchange(value)[0]

    def gather_objects(self, value):
        views = self._exchange(value)
        return [(False, *v[1:]) if r in self.blind else v for r, v in enumerate(views)]

    def run(self, monkeypatch, work):
        for name in ("world", "broadcast_decision", "gather_objects"):
            monkeypatch.setattr(retromae.distributed, name, getattr(self, name))

        def process(state):
            self.local.rank = state.process_index
            try:
                return work(state)
            except BaseException:
                self.barrier.abort()
                raise

        return in_threads(self.size, process)


def test_shared_work_dir_is_made_once_by_the_main_process_and_seen_by_all(tmp_path, monkeypatch):
    works = ThreadLaunch(2).run(monkeypatch, lambda state: ev._shared_work_dir(state, tmp_path / "root"))
    assert works[0] == works[1] and works[0].parent == tmp_path / "root"
    assert list((tmp_path / "root").iterdir()) == [works[0]], "one folder: the other process makes none"
    assert list(works[0].iterdir()) == [], "the folder check's file is gone"


def test_shared_work_dir_not_seen_by_a_process_names_the_settings_that_choose_it(tmp_path, monkeypatch):
    errors = []

    def work(state):
        try:
            ev._shared_work_dir(state, tmp_path / "root")
        except ConfigError as err:
            errors.append(str(err))

    ThreadLaunch(2, blind=[1]).run(monkeypatch, work)
    [folder] = (tmp_path / "root").iterdir()
    assert len(errors) == 2, "every process stops"
    assert all(e.startswith(f"the scratch folder (--work-dir, search.work_dir or $RETROMAE_WORK)={folder}: the "
                            "processes of this launch do not see the same folder: process 1 ") for e in errors)


# ----- suites ----------------------------------------------------------------------------------------------------


def test_load_suite_error_names_the_line_of_the_file(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("name: beir\ndatasets: [a]\n\ndatasetz: [b]\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: unknown key 'datasetz'"):
        ev.load_suite(str(path))


class Stdout:
    """sys.stdout that records what is written and when it is flushed."""

    def __init__(self):
        self.events = []

    def write(self, text):
        self.events.append(("write", text))
        return len(text)

    def flush(self):
        self.events.append(("flush", None))


def test_run_suite_says_each_line_at_once_builds_the_encoder_on_the_process_device(tmp_path, monkeypatch):
    # the unreadable dataset's note then a's row, each flushed as it is said (under a launch stdout is a pipe);
    # one encoder, from the suite's encoding settings, on this process's device (cuda:1 here: rank 1's GPU)
    calls, built = [], []
    state = FakeProcess(0, 1)
    state.device = torch.device("cuda", 1)
    monkeypatch.setattr(retromae.distributed, "process_state", lambda: state)
    monkeypatch.setattr(ev, "make_encoder", lambda model, encode, search, device: built.append((encode, device))
                        or "the encoder")
    monkeypatch.setattr(ev, "evaluate_model", lambda model, data, split, encode, search, encoder=None: calls.append(
        (encode, encoder)) or {"ndcg@10": 0.5})
    tiny_beir(tmp_path / "a")
    (tmp_path / "broken").mkdir()
    suite = SuiteConfig(name="t", data_root=str(tmp_path), datasets=["broken", "a"],
                        search=SearchConfig(metrics=["ndcg@10"]))
    out = Stdout()
    monkeypatch.setattr("sys.stdout", out)
    _, table = ev.run_suite("m", suite)
    monkeypatch.undo()
    note = next(line[2:] for line in table.splitlines() if line.startswith("- skipped broken: "))
    assert out.events == [("write", note), ("write", "\n"), ("flush", None),
                          ("write", "a: ndcg@10 0.5000"), ("write", "\n"), ("flush", None)]
    assert built == [(suite.encode, torch.device("cuda", 1))]
    assert calls == [(suite.encode, "the encoder")]


# ----- evaluate_model --------------------------------------------------------------------------------------------


class SettledDenseEncoder(DenseEncoder):
    def settings(self):
        return {"pooling": "fake"}


def _scratch_spy(monkeypatch):
    """evaluate's make_scratch recorded: (root, prefix, the folder made)."""
    made, real = [], ev.make_scratch

    def make_scratch(root, prefix):
        made.append((root, prefix, real(root, prefix)))
        return made[-1][2]

    monkeypatch.setattr(ev, "make_scratch", make_scratch)
    return made


@pytest.mark.parametrize("work_dir", [True, False])
def test_evaluate_model_dense_scratch_beside_the_output_or_in_the_work_dir_and_its_settings(tmp_path, monkeypatch,
                                                                                          work_dir):
    # q0 . d = 1 2 3 -> d2 first; q1 . d = 0 2 0 -> d1 first: both relevant documents at rank 1, recall@1 = 1.
    # One process: its own scratch folder (".retromae-eval-...") under search.work_dir, else beside the output
    monkeypatch.delenv("RETROMAE_WORK", raising=False)
    made = _scratch_spy(monkeypatch)
    data = data_of({"x": {"d2": 1}, "y": {"d1": 1}}, ids=["d0", "d1", "d2"], queries={"x": "q0", "y": "q1"})
    search = SearchConfig(metrics=["recall@1"], use_gpu="false", work_dir=str(tmp_path / "w") if work_dir else None)
    output = tmp_path / "o" / "r.json"
    result = ev.evaluate_model("m", data, search=search, output=str(output), encoder=SettledDenseEncoder())
    assert result["recall@1"] == 1.0 and "sparsity" not in result and "matryoshka" not in result, "dense: no extras"
    [(root, prefix, folder)] = made
    assert root == (tmp_path / "w" if work_dir else (tmp_path / "o").resolve())
    assert prefix == "retromae-eval-" and folder.parent == root and not folder.exists(), "made there, then removed"
    # the settings: depth 0 -> max(100, 1) = 100 (without the one more document of the identical-id rule), BEIR's
    # rule, one process, the encoder's own settings
    settings = result["settings"]
    assert (settings["depth"], settings["ignore_identical_ids"], settings["num_processes"]) == (100, True, 1)
    assert settings["pooling"] == "fake"


def test_evaluate_model_bm25_reads_the_split_asked_and_records_the_retrieval_depth(tmp_path):
    folder = tiny_beir(tmp_path / "a")
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    # depth 0 and recall@10: max(100, 10) = 100 documents (the config's own depth, 0, is not what was retrieved)
    result = ev.evaluate_model("bm25", str(folder), "dev", None, SearchConfig(metrics=["recall@10"]))
    assert result["split"] == "dev" and result["settings"]["depth"] == 100
    assert result["recall@10"] == 1.0  # "apple" finds d0


class TitledByIdCorpus(FakeCorpus):
    """Documents titled by a table: passages 'title<separator>text'."""

    titles = {"d0": "zebra", "d1": "apple", "d2": "pear"}

    def passages(self, separator=" "):
        return self.ids, [f"{self.titles[i]}{separator}plain text" for i in self.ids]


def test_evaluate_model_bm25_searches_title_and_text_joined_by_the_separator():
    # the query "apple" is d1's title only: joined by " | " it is a word of d1 ("apple | plain text"): recall@1 = 1
    data = RetrievalData("tiny", TitledByIdCorpus(["d0", "d1", "d2"]), {"q": "apple"}, {"q": {"d1": 1}})
    result = ev.evaluate_model("bm25", data, search=SearchConfig(metrics=["recall@1"], title_separator=" | "))
    assert result["recall@1"] == 1.0


# ----- the readability check --------------------------------------------------------------------------------------


@pytest.fixture
def readability_checks(monkeypatch):
    import retromae.inputs

    seen = []
    monkeypatch.setattr(retromae.inputs, "warn_if_unreadable", lambda tok, texts, name: seen.append((tok, texts)))
    monkeypatch.setattr(retromae.inputs, "SAMPLE_TEXTS", 3)
    monkeypatch.setattr(ev, "_READABILITY_CHECKED", set())
    return seen


class Nameless:
    """A tokenizer without a name_or_path."""


def test_readability_check_knows_a_collection_whatever_the_order_of_its_sources(readability_checks):
    tokenizer = Nameless()
    first, second = data_of(), data_of()
    first.sources = {"corpus": "/c/corpus.jsonl", "queries": "/c/queries.jsonl"}
    second.sources = {"queries": "/c/queries.jsonl", "corpus": "/c/corpus.jsonl"}  # the same, listed the other way
    ev.warn_if_unreadable_once(tokenizer, first, " ")
    ev.warn_if_unreadable_once(tokenizer, second, " ")
    assert len(readability_checks) == 1


def test_readability_check_tells_nameless_tokenizers_apart(readability_checks):
    one, two = Nameless(), Nameless()
    data = data_of()
    for tokenizer in (one, two, one, two):
        ev.warn_if_unreadable_once(tokenizer, data, " ")
    assert [tok for tok, _ in readability_checks] == [one, two]


def test_readability_check_samples_titles_joined_by_the_separator(readability_checks):
    data = RetrievalData("tiny", TitledCorpus(["d0", "d1"]), {}, {})
    ev.warn_if_unreadable_once(Nameless(), data, " | ")
    assert readability_checks[0][1] == ["T | text of d0", "T | text of d1"]


def test_evaluate_model_over_two_processes_shares_one_scratch_under_the_work_dir_encoders_on_each_device(
        tmp_path, monkeypatch):
    # 2 processes (threads): the encoder built by each from the encoding settings on its own device (cuda:<rank>
    # here: recorded, never used); one scratch folder, made by the main process under search.work_dir; the merged
    # result as with one process: q0 -> d2, q1 -> d1, recall@1 = 1, on the main process only
    from retromae.retrieval.encoder import EncodeConfig

    made, built, states = _scratch_spy(monkeypatch), [], threading.local()
    monkeypatch.setattr(retromae.distributed, "process_state", lambda: states.state)

    def make_encoder(model, encode, search, device):
        built.append((model, encode, device))
        return SettledDenseEncoder()

    monkeypatch.setattr(ev, "make_encoder", make_encoder)
    data = data_of({"x": {"d2": 1}, "y": {"d1": 1}}, ids=["d0", "d1", "d2"], queries={"x": "q0", "y": "q1"})
    encode = EncodeConfig(query_max_len=16)
    search = SearchConfig(metrics=["recall@1"], use_gpu="false", work_dir=str(tmp_path / "w"))

    def process(state):
        state.device = torch.device("cuda", state.process_index)
        states.state = state
        return ev.evaluate_model("m", data, None, encode, search)

    results = ThreadLaunch(2).run(monkeypatch, process)
    assert results[1] is None and results[0]["recall@1"] == 1.0
    assert sorted(built, key=lambda b: b[2].index) == [("m", encode, torch.device("cuda", 0)),
                                                       ("m", encode, torch.device("cuda", 1))]
    [(root, prefix, folder)] = made
    assert (root, prefix) == (tmp_path / "w", "retromae-shards-") and not folder.exists()


class TokenizedEncoder(SettledDenseEncoder):
    """SettledDenseEncoder with a tokenizer, reading titled texts 'T | text of dN' as 'text of dN'."""

    def __init__(self):
        super().__init__()
        self.tokenizer = Nameless()

    def encode(self, texts, kind, show_progress=False, out=None):
        super().encode([t.removeprefix("T | ") for t in texts[:]], kind, out=out)


def test_evaluate_model_checks_the_readability_of_the_titled_texts_with_the_encoder_s_tokenizer(tmp_path,
                                                                                              readability_checks):
    # 3 titled documents, 3 sampled (every one): joined by the search's separator, read by the encoder's tokenizer
    data = RetrievalData("tiny", TitledCorpus(["d0", "d1", "d2"]), {"x": "q0"}, {"x": {"d2": 1}})
    encoder = TokenizedEncoder()
    search = SearchConfig(metrics=["recall@1"], use_gpu="false", title_separator=" | ", work_dir=str(tmp_path))
    assert ev.evaluate_model("m", data, search=search, encoder=encoder)["recall@1"] == 1.0  # q0 . d = 1 2 3
    assert readability_checks == [(encoder.tokenizer, ["T | text of d0", "T | text of d1", "T | text of d2"])]


def test_evaluate_model_returns_its_result_when_the_scratch_cannot_be_fully_removed(tmp_path, monkeypatch):
    # a scratch folder on NFS can keep '.nfsXXXX' files of still-open shards: rmtree fails there, which must not
    # lose the evaluation (the leftover is removed when the folder is next used)
    import types

    removed = []

    def rmtree(path, ignore_errors=False):
        removed.append(path)
        if not ignore_errors:
            raise OSError(39, "Directory not empty", str(path))

    monkeypatch.setattr(ev, "shutil", types.SimpleNamespace(rmtree=rmtree))
    made = _scratch_spy(monkeypatch)
    data = data_of({"x": {"d2": 1}}, ids=["d0", "d1", "d2"], queries={"x": "q0"})
    search = SearchConfig(metrics=["recall@1"], use_gpu="false", work_dir=str(tmp_path / "w"))
    assert ev.evaluate_model("m", data, search=search, encoder=SettledDenseEncoder())["recall@1"] == 1.0
    assert removed == [made[0][2]]


# ----- encoders, result rows, gathered results ---------------------------------------------------------------------


@pytest.mark.parametrize("representation, module, name", [("dense", "retromae.retrieval.evaluate", "TextEncoder"),
                                                          ("dupmae", "retromae.retrieval.hybrid", "HybridEncoder"),
                                                          ("splade", "retromae.retrieval.sparse", "SparseTextEncoder")])
def test_make_encoder_builds_the_representation_s_encoder_from_the_model_settings_and_device(monkeypatch,
                                                                                           representation, module,
                                                                                           name):
    import importlib

    from retromae.retrieval.encoder import EncodeConfig

    built = []
    monkeypatch.setattr(importlib.import_module(module), name,
                        lambda model, encode, device=None: built.append((name, model, encode, device)) or name)
    encode, device = EncodeConfig(pooling="mean"), torch.device("cuda", 1)
    assert ev.make_encoder("m", encode, SearchConfig(representation=representation), device) == name
    assert built == [(name, "m", encode, device)]


def test_result_row_times_the_evaluation_to_a_tenth_of_a_second_and_writes_indented_json(tmp_path, monkeypatch):
    # the clock reads 10.0 when the evaluation starts and 12.345 when it is scored: 2.345 s -> 2.3
    import types

    clock = iter([10.0, 12.345])
    monkeypatch.setattr(ev, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    data = data_of({"x": {"d2": 1}}, ids=["d0", "d1", "d2"], queries={"x": "q0"})
    data.sources = {"corpus": "/c/corpus.jsonl"}
    search = SearchConfig(metrics=["recall@1"], use_gpu="false", work_dir=str(tmp_path / "w"))
    output = tmp_path / "r.json"
    result = ev.evaluate_model("m", data, search=search, output=str(output), encoder=SettledDenseEncoder())
    assert result["seconds"] == 2.3
    assert (result["num_documents"], result["num_queries"], result["sources"]) == (3, 1, {"corpus": "/c/corpus.jsonl"})
    lines = output.read_text().splitlines()
    assert lines[0] == "{" and lines[1].startswith(' "') and lines[-1] == "}", "indented by one space"


def test_gathered_results_are_read_memory_mapped(tmp_path, monkeypatch):
    loads = _record_loads(monkeypatch)
    # 2 processes, one query: rank 0 has 3 at 0, rank 1 has 5 at 1: the top 2 is 5 3 at 1 0
    scores = [np.array([[3]], np.float32), np.array([[5]], np.float32)]
    positions = [np.array([[0]]), np.array([[1]])]
    found = in_threads(2, lambda state: ev._gather_results(["q"], scores[state.process_index],
                                                           positions[state.process_index], 2, tmp_path, state))
    assert found[0][1].tolist() == [[5, 3]] and found[0][2].tolist() == [[1, 0]]
    gathered = [mode for name, mode in loads if name.startswith((".scores-", ".positions-"))]
    assert len(gathered) == 4 and set(gathered) == {"r"}


# (the name avoids 'seismic': the mutation runs leave out tests so named, as Seismic's own deadlock under mutmut)
def test_evaluate_model_splade_scores_the_approximate_run_and_the_exact_one_beside_it(tmp_path, monkeypatch):
    # sparse_run replaced: its run finds d0 for x (recall@1 0), the exact run beside it d2 (recall@1 1); it gets the
    # launch's scratch folder to write its shards into
    import retromae.retrieval.sparse

    made, calls = _scratch_spy(monkeypatch), []

    def sparse_run(encoder, data, search, work, state, depth):
        calls.append((work, depth))
        found = (["x"], np.array([[2.0]], np.float32), np.array([[0]]))
        exact = (["x"], np.array([[3.0]], np.float32), np.array([[2]]))
        return found, {"nnz": 1.5, "exact_run": exact}

    monkeypatch.setattr(retromae.retrieval.sparse, "sparse_run", sparse_run)
    data = data_of({"x": {"d2": 1}}, ids=["d0", "d1", "d2"], queries={"x": "q0"})
    search = SearchConfig(representation="splade", metrics=["recall@1"], work_dir=str(tmp_path / "w"))
    result = ev.evaluate_model("m", data, search=search, encoder=SettledDenseEncoder())
    assert calls == [(made[0][2], 101)]  # depth 100, one more for BEIR's identical-id rule
    assert result["recall@1"] == 0.0 and result["sparsity"] == {"nnz": 1.5, "exact": {"recall@1": 1.0}}
    assert result["settings"]["pooling"] == "fake" and result["model"] == "m"


def test_evaluate_model_dupmae_searches_in_the_launch_s_scratch(tmp_path, monkeypatch):
    # hybrid_run replaced: it gets the scratch folder made for the launch and the depth (100 + 1 for BEIR's rule)
    from retromae.retrieval.encoder import EncodeConfig

    made, calls = _scratch_spy(monkeypatch), []

    def hybrid_run(encoder, data, search, work, state, depth):
        calls.append((work, depth))
        return ["x"], np.array([[3.0]], np.float32), np.array([[2]])

    monkeypatch.setattr(ev, "hybrid_run", hybrid_run)
    encoder = FakeHybridEncoder()
    encoder.cfg, encoder.tokenizer = EncodeConfig(pooling="mean"), None
    data = data_of({"x": {"d2": 1}}, ids=["d0", "d1", "d2"], queries={"x": "q0"})
    search = SearchConfig(representation="dupmae", metrics=["recall@1"], work_dir=str(tmp_path / "w"))
    result = ev.evaluate_model("m", data, search=search, encoder=encoder)
    assert calls == [(made[0][2], 101)] and result["recall@1"] == 1.0


def test_evaluate_model_grid_over_two_processes_answers_on_the_main_process_only(tmp_path, monkeypatch):
    # matryoshka_run replaced: as the real one, the merged grid on the main process and None on the others; the
    # other process must not read a cell of a grid it does not have. x's relevant d2 found first: recall@1 = 1
    states = threading.local()
    monkeypatch.setattr(retromae.distributed, "process_state", lambda: states.state)
    monkeypatch.setattr(ev, "make_encoder", lambda model, encode, search, device: SettledDenseEncoder())
    cell = (["x"], np.array([[3.0]], np.float32), np.array([[2]]))
    monkeypatch.setattr(ev, "matryoshka_run", lambda encoder, data, search, work, state, depth:
                        {(1, 2): cell} if state.is_main_process else None)
    data = data_of({"x": {"d2": 1}}, ids=["d0", "d1", "d2"], queries={"x": "q0"})
    search = SearchConfig(metrics=["recall@1"], layers=[1], dims=[2], use_gpu="false", work_dir=str(tmp_path / "w"))

    def process(state):
        states.state = state
        return ev.evaluate_model("m", data, search=search)

    results = ThreadLaunch(2).run(monkeypatch, process)
    assert results[1] is None and results[0]["recall@1"] == 1.0
    assert results[0]["matryoshka"] == {"1x2": {"recall@1": 1.0}}


def test_evaluate_model_dupmae_searches_the_joint_representation(tmp_path):
    # joint scores (test_pinned_evaluate._hybrid): q0 4 4 6 -> d2, q1 0 1 -2 -> d1: recall@1 = 1 for both
    from retromae.retrieval.encoder import EncodeConfig

    encoder = FakeHybridEncoder()
    encoder.cfg, encoder.tokenizer = EncodeConfig(pooling="mean"), None
    data = data_of({"x": {"d2": 1}, "y": {"d1": 1}}, ids=["d0", "d1", "d2"], queries={"x": "q0", "y": "q1"})
    search = SearchConfig(representation="dupmae", metrics=["recall@1"], work_dir=str(tmp_path))
    result = ev.evaluate_model("m", data, search=search, encoder=encoder)
    assert result["recall@1"] == 1.0 and result["settings"]["pooling"] == "mean"


class ThreeLayerEncoder(FakeLayerEncoder):
    """Layers [1, 5, 3]: layer 5's block a copy of layer 1's, layer 3's as in FakeLayerEncoder."""

    table = {t: v[:3] + v[:3] + v[3:] for t, v in FakeLayerEncoder.table.items()}

    def settings(self):
        return {"pooling": "fake"}


def test_evaluate_model_grid_scores_every_cell_and_reports_the_last_layer_at_full_width(tmp_path):
    # relevant: x -> d0, y -> d2. q . d over each layer's 3 coordinates (FakeLayerEncoder's table):
    #   layers 1 and 5: q0 1 2 3 -> d2, q1 0 2 0 -> d1: recall@1 0;  layer 3: q0 3 2 1 -> d0, q1 0 0 3 -> d2: 1
    # the row's own metrics are the last layer's (3) at the widest dims (3)
    data = data_of({"x": {"d0": 1}, "y": {"d2": 1}}, ids=["d0", "d1", "d2"], queries={"x": "q0", "y": "q1"})
    search = SearchConfig(metrics=["recall@1"], layers=[1, 5, 3], dims=[3], use_gpu="false", work_dir=str(tmp_path))
    output = tmp_path / "out" / "r.json"
    result = ev.evaluate_model("m", data, search=search, output=str(output), encoder=ThreeLayerEncoder())
    assert result["recall@1"] == 1.0
    assert result["matryoshka"] == {"1x3": {"recall@1": 0.0}, "5x3": {"recall@1": 0.0}, "3x3": {"recall@1": 1.0}}
    assert (output.parent / "r.matryoshka.md").read_text().endswith(
        "| 1 | 0.0000 |\n| 5 | 0.0000 |\n| 3 | 1.0000 |\n")
    assert (output.parent / "r.matryoshka.png").is_file()
    assert result["settings"]["pooling"] == "fake"
