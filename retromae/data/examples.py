"""Turn a corpus into tokenized training examples: per passage, or packed blocks of consecutive sentences.

Examples are stored in a `datasets.Dataset` (Arrow on disk, memory-mapped, cached by a fingerprint of the
sources and settings), or streamed through a `datasets.IterableDataset` when `data.streaming` is set.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from retromae.config import ConfigError
from retromae.data.corpus import FORMATS, CorpusError, TextFields, read_corpus, source_signature

CUT_MODES = ("passage", "packed")


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=list)  # corpus files (jsonl / txt / tsv, optionally .gz) or HF datasets
    format: str = "auto"  # auto (by file extension) | jsonl | text | tsv | hf
    text_field: str = "text"  # JSON / HF field holding the text
    title_field: str | None = "title"  # field prepended to the text when present (BEIR corpora); null to ignore
    title_separator: str = " "  # put between title and text
    tsv_text_column: int = -1  # TSV column of the text (-1 = last, as in MS MARCO collection.tsv)
    tsv_title_column: int | None = None  # TSV column of the title, if any
    skip_empty: bool = False  # skip empty lines / texts instead of stopping with an error
    hf_config: str | None = None  # configuration name of a Hugging Face dataset
    hf_split: str = "train"  # split of a Hugging Face dataset
    cut: str = "passage"  # passage: one example per text, truncated | packed: consecutive sentences up to max_len
    max_len: int = 256  # tokens per example, special tokens included
    min_tokens: int = 1  # drop examples with fewer ordinary tokens than this
    streaming: bool = False  # tokenize on the fly instead of building an on-disk example store first
    shuffle_buffer: int = 10000  # examples in the shuffle buffer when streaming
    cache_dir: str | None = None  # where the example store is cached (default: the datasets cache)
    num_workers: int = 0  # DataLoader workers that collate batches (map-style stores only)
    pad_to_multiple_of: int = 8  # pad batch length to a multiple of this (tensor-core friendly)

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r} is not one of {', '.join(FORMATS)}")
        if self.cut not in CUT_MODES:
            raise ConfigError(f"data.cut={self.cut!r} is not one of {', '.join(CUT_MODES)}")
        if self.max_len < 4:
            raise ConfigError(f"data.max_len={self.max_len} is too small (at least 4)")

    def text_fields(self) -> TextFields:
        return TextFields(
            self.text_field,
            self.title_field,
            self.title_separator,
            self.tsv_text_column,
            self.tsv_title_column,
            self.skip_empty,
        )

    def texts(self) -> Iterator[str]:
        return read_corpus(list(self.corpus), self.format, self.text_fields(), self.hf_config, self.hf_split)


# Sentence boundaries for packing: end punctuation followed by space and an upper-case letter, digit or quote,
# or a line break. Hand-written: nltk's punkt needs a model download, which offline machines cannot do, and
# a block packer only needs boundaries that are right most of the time.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])|\n+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def pack_blocks(sentences: list[list[int]], budget: int) -> list[list[int]]:
    """Greedily pack consecutive sentences (token ids) into blocks of at most `budget` tokens.

    A sentence longer than the budget is cut into budget-sized pieces; blocks never span documents.
    """
    blocks: list[list[int]] = []
    current: list[int] = []
    for sentence in sentences:
        if len(sentence) > budget:
            if current:
                blocks.append(current)
                current = []
            blocks.extend(sentence[i : i + budget] for i in range(0, len(sentence), budget))
            continue
        if len(current) + len(sentence) > budget:
            blocks.append(current)
            current = []
        current = current + sentence
    if current:
        blocks.append(current)
    return blocks


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after one text ([CLS] / [SEP], <s> / </s> ...), read off
    an encoding (transformers 5 has no public call that wraps given ids)."""
    plain = tokenizer("retrieval", add_special_tokens=False)["input_ids"]
    full = tokenizer("retrieval", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"cannot find how tokenizer {tokenizer.name_or_path!r} adds special tokens")


class Cutter:
    """Tokenize texts and cut them into examples (lists of token ids with special tokens)."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.prefix, self.suffix = special_wrapping(tokenizer)
        self.budget = cfg.max_len - len(self.prefix) - len(self.suffix)
        if self.budget < 1:
            raise ConfigError(f"data.max_len={cfg.max_len} leaves no room for text after special tokens")

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.cfg.cut == "passage":
            pieces = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.budget)
            blocks = pieces["input_ids"]
        else:
            blocks = []
            for text in texts:
                sentences = split_sentences(text)
                if not sentences:
                    continue
                ids = self.tokenizer(sentences, add_special_tokens=False)["input_ids"]
                blocks.extend(pack_blocks(ids, self.budget))
        return [
            self.prefix + block + self.suffix
            for block in blocks
            if len(block) >= self.cfg.min_tokens
        ]


def iter_examples(cfg: DataConfig, tokenizer, chunk: int = 1000) -> Iterator[list[int]]:
    """Tokenized examples of the whole corpus, in corpus order (texts tokenized `chunk` at a time)."""
    cutter = Cutter(tokenizer, cfg)
    texts: list[str] = []
    for text in cfg.texts():
        texts.append(text)
        if len(texts) == chunk:
            yield from cutter(texts)
            texts = []
    if texts:
        yield from cutter(texts)


def _generate(cfg: DataConfig, tokenizer, signature: str):
    del signature  # only part of the cache key
    for ids in iter_examples(cfg, tokenizer):
        yield {"input_ids": ids}


def tokenizer_signature(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab, tokenizer.all_special_tokens]).encode()).hexdigest()


def store_fingerprint(cfg: DataConfig, tokenizer) -> str:
    key = {
        "version": 1,
        "sources": source_signature(list(cfg.corpus)),
        "fields": [cfg.format, cfg.text_field, cfg.title_field, cfg.title_separator, cfg.tsv_text_column,
                   cfg.tsv_title_column, cfg.skip_empty, cfg.hf_config, cfg.hf_split],
        "cut": [cfg.cut, cfg.max_len, cfg.min_tokens],
        "tokenizer": tokenizer_signature(tokenizer),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _features():
    import datasets

    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


def _unwrap_generation_error(err: Exception) -> Exception:
    """datasets wraps errors raised in a generator; surface ours (they name file and line)."""
    cause = err
    while cause is not None:
        if isinstance(cause, (CorpusError, ConfigError)):
            return cause
        cause = cause.__cause__ or cause.__context__
    return err


def build_example_store(cfg: DataConfig, tokenizer):
    """All examples in an on-disk, memory-mapped `datasets.Dataset` (built once, then read from the cache)."""
    import datasets

    fingerprint = store_fingerprint(cfg, tokenizer)
    try:
        store = datasets.Dataset.from_generator(
            _generate,
            features=_features(),
            cache_dir=cfg.cache_dir,
            gen_kwargs={"cfg": cfg, "tokenizer": tokenizer, "signature": fingerprint},
            fingerprint=fingerprint,
        )
    except Exception as err:
        cause = _unwrap_generation_error(err)
        if cause is err:
            raise
        raise cause from None
    if len(store) == 0:
        raise CorpusError(f"{', '.join(cfg.corpus)}: the corpus gave no examples (is it empty?)")
    return store


def build_example_stream(cfg: DataConfig, tokenizer):
    """Examples tokenized on the fly, for corpora you do not want to store (iterated once per epoch)."""
    import datasets

    return datasets.IterableDataset.from_generator(
        _generate, features=_features(), gen_kwargs={"cfg": cfg, "tokenizer": tokenizer, "signature": ""}
    )
