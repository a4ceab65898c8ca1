"""Read pretraining text: JSON lines, plain text, TSV, or any Hugging Face dataset.

Local files are read by hand, line by line, because bad input must be reported with its file and line
(a pyarrow JSON error names neither); Hugging Face datasets are read with `datasets.load_dataset`, streamed.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class CorpusError(ValueError):
    """Bad corpus input; the message names the file (or dataset), the line (or row) and what to do."""


FORMATS = ("auto", "jsonl", "text", "tsv", "hf")


@dataclass
class TextFields:
    """How to pull one text out of a record."""

    text_field: str = "text"
    title_field: str | None = "title"
    title_separator: str = " "
    tsv_text_column: int = -1
    tsv_title_column: int | None = None
    skip_empty: bool = False
    document_field: str | None = None

    def join(self, title: str | None, text: str) -> str:
        title = (title or "").strip()
        return f"{title}{self.title_separator}{text}" if title else text


# Characters that show nothing and that str.strip() keeps: a text of only these (and white space) is empty.
INVISIBLE = "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\u180e\ufeff\u00ad"
_DROP_INVISIBLE = str.maketrans("", "", INVISIBLE)


def is_blank(text: str) -> bool:
    """No visible character: white space, zero-width spaces and joiners, direction marks, invisible operators,
    byte-order marks, soft hyphens."""
    return not text.translate(_DROP_INVISIBLE).strip()


def not_found(path: str | Path, what: str = "file") -> str:
    """'PATH: file not found', saying what a relative path was taken relative to."""
    where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
    return f"{path}: {what} not found{where}"


def detect_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith((".txt", ".text")):
        return "text"
    if not os.path.exists(path):
        raise CorpusError(not_found(path) + "; for a Hugging Face dataset by name, set data.format=hf")
    if os.path.isdir(path):
        return _folder_format(path)
    raise CorpusError(
        f"{path}: cannot tell the format from the file name; set data.format to jsonl, text, tsv or hf"
    )


def _folder_format(path: str) -> str:
    """A folder given as a corpus is read as a Hugging Face dataset, unless it is a retrieval folder (BEIR,
    MS MARCO), whose corpus is one file in it: that file is named."""
    for name in ("corpus.jsonl", "corpus.jsonl.gz", "collection.tsv"):
        if os.path.isfile(os.path.join(path, name)):
            raise CorpusError(f"{path}: is a folder, not a corpus file; give the corpus file in it: "
                              f"data.corpus=[{os.path.join(path, name)}]")
    return "hf"


def _lines(path: str, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[tuple[int, str]]:
    """(line number, decoded line without newline); non-UTF-8 input is an error naming the line.

    `start` / `end`: a byte range of the file (a shard; `start` must be a line start and `first_line` its number);
    a line that starts before `end` belongs to the range."""
    for number, line, _ in lines_with_offsets(path, start, end, first_line):
        yield number, line


def lines_with_offsets(path: str, start: int = 0, end: int | None = None, first_line: int = 1
                       ) -> Iterator[tuple[int, str, int]]:
    """As `_lines`, with the byte offset just after each line (where reading can resume)."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(not_found(path))
    if p.is_dir():
        raise CorpusError(f"{path}: is a directory, not a corpus file (for a Hugging Face dataset set data.format=hf)")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        if start:
            f.seek(start)
        position = start
        for number, raw in enumerate(f, start=first_line):
            if end is not None and position >= end:
                return
            position += len(raw)
            try:
                # utf-8-sig on the first line: a byte-order mark (as some Windows editors write) is not text
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"{path}:{number}: not UTF-8 (byte {err.start} of the line is 0x{raw[err.start]:02x}); "
                    "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from None
            yield number, line.rstrip("\r\n"), position


