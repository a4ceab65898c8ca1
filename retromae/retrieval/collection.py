"""A document collection held the way MS MARCO's 8.8M passages fit in memory: a memory-mapped Arrow table (ids,
titles, texts) read once from `corpus.jsonl` (BEIR) or `collection.tsv` (+ `para.title.tsv`, MS MARCO) and cached,
with ids looked up through a sorted array, not a dictionary of Python strings.

At MS MARCO's size a dict of {id: {"title", "text"}} costs ~6 GB per process, and every process of a launch held
one; here each process maps the same file (the operating system shares its pages). The id index (~130 MB of sorted
ids and their positions) is written with the table and memory-mapped too: built in each process, it cost every
process its 130 MB and, while it was built, a Python list of 8.8M strings (~600 MB). The table is built once per
collection, under a file lock (the processes of a launch wait on the lock, not in a collective), in
`$RETROMAE_CACHE` (default: the datasets cache). Bad input is still reported by file and line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from retromae.data.corpus import CorpusError, _lines, json_records


def cache_root() -> Path:
    root = os.environ.get("RETROMAE_CACHE")
    if root:
        return Path(root)
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "retromae"


class IdIndex:
    """Positions of string ids, by binary search in a sorted fixed-width byte array (~(longest id + 8) bytes per id,
    against ~150 for a dict entry)."""

    def __init__(self, ids: Sequence[str] = ()):
        encoded = np.array([i.encode("utf-8") for i in ids], dtype=bytes) if len(ids) else np.zeros(0, "S1")
        self.order = np.argsort(encoded, kind="stable")
        self.sorted = encoded[self.order]

    def save(self, folder: Path) -> None:
        """ids.sorted.npy and ids.order.npy in `folder` (each written under a temporary name, then renamed)."""
        for name, array in (("ids.sorted.npy", self.sorted), ("ids.order.npy", self.order)):
            tmp = folder / f".{name}.{os.getpid()}.tmp.npy"
            np.save(tmp, array)
            os.replace(tmp, folder / name)

    @classmethod
    def load(cls, folder: Path) -> "IdIndex":
        """The saved index, memory-mapped: its pages are shared by every process that maps it."""
        index = cls()
        index.sorted = np.load(folder / "ids.sorted.npy", mmap_mode="r")
        index.order = np.load(folder / "ids.order.npy", mmap_mode="r")
        return index

    def duplicates(self) -> list[int]:
        """Positions of ids that appeared before (in the original order)."""
        same = np.nonzero(self.sorted[1:] == self.sorted[:-1])[0]
        return sorted(int(self.order[i + 1]) for i in same)

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """Position of each id, -1 where it is not there."""
        if not len(ids):
            return np.zeros(0, dtype=np.int64)
        wanted = np.array([str(i).encode("utf-8") for i in ids], dtype=bytes)
        slot = np.searchsorted(self.sorted, wanted).clip(max=max(0, len(self.sorted) - 1))
        found = (len(self.sorted) > 0) & (self.sorted[slot] == wanted) if len(self.sorted) else np.zeros(len(ids), bool)
        return np.where(found, self.order[slot], -1).astype(np.int64)

    def __contains__(self, key: str) -> bool:
        return self.positions([key])[0] >= 0


class LazyTexts(Sequence):
    """A collection's passages as a sequence of strings, read from the Arrow table a slice at a time."""

    def __init__(self, collection: "Collection", separator: str):
        self.collection, self.separator = collection, separator
        # what identifies these texts for a cache of their tokens (retrieval.token_cache); None: not cacheable
        self.cache_key = f"{collection.key}|{separator}" if collection.key else None

    def __len__(self) -> int:
        return len(self.collection)

    def __getitem__(self, item):
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            rows = self.collection.table.slice(start, stop - start).to_pydict()
            return [_join(t, x, self.separator) for t, x in zip(rows["title"], rows["text"])]
        if item < 0:
            item += len(self)
        row = self.collection.table.slice(item, 1).to_pydict()
        return _join(row["title"][0], row["text"][0], self.separator)


def _join(title: str, text: str, separator: str) -> str:
    title = (title or "").strip()
    return f"{title}{separator}{text}" if title else text


class Collection:
    """ids, titles and texts of a corpus, memory-mapped (see the module docstring)."""

    def __init__(self, table, sources: dict[str, str], key: str | None = None, index_folder: Path | None = None):
        self.table, self.sources, self.key = table, sources, key
        self.ids = table.column("id").to_pylist() if len(table) < 200_000 else _LazyIds(table)
        self._index = None
        self.index_folder = index_folder  # where the table's saved id index is (None: build it when needed)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def index(self) -> IdIndex:
        if self._index is None:
            if self.index_folder is not None and (self.index_folder / "ids.order.npy").is_file():
                self._index = IdIndex.load(self.index_folder)
            else:
                self._index = IdIndex(self.table.column("id").to_pylist())
        return self._index

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        return self.index.positions(ids)

    def ids_at(self, positions) -> list[str]:
        """The ids at `positions`, read in one take."""
        return self.table.column("id").take(np.asarray(positions, dtype=np.int64)).to_pylist()

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.index

    def passages(self, separator: str = " ") -> tuple[Sequence[str], Sequence[str]]:
        """(ids, texts): texts are "title<separator>text" where there is a title, read lazily."""
        return self.ids, LazyTexts(self, separator)

    def text(self, position: int, separator: str = " ") -> str:
        return LazyTexts(self, separator)[position]

    def titles_and_texts(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, str, str]]:
        rows = self.table.slice(start, (stop or len(self)) - start).to_pydict()
        return zip(rows["id"], rows["title"], rows["text"])


