"""Corpus reading with clear errors, cutting into examples, and process-sharded, resumable batches."""

import json

import pytest
import torch

from retromae.data.batches import Position, StoreBatches, StreamBatches
from retromae.data.corpus import CorpusError, TextFields, read_corpus
from retromae.data.examples import (
    Cutter,
    DataConfig,
    build_example_store,
    build_example_stream,
    pack_blocks,
    split_sentences,
)


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
    assert blocks == [[1, 1, 1], [2, 2, 2, 2, 3, 3], [4] * 6, [4] * 3, [5]]
    assert [t for b in blocks for t in b] == [t for s in sentences for t in s], "order and content are kept"


def test_cutter_passage_and_packed(tiny_tokenizer, docstrings):
    long_text = " ".join(d["text"] for d in docstrings[:10])
    cls, sep = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    passage = Cutter(tiny_tokenizer, DataConfig(cut="passage", max_len=32))([long_text, "short one."])
    assert len(passage) == 2 and len(passage[0]) == 32 and passage[1][-1] == sep
    packed = Cutter(tiny_tokenizer, DataConfig(cut="packed", max_len=32))([long_text])
    assert len(packed) > 5
    assert all(len(b) <= 32 and b[0] == cls and b[-1] == sep for b in packed)
    inner = [t for b in packed for t in b[1:-1]]
    # every token of the document is kept, in order
    flat = [t for s in tiny_tokenizer(split_sentences(long_text), add_special_tokens=False)["input_ids"] for t in s]
    assert inner == flat


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
    first = store_for(tmp_path, tiny_tokenizer, corpus)
    again = store_for(tmp_path, tiny_tokenizer, corpus)
    assert first._fingerprint == again._fingerprint and len(first) == 20
    corpus.write_text("".join(json.dumps({"text": f"other {i}."}) + "\n" for i in range(30)))
    assert len(store_for(tmp_path, tiny_tokenizer, corpus)) == 30


def test_store_surfaces_corpus_errors(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        store_for(tmp_path, tiny_tokenizer, corpus)


def test_stream_batches_shard_and_resume(tmp_path, tiny_tokenizer, corpus_file):
    cfg = DataConfig(corpus=[str(corpus_file)], max_len=48, streaming=True)
    stream = build_example_stream(cfg, tiny_tokenizer)
    one = StreamBatches(stream, 8, 1, 0, seed=1, pad_id=0, shuffle_buffer=64)
    halves = [StreamBatches(build_example_stream(cfg, tiny_tokenizer), 4, 2, r, seed=1, pad_id=0, shuffle_buffer=64)
              for r in range(2)]
    run = take(one.iterate(Position()), 5)
    for (full, _), (a, _), (b, _) in zip(run, take(halves[0].iterate(Position()), 5), take(halves[1].iterate(Position()), 5)):
        assert torch.equal(full["seeds"], torch.cat([a["seeds"], b["seeds"]]))
    resumed = take(one.iterate(run[1][1]), 2)
    assert all(torch.equal(x[0]["input_ids"], y[0]["input_ids"]) for x, y in zip(run[2:4], resumed))