def json_records(path: str | Path, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file, blank lines skipped; a line that is not a JSON object or lacks
    a `required` field is an error naming the file and line."""
    return list(iter_json_records(path, required))


def iter_json_records(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """`json_records` one line at a time (for files too large to hold)."""
    for number, line in _lines(str(path)):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{path}:{number}: expected a JSON object")
        for key in required:
            if key not in record:
                raise CorpusError(f"{path}:{number}: no '{key}' field (fields: {', '.join(record) or 'none'})")
        yield number, record


# A reader yields rows: (text, document key). A text of None is a document boundary (a blank line in a plain-text
# file), which only matters when rows are joined into documents (data.join_rows); the key is the value of
# data.document_field (a change of it also starts a new document), or None.
Row = tuple[str | None, object]
BOUNDARY: Row = (None, None)


def read_jsonl(path: str, fields: TextFields, lines=None) -> Iterator[Row]:
    for number, line in lines if lines is not None else _lines(path):
        if not line.strip():
            continue  # a blank line (a trailing newline, a separator) holds no record
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{path}:{number}: expected a JSON object with a '{fields.text_field}' field")
        text = _record_text(record, fields, f"{path}:{number}")
        if text is not None:
            yield text, record.get(fields.document_field) if fields.document_field else None


def _record_text(record: dict, fields: TextFields, where: str) -> str | None:
    """The (title +) text of a JSON / Hugging Face record; None for an empty text that data.skip_empty skips."""
    if fields.text_field not in record:
        keys = ", ".join(map(str, record)) or "none"
        raise CorpusError(f"{where}: no '{fields.text_field}' field (fields: {keys}); "
                          "set data.text_field to the field that holds the text")
    text = record[fields.text_field] if record[fields.text_field] is not None else ""
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field '{fields.text_field}' is {type(text).__name__}, not a string")
    title = record.get(fields.title_field) if fields.title_field else None
    if title is not None and not isinstance(title, str):
        raise CorpusError(f"{where}: field '{fields.title_field}' is {type(title).__name__}, not a string")
    joined = fields.join(title, text).strip()
    if is_blank(joined):
        if fields.skip_empty:
            return None
        raise CorpusError(f"{where}: empty text{_invisible_note(joined)}; remove it, or set data.skip_empty=true to "
                          "skip empty texts")
    return joined


def _invisible_note(text: str) -> str:
    return " (only invisible characters such as zero-width spaces)" if text else ""


def read_text(path: str, fields: TextFields, lines=None) -> Iterator[Row]:
    for _, line in lines if lines is not None else _lines(path):
        # a blank line (or one of only zero-width spaces) is no text; where rows are joined into documents, it
        # ends one (as between books)
        yield BOUNDARY if is_blank(line) else (line.strip(), None)


def read_tsv(path: str, fields: TextFields, lines=None) -> Iterator[Row]:
    width = None
    for number, line in lines if lines is not None else _lines(path):
        if not line.strip():
            continue
        columns = line.split("\t")
        width = width or len(columns)
        if len(columns) != width:
            raise CorpusError(
                f"{path}:{number}: has {len(columns)} tab-separated column(s) where the file's first row has "
                f"{width}; a text with a tab or a line break in it, or a truncated row?"
            )
        try:
            text = columns[fields.tsv_text_column]
            title = columns[fields.tsv_title_column] if fields.tsv_title_column is not None else None
        except IndexError:
            raise CorpusError(
                f"{path}:{number}: has {len(columns)} tab-separated column(s); data.tsv_text_column="
                f"{fields.tsv_text_column}, data.tsv_title_column={fields.tsv_title_column} point past them"
            ) from None
        joined = fields.join(title, text).strip()
        if is_blank(joined):
            if fields.skip_empty:
                continue
            raise CorpusError(f"{path}:{number}: empty text{_invisible_note(joined)}; remove it, or set "
                              "data.skip_empty=true to skip empty texts")
        yield joined, None


def open_hf(name: str, config: str | None, split: str, streaming: bool):
    """A Hugging Face dataset (hub name, local dataset folder, or a folder saved by save_to_disk): map-style (Arrow,
    memory-mapped, rows addressable) unless `streaming`. `name:config` picks a configuration per source (e.g.
    wikimedia/wikipedia:20231101.en), overriding `config`."""
    import datasets

    if ":" in name and not os.path.exists(name):
        name, config = name.split(":", 1)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "state.json")):
        loaded = datasets.load_from_disk(name)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as err:  # the hub client raises many types; all mean "cannot open this dataset"
        raise CorpusError(f"{name}: cannot load this Hugging Face dataset (split {split!r}): {err}") from err


def read_hf(name: str, fields: TextFields, config: str | None, split: str, rows=None, first_row: int = 0
            ) -> Iterator[Row]:
    """Rows of a Hugging Face dataset, streamed, or the given `rows` (e.g. a shard) numbered from `first_row`."""
    rows = rows if rows is not None else open_hf(name, config, split, streaming=True)
    for number, record in enumerate(rows, start=first_row):
        text = _record_text(record, fields, f"{name} row {number}")
        if text is not None:
            yield text, record.get(fields.document_field) if fields.document_field else None


def read_corpus(
    sources: list[str], fmt: str, fields: TextFields, hf_config: str | None = None, hf_split: str = "train"
) -> Iterator[str]:
    """Every text of every source, in order."""
    if not sources:
        raise CorpusError("data.corpus is empty: give one or more files (jsonl, txt, tsv) or a Hugging Face dataset")
    for source in sources:
        kind = detect_format(source) if fmt == "auto" else fmt
        for text, _ in read_rows(source, kind, fields, hf_config, hf_split):
            if text is not None:
                yield text


def read_rows(source: str, kind: str, fields: TextFields, hf_config: str | None = None, hf_split: str = "train",
              lines=None) -> Iterator[Row]:
    """The rows of one source of a known format (see `Row`); `lines` restricts a file to a shard."""
    if kind == "jsonl":
        return read_jsonl(source, fields, lines)
    if kind == "text":
        return read_text(source, fields, lines)
    if kind == "tsv":
        return read_tsv(source, fields, lines)
    if kind == "hf":
        return read_hf(source, fields, hf_config, hf_split)
    raise CorpusError(f"data.format={kind!r} is not one of {', '.join(FORMATS)}")


def check_sources(sources: list[str], fmt: str = "auto", fields: TextFields | None = None,
                  hf_config: str | None = None, hf_split: str = "train") -> None:
    """Stop at once, before any model loads, if a corpus file is missing, or (with `fields`) if a Hugging Face
    dataset's first row has no text field (which `datasets` reports as a traceback deep in the preparation)."""
    if not sources:
        raise CorpusError("data.corpus is empty: give one or more files (jsonl, txt, tsv) or a Hugging Face dataset")
    for source in sources:
        kind = detect_format(source) if fmt == "auto" else fmt
        if kind != "hf" and not os.path.isfile(source):
            raise CorpusError(not_found(source) if not os.path.isdir(source)
                              else f"{source}: is a directory, not a corpus file")
        if kind == "hf" and fields is not None:
            _check_hf_fields(source, fields, hf_config, hf_split)


def _check_hf_fields(source: str, fields: TextFields, hf_config: str | None, hf_split: str) -> None:
    """The first row of a Hugging Face dataset (streamed: nothing is prepared) has the text field."""
    first = next(iter(open_hf(source, hf_config, hf_split, streaming=True)), None)
    if first is None:
        raise CorpusError(f"{source}: the Hugging Face dataset has no rows (split {hf_split!r})")
    if fields.text_field not in first:
        raise CorpusError(f"{source} row 0: no '{fields.text_field}' field (fields: {', '.join(map(str, first))}); "
                          "set data.text_field to the field that holds the text")


def sample_texts(sources: list[str], fmt: str, fields: TextFields, per_source: int, hf_config: str | None = None,
                 hf_split: str = "train") -> Iterator[tuple[str, list[str]]]:
    """(source, its first `per_source` texts) for every source: a cheap look at what the corpus holds."""
    import itertools

    for source in sources:
        kind = detect_format(source) if fmt == "auto" else fmt
        rows = read_rows(source, kind, fields, hf_config, hf_split)
        yield source, [t for t, _ in itertools.islice((r for r in rows if r[0] is not None), per_source)]


def source_signature(sources: list[str]) -> list:
    """What identifies the sources' content for caching: path, size and modification time of local files."""
    signature = []
    for source in sources:
        if os.path.isfile(source):
            st = os.stat(source)
            signature.append([os.path.abspath(source), st.st_size, st.st_mtime_ns])
        else:
            signature.append([source])
    return signature
