"""Turn corpus rows into tokenized training examples: per passage, packed blocks of consecutive sentences, or whole
documents (for objectives that cut their own spans).

Rows are grouped into documents first: each row is a document, or (`data.join_rows`) consecutive rows form one
stream (BookCorpus stores one sentence per row), a blank line or a change of `data.document_field` ending a
document. Every example records its document (`doc`, unique in the corpus), so that contrastive objectives never
take two blocks of one document for negatives of each other. Tokenization is batched: one tokenizer call per
chunk of rows. Storing (`retromae.data.store`) and streaming (`retromae.data.stream`) build on this.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from retromae.config import ConfigError
from retromae.data.corpus import FORMATS, Row, TextFields, read_corpus, source_signature

CUT_MODES = ("passage", "packed", "document")


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=list)  # corpus files (jsonl / txt / tsv, optionally .gz) or HF datasets
    format: str = "auto"  # auto (by file extension) | jsonl | text | tsv | hf
    text_field: str = "text"  # JSON / HF field holding the text
    title_field: str | None = "title"  # field prepended to the text when present (BEIR corpora); null to ignore
    title_separator: str = " "  # put between title and text
    tsv_text_column: int = -1  # TSV column of the text (-1 = last, as in MS MARCO collection.tsv)
    tsv_title_column: int | None = None  # TSV column of the title, if any
    skip_empty: bool = False  # skip empty texts instead of stopping with an error (blank lines are always skipped)
    hf_config: str | None = None  # configuration name of a Hugging Face dataset
    hf_split: str = "train"  # split of a Hugging Face dataset
    join_rows: bool | list[str] = False  # true (all sources) or a list of sources whose consecutive rows form one text
    document_field: str | None = None  # with join_rows: the JSON / HF field whose change starts a new document
    cut: str = "passage"  # passage: one example per text, truncated | packed: consecutive sentences up to max_len | document: whole documents (objectives that cut spans)
    max_len: int = 256  # tokens per example, special tokens included (document: tokens per document, none added)
    pack_min_fill: float = 0.9  # packed: a block less full than this takes the head of the next sentence
    min_tokens: int = 1  # drop examples with fewer ordinary tokens than this
    streaming: bool = False  # tokenize on the fly (in DataLoader workers) instead of building the example cache first
    shuffle_chunk: int = 2000  # streaming: rows read, tokenized and shuffled together
    cache_dir: str | None = None  # where the example cache is kept (default: the datasets cache)
    num_proc: int = 1  # processes that tokenize the corpus when the cache is built (per training process)
    shard_mb: int = 32  # the corpus is cut into shards of about this many MB (the unit of parallel preparation)
    num_workers: int = 0  # DataLoader workers that collate batches (streaming: that tokenize)
    pad_to_multiple_of: int = 8  # pad batch length to a multiple of this (tensor-core friendly)

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r} is not one of {', '.join(FORMATS)}", key="format")
        if self.cut not in CUT_MODES:
            raise ConfigError(f"data.cut={self.cut!r} is not one of {', '.join(CUT_MODES)}", key="cut")
        if self.max_len < 4:
            raise ConfigError(f"data.max_len={self.max_len} is too small (at least 4)", key="max_len")
        if self.document_field and not self.join_rows:
            raise ConfigError("data.document_field needs data.join_rows (it says where joined rows change document)",
                              key="document_field")
        if not 0 <= self.pack_min_fill <= 1:
            raise ConfigError("data.pack_min_fill must be in [0, 1]", key="pack_min_fill")
        for key in ("num_proc", "shard_mb", "shuffle_chunk"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1", key=key)
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0", key="num_workers")

    def text_fields(self) -> TextFields:
        return TextFields(self.text_field, self.title_field, self.title_separator, self.tsv_text_column,
                          self.tsv_title_column, self.skip_empty, self.document_field)

    def joins(self, source: str) -> bool:
        """Whether the rows of `source` are joined into documents."""
        return self.join_rows is True or (isinstance(self.join_rows, list) and source in self.join_rows)

    def texts(self) -> Iterator[str]:
        return read_corpus(list(self.corpus), self.format, self.text_fields(), self.hf_config, self.hf_split)


# Sentence boundaries for packing: end punctuation followed by space and an upper-case letter, digit or quote,
# or a line break. Hand-written: nltk's punkt needs a model download, which offline machines cannot do, and
# a block packer only needs boundaries that are right most of the time.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])|\n+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def pack_blocks(sentences: list[list[int]], budget: int, min_fill: float = 0.0) -> list[list[int]]:
    """Greedily pack consecutive sentences (token ids) into blocks of at most `budget` tokens (see `_Packer`)."""
    packer = _Packer(budget, min_fill)
    blocks = [b for s in sentences for b in packer.add(s)]
    return blocks + packer.flush()


class _Packer:
    """Greedy packing of a document's sentences, fed a chunk at a time.

    A sentence that does not fit the current block starts the next one, unless the block is less than `min_fill`
    full: then the block takes the sentence's head and the rest starts the next block (real text has run-on
    "sentences" of hundreds of tokens, which would otherwise close blocks half empty). A sentence longer than a
    block is cut into block-sized pieces. Blocks never span documents.
    """

    def __init__(self, budget: int, min_fill: float = 0.0):
        self.budget, self.min_fill, self.current = budget, min_fill, []

    def add(self, sentence: list[int]) -> list[list[int]]:
        done = []
        while sentence:
            room = self.budget - len(self.current)
            if len(sentence) <= room:
                self.current = self.current + sentence
                break
            if self.current and len(self.current) >= self.min_fill * self.budget:
                done += self.flush()  # the sentence starts the next block
                continue
            self.current, sentence = self.current + sentence[:room], sentence[room:]
            done += self.flush()
        return done

    def flush(self) -> list[list[int]]:
        block, self.current = self.current, []
        return [block] if block else []


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after one text ([CLS] / [SEP], <s> / </s> ...), read off
    an encoding (transformers 5 has no public call that wraps given ids)."""
    plain = tokenizer("retrieval", add_special_tokens=False)["input_ids"]
    full = tokenizer("retrieval", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"cannot find how tokenizer {tokenizer.name_or_path!r} adds special tokens")


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts`, no special tokens, untruncated. Through the Rust tokenizer's batch call without
    offsets when the tokenizer is a fast one: 25% faster than the transformers call (measured on NFCorpus), and
    tokenization is most of a corpus's preparation."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # the backend keeps the truncation / padding its tokenizer.json (or the last transformers call) set;
        # transformers sets them again on each of its own calls, so clearing them here changes nothing for it
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@dataclass
class Example:
    input_ids: list[int]
    doc: int  # the document it comes from, unique in the corpus
    sentence_lengths: list[int] | None = None  # cut: document only


class ExampleBuilder:
    """Rows in, examples out, in corpus order. Documents are assembled from rows (see the module docstring) and
    cut by `cfg.cut`; document ids are `first_doc`, `first_doc + 1`, ... in order of appearance."""

    def __init__(self, tokenizer, cfg: DataConfig, first_doc: int = 0, chunk_rows: int = 1000):
        self.tokenizer, self.cfg, self.chunk_rows = tokenizer, cfg, chunk_rows
        # Sentences and documents are tokenized whole on purpose (then packed or cut): transformers' "longer than
        # the maximum sequence length" warning does not apply; it is issued once per tokenizer, so mark it issued.
        getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
        self.prefix, self.suffix = special_wrapping(tokenizer)
        wrap = 0 if cfg.cut == "document" else len(self.prefix) + len(self.suffix)
        self.budget = cfg.max_len - wrap
        if self.budget < 1:
            raise ConfigError(f"data.max_len={cfg.max_len} leaves no room for text after special tokens")
        self.next_doc = first_doc

    def examples(self, rows: Iterator[Row], join: bool) -> Iterator[Example]:
        """Examples of `rows` (one source, or a shard of it); `join`: consecutive rows form documents."""
        chunk: list[tuple[str, int]] = []  # (text, document id)
        doc, key, open_doc = None, object(), False
        state = _CutState(self)
        for text, row_key in rows:
            if not join or text is None or row_key != key:
                open_doc = False  # the document ends here (a row of its own, a blank line, a new key)
            if text is None:
                continue
            if not open_doc:
                doc, key, open_doc = self.next_doc, row_key, True
                self.next_doc += 1
            chunk.append((text, doc))
            if len(chunk) >= self.chunk_rows:
                yield from state.cut(chunk, final=False)
                chunk = []
        yield from state.cut(chunk, final=True)

    def _wrap(self, block: list[int]) -> list[int]:
        return block if self.cfg.cut == "document" else self.prefix + block + self.suffix


class _CutState:
    """What carries over from one chunk of rows to the next: the document being packed (or gathered) and its id."""

    def __init__(self, builder: ExampleBuilder):
        self.b = builder
        self.packer, self.doc = _Packer(builder.budget, builder.cfg.pack_min_fill), None
        self.sentences: list[list[int]] = []  # cut: document, the current document's sentences

    def cut(self, chunk: list[tuple[str, int]], final: bool) -> Iterator[Example]:
        b, cfg = self.b, self.b.cfg
        if cfg.cut == "passage":
            yield from self._passages(chunk)
            return
        pieces, owners = [], []
        for text, doc in chunk:
            for sentence in split_sentences(text):
                pieces.append(sentence)
                owners.append(doc)
        ids = token_ids(b.tokenizer, pieces) if pieces else []
        for sentence, doc in zip(ids, owners):
            if doc != self.doc:
                yield from self._close()
                self.doc = doc
            if cfg.cut == "packed":
                yield from self._keep(self.packer.add(sentence), doc)
            else:
                self.sentences.append(sentence)
        if final:
            yield from self._close()

    def _passages(self, chunk: list[tuple[str, int]]) -> Iterator[Example]:
        """One example per document: its rows joined by a space, truncated."""
        texts, docs = [], []
        for text, doc in chunk:
            if docs and docs[-1] == doc:
                texts[-1] += " " + text
            else:
                texts.append(text)
                docs.append(doc)
        if not texts:
            return
        b = self.b
        pieces = [ids[: b.budget] for ids in token_ids(b.tokenizer, texts)]
        yield from (e for block, doc in zip(pieces, docs) for e in self._keep([block], doc))
        # (a document spanning two chunks gives two passages: rare, and only with join_rows)

    def _close(self) -> Iterator[Example]:
        if self.doc is None:
            return
        if self.b.cfg.cut == "packed":
            yield from self._keep(self.packer.flush(), self.doc)
        elif self.sentences:
            yield from self._document(self.sentences, self.doc)
            self.sentences = []

    def _document(self, sentences: list[list[int]], doc: int) -> Iterator[Example]:
        ids, lengths, budget = [], [], self.b.budget
        for sentence in sentences:
            take = sentence[: budget - len(ids)]
            if not take:
                break
            ids += take
            lengths.append(len(take))
        if len(ids) >= self.b.cfg.min_tokens:
            yield Example(ids, doc, lengths)

    def _keep(self, blocks: list[list[int]], doc: int) -> Iterator[Example]:
        for block in blocks:
            if len(block) >= self.b.cfg.min_tokens:
                yield Example(self.b._wrap(block), doc)


def tokenizer_signature(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab, tokenizer.all_special_tokens]).encode()).hexdigest()


def store_fingerprint(cfg: DataConfig, tokenizer) -> str:
    """What identifies a corpus's examples: the sources' content, how texts are read and cut, the tokenizer and the
    shard size (joined rows and packed blocks do not cross shards). Not the number of processes that build it."""
    key = {
        "version": 2,
        "sources": source_signature(list(cfg.corpus)),
        "fields": [cfg.format, cfg.text_field, cfg.title_field, cfg.title_separator, cfg.tsv_text_column,
                   cfg.tsv_title_column, cfg.skip_empty, cfg.hf_config, cfg.hf_split, cfg.join_rows,
                   cfg.document_field],
        "cut": [cfg.cut, cfg.max_len, cfg.min_tokens, cfg.shard_mb, cfg.pack_min_fill],
        "tokenizer": tokenizer_signature(tokenizer),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
