"""Corpus reading with clear errors, cutting into examples, and process-sharded, resumable batches."""

import json
from pathlib import Path

import pytest
import torch

from retromae.config import ConfigError
from retromae.data.batches import Position, StoreBatches, collate
from retromae.data.corpus import CorpusError, TextFields, read_corpus
from retromae.data.examples import DataConfig, ExampleBuilder, pack_blocks, split_sentences
from retromae.data.store import build_example_store, cache_folder, file_ranges, plan_shards, shard_rows
from retromae.data.stream import StreamBatches


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def texts(path, fmt="auto", **fields):
    return list(read_corpus([path], fmt, TextFields(**fields)))


def test_jsonl_with_beir_title_and_text(tmp_path):
    p = write(tmp_path / "c.jsonl", '{"_id": "1", "title": "Fox", "text": "jumps."}\n{"text": "no title"}\n')
    assert texts(p) == ["Fox jumps.", "no title"]
    assert texts(p, title_field=None) == ["jumps.", "no title"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": "broken"\n', r"c\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "x", "id": 3}\n', r"c\.jsonl:2: no 'text' field \(fields: body, id\); set data.text_field"),
        ('{"text": "ok"}\n{"text": "   "}\n', r"c\.jsonl:2: empty text"),
        ('["a list"]\n', r"c\.jsonl:1: expected a JSON object"),
        ('{"text": 5}\n', r"c\.jsonl:1: field 'text' is int, not a string"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    p = write(tmp_path / "c.jsonl", content)
    with pytest.raises(CorpusError, match=message):
        texts(p)


def test_blank_lines_and_a_byte_order_mark_are_harmless(tmp_path):
    p = write(tmp_path / "c.jsonl", b'\xef\xbb\xbf{"text": "first"}\n\n{"text": "second"}\n\n')
    assert texts(p) == ["first", "second"]
    t = write(tmp_path / "c.txt", b"\xef\xbb\xbfone\n\ntwo\n\n")
    assert texts(t) == ["one", "two"]


def test_tsv_rows_must_keep_the_first_rows_columns(tmp_path):
    t = write(tmp_path / "collection.tsv", "0\tfirst passage\n6\n2\tthird\n")
    with pytest.raises(CorpusError, match=r"collection\.tsv:2: has 1 tab-separated column\(s\) where the file's first row "
                       r"has 2"):
        texts(t)


def test_non_utf8_line_is_named(tmp_path):
    p = write(tmp_path / "c.txt", b"fine line\nsecond \xe9t\xe9 line\n")
    with pytest.raises(CorpusError, match=r"c\.txt:2: not UTF-8 .*re-encode"):
        texts(p)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(CorpusError, match="nope.jsonl: file not found"):
        texts(str(tmp_path / "nope.jsonl"))
    p = write(tmp_path / "corpus.dat", "x\n")
    with pytest.raises(CorpusError, match="cannot tell the format"):
        texts(p)


def test_skip_empty_and_plain_text_and_tsv(tmp_path):
    p = write(tmp_path / "c.jsonl", '{"text": "one"}\n{"text": " "}\n{"text": "two"}\n')
    assert texts(p, skip_empty=True) == ["one", "two"]
    t = write(tmp_path / "collection.tsv", "0\tfirst passage\n1\tsecond passage\n")
    assert texts(t) == ["first passage", "second passage"]
    t2 = write(tmp_path / "titled.tsv", "0\tTitle\tbody\n")
    assert texts(t2, tsv_title_column=1) == ["Title body"]
    with pytest.raises(CorpusError, match=r"titled\.tsv:1: has 3 tab-separated column"):
        texts(t2, tsv_text_column=5)


def test_sentence_split_and_packing():
    assert split_sentences("It rains. The sun shines! Is it 3.5 now? yes.\nNext") == [
        "It rains.", "The sun shines!", "Is it 3.5 now? yes.", "Next"]
    sentences = [[1] * 3, [2] * 4, [3] * 2, [4] * 9, [5] * 1]
    blocks = pack_blocks(sentences, budget=6)
    assert blocks == [[1, 1, 1], [2, 2, 2, 2, 3, 3], [4] * 6, [4, 4, 4, 5]]
    assert [t for b in blocks for t in b] == [t for s in sentences for t in s], "order and content are kept"
    # a block less than min_fill full takes the head of the sentence that does not fit
    assert pack_blocks(sentences, budget=6, min_fill=0.9) == [[1, 1, 1, 2, 2, 2], [2, 3, 3, 4, 4, 4], [4] * 6,
                                                               [5]]


def cut(tokenizer, texts, join=False, **data):
    builder = ExampleBuilder(tokenizer, DataConfig(**data))
    return list(builder.examples(iter((t, None) for t in texts), join))


def test_passage_packed_and_document_cuts(tiny_tokenizer, docstrings):
    long_text = " ".join(d["text"] for d in docstrings[:10])
    cls, sep = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    passage = cut(tiny_tokenizer, [long_text, "short one."], cut="passage", max_len=32)
    assert len(passage) == 2 and len(passage[0].input_ids) == 32 and passage[1].input_ids[-1] == sep
    assert [e.doc for e in passage] == [0, 1]
    packed = cut(tiny_tokenizer, [long_text], cut="packed", max_len=32)
    assert len(packed) > 5 and {e.doc for e in packed} == {0}, "the blocks of one document share its id"
    assert all(len(e.input_ids) <= 32 and e.input_ids[0] == cls and e.input_ids[-1] == sep for e in packed)
    inner = [t for e in packed for t in e.input_ids[1:-1]]
    # every token of the document is kept, in order
    flat = [t for s in tiny_tokenizer(split_sentences(long_text), add_special_tokens=False)["input_ids"] for t in s]
    assert inner == flat
    document = cut(tiny_tokenizer, [long_text, "One. Two."], cut="document", max_len=200)
    assert len(document[0].input_ids) == 200 and sum(document[0].sentence_lengths) == 200
    assert document[0].input_ids == flat[:200] and document[1].sentence_lengths == [2, 2]
    batch = collate([e.input_ids for e in document], [0, 1], 0, 1, 0, 8, [e.doc for e in document],
                    [e.sentence_lengths for e in document])
    assert batch["sentence_ids"][1].tolist()[:5] == [0, 0, 1, 1, -1] and batch["doc"].tolist() == [0, 1]


def test_rows_joined_into_documents_pack_into_full_blocks(tiny_tokenizer, docstrings, tmp_path):
    """A corpus stored one sentence per row (BookCorpus) packs across rows into blocks of nearly max_len; a blank
    line ends a document; without join_rows every row would be its own short example."""
    sentences = [s for d in docstrings for s in split_sentences(d["text"])]
    # book-like sentences: this tiny vocabulary cuts words into many pieces, so keep the shorter ones
    sentences = [s for s, ids in zip(sentences, tiny_tokenizer(sentences, add_special_tokens=False)["input_ids"])
                 if len(ids) <= 40][:600]
    lines = sentences[:300] + [""] + sentences[300:600]
    corpus = write(tmp_path / "books.txt", "\n".join(lines) + "\n")
    joined = build_example_store(DataConfig(corpus=[corpus], cut="packed", max_len=256, join_rows=True,
                                            cache_dir=str(tmp_path / "c1")), tiny_tokenizer)
    lengths = [len(ids) for ids in joined["input_ids"]]
    assert sum(lengths) / len(lengths) >= 0.9 * 256
    assert len(set(joined["doc"])) == 2, "the blank line ends the first book"
    alone = build_example_store(DataConfig(corpus=[corpus], cut="packed", max_len=256, cache_dir=str(tmp_path / "c2")),
                                tiny_tokenizer)
    assert len(alone) == 600 and len(joined) < 0.5 * len(alone)


def store_for(tmp_path, tokenizer, corpus, **kw):
    cfg = DataConfig(corpus=[str(corpus)], max_len=48, cache_dir=str(tmp_path / "cache"), **kw)
    return build_example_store(cfg, tokenizer)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_two_processes_see_exactly_the_one_process_batch(tmp_path, tiny_tokenizer, corpus_file):
    store = store_for(tmp_path, tiny_tokenizer, corpus_file)
    one = StoreBatches(store, 8, 1, 0, seed=3, pad_id=0)
    two = [StoreBatches(store, 4, 2, r, seed=3, pad_id=0) for r in range(2)]
    assert one.batches_per_epoch == len(store) // 8 == two[0].batches_per_epoch
    start = Position(0, one.batches_per_epoch - 2)  # crosses an epoch boundary
    for (full, pos), (a, _), (b, _) in zip(take(one.iterate(start), 4), take(two[0].iterate(start), 4),
                                           take(two[1].iterate(start), 4)):
        assert torch.equal(full["seeds"], torch.cat([a["seeds"], b["seeds"]]))
        rows = [r[m.bool()].tolist() for x in (a, b) for r, m in zip(x["input_ids"], x["attention_mask"])]
        assert rows == [r[m.bool()].tolist() for r, m in zip(full["input_ids"], full["attention_mask"])]
    assert pos == Position(1, 2)


def test_epochs_reshuffle_and_resume_continues_exactly(tmp_path, tiny_tokenizer, corpus_file):
    store = store_for(tmp_path, tiny_tokenizer, corpus_file)
    batches = StoreBatches(store, 8, 1, 0, seed=3, pad_id=0)
    n = batches.batches_per_epoch
    run = take(batches.iterate(Position()), 2 * n)
    first, second = run[:n], run[n:]
    seen = lambda part: sorted(s for b, _ in part for s in b["seeds"].tolist())  # noqa: E731
    assert first[0][0]["seeds"].tolist() != second[0][0]["seeds"].tolist()
    assert len(set(seen(first))) == n * 8, "no example twice in an epoch"
    resumed = take(batches.iterate(run[4][1]), 3)
    for (a, pa), (b, pb) in zip(run[5:8], resumed):
        assert pa == pb and all(torch.equal(a[k], b[k]) for k in a)


def test_store_is_cached_and_rebuilt_when_the_corpus_changes(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"text number {i} here."}) + "\n" for i in range(20)))
    cfg = DataConfig(corpus=[str(corpus)], max_len=48, cache_dir=str(tmp_path / "cache"))
    first = build_example_store(cfg, tiny_tokenizer)
    meta = cache_folder(cfg, tiny_tokenizer) / "meta.json"
    built = meta.stat().st_mtime_ns
    assert len(build_example_store(cfg, tiny_tokenizer)) == len(first) == 20 and meta.stat().st_mtime_ns == built
    corpus.write_text("".join(json.dumps({"text": f"other {i}."}) + "\n" for i in range(30)))
    assert len(store_for(tmp_path, tiny_tokenizer, corpus)) == 30