class _LazyIds(Sequence):
    def __init__(self, table):
        self.column = table.column("id")

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, item):
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            return self.column.slice(start, stop - start).to_pylist()[::step]
        return self.column[item].as_py()


def _fingerprint(paths: list[Path], kind: str) -> str:
    key = [kind, 3] + [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.is_file()]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


def load_collection(path: str | Path, kind: str = "beir") -> Collection:
    """The collection of a BEIR `corpus.jsonl` (kind beir) or an MS MARCO `collection.tsv` (kind msmarco: with
    `para.title.tsv` beside it, its titles), from the cache or built into it now."""
    path = Path(path)
    sources = [path] + ([path.parent / "para.title.tsv"] if kind == "msmarco" else [])
    folder = cache_root() / "collections" / _fingerprint(sources, kind)
    table_file = folder / "collection.arrow"
    if not table_file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one process builds; the others wait here, then read it
            if not table_file.is_file():
                _build(path, kind, folder)
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(table_file), "r")).read_all()
    return Collection(table, {"corpus": str(path)}, key=folder.name, index_folder=folder)


def _rows(path: Path, kind: str) -> Iterator[tuple[int, str, str, str]]:
    """(line, id, title, text) of a corpus file."""
    if kind == "msmarco":
        yield from _with_titles(_tsv_passages(path), path.parent / "para.title.tsv")
        return
    for number, record in json_records(path, ("_id", "text")):
        yield number, str(record["_id"]), str(record.get("title") or ""), str(record["text"] or "")


def _tsv_passages(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, id, text) of `id<TAB>text` rows; a header (`id text title`, DPR's layout) says where the columns are."""
    columns, width = None, None
    for number, line in _lines(str(path)):
        if not line.strip():
            continue
        parts = line.split("\t")
        if number == 1 and {p.strip().lower() for p in parts} >= {"id", "text"}:
            columns = {p.strip().lower(): k for k, p in enumerate(parts)}
            continue
        width = width or len(parts)
        if len(parts) != width or width < 2:
            raise CorpusError(f"{path}:{number}: has {len(parts)} tab-separated column(s) where "
                              f"{'the first row has ' + str(width) if width >= 2 else 'id<TAB>text needs 2'}")
        if columns:
            title = parts[columns["title"]].strip() if "title" in columns else ""
            yield number, parts[columns["id"]].strip(), _join(title, parts[columns["text"]].strip(), " ")
        elif width == 2:
            yield number, parts[0].strip(), parts[1].strip()
        else:
            raise CorpusError(f"{path}:{number}: {width} tab-separated columns and no header: which is the text, which "
                              "the title? Add a header line (e.g. 'id<TAB>title<TAB>text') or keep 'id<TAB>text'")


def _with_titles(passages, titles_file: Path) -> Iterator[tuple[int, str, str, str]]:
    """MS MARCO passages with their titles from para.title.tsv (pid<TAB>title, "-" for none), read in step with the
    collection (both are in pid order, as RocketQA ships them), so that 8.8M titles are never held at once."""
    if not titles_file.is_file():
        yield from ((n, i, "", t) for n, i, t in passages)
        return
    titles = (line.split("\t") for _, line in _lines(str(titles_file)) if line.strip())
    for number, doc_id, text in passages:
        row = next(titles, None)
        if row is None:  # the titles stop short: the remaining passages have none
            titles, row = iter(()), [doc_id, ""]
        if row[0].strip() != doc_id:
            raise CorpusError(f"{titles_file}: its rows do not follow {doc_id!r} of the collection in order (row "
                              f"{row!r}); give a para.title.tsv in the collection's pid order")
        title = row[-1].strip() if len(row) >= 2 else ""
        yield number, doc_id, "" if title == "-" else title, text


def _build(path: Path, kind: str, folder: Path) -> None:
    """Write the collection table, a batch of rows at a time; duplicate ids stop it, naming both lines."""
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("line", pa.int64())])
    tmp = folder / f".collection.{os.getpid()}.tmp"
    ids: list[str] = []
    lines: list[int] = []
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            batch: dict[str, list] = {"id": [], "title": [], "text": [], "line": []}
            for number, doc_id, title, text in _rows(path, kind):
                for key, value in zip(batch, (doc_id, title, text, number)):
                    batch[key].append(value)
                ids.append(doc_id)
                lines.append(number)
                if len(batch["id"]) >= 50_000:
                    writer.write_batch(pa.record_batch(list(batch.values()), schema=schema))
                    batch = {k: [] for k in batch}
            if batch["id"]:
                writer.write_batch(pa.record_batch(list(batch.values()), schema=schema))
        index = IdIndex(ids)
        duplicates = index.duplicates()
        if duplicates:
            second = duplicates[0]
            first = ids.index(ids[second])
            raise CorpusError(f"{path}:{lines[second]}: document id {ids[second]!r} appears twice (first at line "
                              f"{lines[first]})")
        from retromae.io import follow_umask

        index.save(folder)  # before the table: its presence says the folder is complete
        follow_umask(tmp)
        os.replace(tmp, folder / "collection.arrow")
    finally:
        tmp.unlink(missing_ok=True)