def test_store_surfaces_corpus_errors(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        store_for(tmp_path, tiny_tokenizer, corpus)


def test_shards_cover_the_file_line_for_line(tmp_path, docstrings):
    corpus = write(tmp_path / "c.jsonl", "".join(json.dumps(d) + "\n" for d in docstrings[:400]))
    ranges = file_ranges(corpus, 20_000)
    assert len(ranges) > 5 and ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    cfg = DataConfig(corpus=[corpus], shard_mb=1)
    whole = [t for t, _ in shard_rows(plan_shards(cfg)[0], cfg)]
    import dataclasses

    pieces = [dataclasses.replace(plan_shards(cfg)[0], start=a, end=b, first_line=line) for a, b, line in ranges]
    assert [t for p in pieces for t, _ in shard_rows(p, cfg)] == whole == [d["title"] + " " + d["text"] for d in
                                                                           docstrings[:400]]
    # a bad line deep in a shard is still named by its line in the file
    lines = open(corpus).read().splitlines()
    lines[333] = '{"text": broken'
    bad = write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    shard = [p for p in pieces if p.first_line <= 334][-1]
    with pytest.raises(CorpusError, match=r"bad\.jsonl:334: not valid JSON"):
        list(shard_rows(dataclasses.replace(shard, source=bad), cfg))


def test_stream_reads_its_share_and_resumes_from_cursors(tmp_path, tiny_tokenizer, docstrings):
    corpus = write(tmp_path / "c.jsonl", "".join(json.dumps(d) + "\n" for d in docstrings[:600]))
    cfg = DataConfig(corpus=[corpus], max_len=48, streaming=True, shuffle_chunk=50)
    for workers in (0, 2):
        batches = StreamBatches(cfg, tiny_tokenizer, 8, 1, 0, seed=1, pad_id=0, num_workers=workers)
        run = take(batches.iterate(Position()), 12)
        assert all(b["input_ids"].shape[0] == 8 for b, _ in run)
        resumed = take(batches.iterate(run[6][1]), 5)
        for (a, pa), (b, pb) in zip(run[7:], resumed):
            assert pa == pb and all(torch.equal(a[k], b[k]) for k in a), f"resume with {workers} workers"
    halves = [StreamBatches(cfg, tiny_tokenizer, 4, 2, r, seed=1, pad_id=0) for r in range(2)]
    docs = [{d for b, _ in take(h.iterate(Position()), 10) for d in b["doc"].tolist()} for h in halves]
    assert docs[0] and docs[1] and not docs[0] & docs[1], "each process reads its own shards"


PREPARE = """
import sys
from transformers import AutoTokenizer
from retromae.data.examples import DataConfig
from retromae.data.store import prepare_store
corpus, cache, rank = sys.argv[1:4]
cfg = DataConfig(corpus=[corpus], cut="packed", max_len=64, shard_mb=1, cache_dir=cache)
store = prepare_store(cfg, AutoTokenizer.from_pretrained(sys.argv[4]), rank=int(rank), world=2)
print(len(store))
"""


@pytest.mark.slow
def test_two_processes_prepare_the_cache_one_process_would(tmp_path, tiny_model, tiny_tokenizer, docstrings):
    """Each process of a launch builds its share of the shards and waits for the others by watching the folder;
    the cache is the one a single process builds (same examples, same order, same documents)."""
    import subprocess
    import sys

    text = "".join(json.dumps(d) + "\n" for d in docstrings)
    corpus = write(tmp_path / "c.jsonl", text * (2_600_000 // len(text) + 1))  # about 2.6 MB: 3 shards of 1 MB
    cache = str(tmp_path / "two")
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE, corpus, cache, str(r), str(tiny_model)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    cfg = DataConfig(corpus=[corpus], cut="packed", max_len=64, shard_mb=1, cache_dir=str(tmp_path / "one"))
    one = build_example_store(cfg, tiny_tokenizer)
    assert len(plan_shards(cfg)) == 3 and [int(o.strip().splitlines()[-1]) for o, _ in outputs] == [len(one)] * 2
    from retromae.data.store import open_store

    two = open_store(cache_folder(DataConfig(**{**cfg.__dict__, "cache_dir": cache}), tiny_tokenizer))
    assert two["input_ids"] == one["input_ids"] and two["doc"] == one["doc"]


@pytest.mark.slow
def test_a_killed_preparation_worker_ends_the_launch(tmp_path, tiny_model, docstrings, monkeypatch):
    """A worker killed while tokenizing (SIGKILL, as the OOM killer does): multiprocessing.Pool waited for its
    result forever, and the other process of the launch watched the folder for 10 hours. Now both stop within
    seconds, with one message."""
    from conftest import accelerate_launch

    text = "".join(json.dumps(d) + "\n" for d in docstrings)
    corpus = write(tmp_path / "c.jsonl", text * (2_600_000 // len(text) + 1))  # 3 shards: process 0 builds 0 and 2
    monkeypatch.setenv("RETROMAE_FAULT", "prepare-kill:2")
    recipe = str(Path(__file__).resolve().parents[1] / "pretrain" / "retromae_nfcorpus_small.yaml")
    done = accelerate_launch(["-m", "retromae", "pretrain", recipe, f"model.name_or_path={tiny_model}",
                              f"data.corpus=[{corpus}]", "data.max_len=64", "data.shard_mb=1", "data.num_proc=2",
                              f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'out'}",
                              "train.max_steps=2", "train.report_to=none"], cwd=tmp_path, timeout=240)
    assert done.returncode != 0
    message = "a worker process died while tokenizing the corpus"
    # the first process to stop says why; the launcher then stops the other (on another machine, the other
    # process reads the same message from the marker left in the cache: the test below)
    assert f"retromae: error: data preparation: {message}" in done.stderr, done.stderr[-4000:]
    markers = list((tmp_path / "cache").rglob("*.failed"))
    assert len(markers) == 1 and message in markers[0].read_text()


def test_any_failure_of_a_worker_is_left_for_the_other_processes(tmp_path, tiny_tokenizer, monkeypatch):
    """An exception other than bad input (here injected) used to leave no marker: the other processes waited."""
    from retromae.data.store import _wait_for

    corpus = write(tmp_path / "c.jsonl", "".join(json.dumps({"text": f"text {i}."}) + "\n" for i in range(20)))
    cfg = DataConfig(corpus=[corpus], max_len=48, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setenv("RETROMAE_FAULT", "prepare-raise:0")
    with pytest.raises(ConfigError, match="RuntimeError: injected failure while building shard 0"):
        build_example_store(cfg, tiny_tokenizer)
    folder = cache_folder(cfg, tiny_tokenizer)
    with pytest.raises(ConfigError, match="RuntimeError: injected failure while building shard 0"):
        _wait_for(folder / "meta.json", folder, 1.0)  # what another process of the launch does
    monkeypatch.delenv("RETROMAE_FAULT")
    assert len(build_example_store(cfg, tiny_tokenizer)) == 20, "the next attempt is not stopped by the old marker"


def test_each_process_removes_only_its_own_shards_leftovers(tmp_path):
    """Processes given a rank without a process group start unsynchronised: process 0's clean-up of an earlier
    attempt must not delete the temporary file process 1 is writing (it did: a flaky 2-process preparation)."""
    from retromae.data.store import Shard, _remove_leftovers

    names = [".shard-00000.11.tmp", "shard-00000.failed", ".shard-00001.22.tmp", "shard-00001.failed",
             "worker-33.failed", "shard-00002.arrow"]
    for name in names:
        (tmp_path / name).write_text("x")
    _remove_leftovers(tmp_path, [Shard(0, "c.jsonl", "jsonl")], rank=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shard-00001.22.tmp", "shard-00001.failed",
                                                          "shard-00002.arrow"]
    _remove_leftovers(tmp_path, [Shard(1, "c.jsonl", "jsonl")], rank=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00002.arrow"]
