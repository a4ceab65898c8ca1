"""Fine-tuning data: training groups (a query, its positives, its negatives) from BEIR folders, MS MARCO files,
Tevatron-style JSON lines, our mined files, or a Hugging Face dataset; and the micro-batches built from them.

Held compactly, for MS MARCO's 500k training queries: passages are positions into a memory-mapped table (the
corpus, or for data that carries its passages inline, a table built from the file once and cached), each query's
positives and negatives are slices of flat integer arrays (`Ragged`), teacher scores are a sorted array of 64-bit
keys of (query id, passage id) pairs, and MS MARCO's 397M BM25 triples are read in a stream keeping a uniform
sample of `data.negatives_per_query` negatives per query. Negatives never include the query's positives, nor a
passage whose id is the query's.

A group in a batch is one query, one positive and n - 1 negatives, sampled per epoch by a generator seeded with
(run seed, epoch, example index), so a group does not depend on the batch it lands in or on the number of
processes. A query with no negatives has only its positive: it trains with in-batch negatives alone (its other
slots are padding, masked out of the loss).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retromae.config import ConfigError
from retromae.data.corpus import CorpusError, _lines, iter_json_records, json_records, not_found
from retromae.retrieval.collection import Collection, cache_root, load_collection
from retromae.rng import mix32_int

logger = logging.getLogger(__name__)

FORMATS = ("auto", "beir", "msmarco", "tevatron", "mined", "hf")


class Ragged:
    """Rows of integers of varying length: row i is values[offsets[i]:offsets[i + 1]]."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray):
        self.offsets, self.values = offsets, values

    @classmethod
    def from_rows(cls, rows: list, dtype=np.int64) -> "Ragged":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.fromiter((v for r in rows for v in r), dtype=dtype, count=int(offsets[-1]))
        return cls(offsets, values)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def nbytes(self) -> int:
        return self.offsets.nbytes + self.values.nbytes


@dataclass
class TrainingData:
    query_ids: list[str]
    queries: list[str]
    positives: Ragged  # positions in `passages`
    negatives: Ragged  # positions in `passages`
    passages: Collection  # the corpus, or the inline passages of the training file
    source: str

    def __len__(self) -> int:
        return len(self.query_ids)

    def with_negatives(self) -> int:
        return int(np.count_nonzero(np.diff(self.negatives.offsets)))


# ----- keys of (query, passage) pairs: teacher scores -----------------------------------------------------


def pair_keys(query_ids, passage_ids) -> np.ndarray:
    """A 64-bit key per (query id, passage id) pair (blake2b): compact and stable across processes."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{q}\t{p}".encode(), digest_size=8).digest(), "little")
                        for q, p in zip(query_ids, passage_ids)), dtype=np.uint64)


class TeacherScores:
    """Cross-encoder scores for distillation (`qid<TAB>pid<TAB>score` per line), as sorted keys and float32 scores:
    12 bytes a pair, against ~234 for a dictionary entry."""

    def __init__(self, keys: np.ndarray, scores: np.ndarray):
        order = np.argsort(keys, kind="stable")
        self.keys, self.scores = keys[order], scores[order]

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, query_ids, passage_ids) -> np.ndarray:
        """Scores of the pairs, NaN where there is none."""
        keys = pair_keys(query_ids, passage_ids)
        slot = np.searchsorted(self.keys, keys).clip(max=max(0, len(self.keys) - 1))
        found = (self.keys[slot] == keys) if len(self.keys) else np.zeros(len(keys), bool)
        return np.where(found, self.scores[slot] if len(self.keys) else 0.0, np.nan).astype(np.float32)


def read_teacher_scores(path: str, block: int = 1_000_000) -> TeacherScores:
    """Read a block of lines at a time into keys and scores (the id strings of a block are dropped once hashed)."""
    keys, scores, queries, passages, values = [], [], [], [], []

    def fold():
        keys.append(pair_keys(queries, passages))
        scores.append(np.asarray(values, dtype=np.float32))
        queries.clear(), passages.clear(), values.clear()

    for number, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise CorpusError(f"{path}:{number}: expected 'qid<TAB>pid<TAB>score'")
        try:
            values.append(float(parts[2]))
        except ValueError:
            raise CorpusError(f"{path}:{number}: score {parts[2]!r} is not a number") from None
        queries.append(parts[0].strip())
        passages.append(parts[1].strip())
        if len(values) >= block:
            fold()
    fold()
    return TeacherScores(np.concatenate(keys), np.concatenate(scores))


def check_teacher_coverage(data: TrainingData, teacher: TeacherScores, path: str, sample: int = 2000) -> None:
    """Distillation that matches no pair would silently do nothing: stop if none of the training pairs (a sample)
    has a score, warn if few have."""
    groups = range(min(len(data), sample))
    pairs = [(data.query_ids[g], p) for g in groups for p in
             list(data.positives.row(g)) + list(data.negatives.row(g))]
    if not pairs:
        return
    found = ~np.isnan(teacher.lookup([q for q, _ in pairs], [data.passages.ids[p] for _, p in pairs]))
    share = found.mean()
    if share == 0:
        q, p = pairs[0]
        raise ConfigError(f"data.teacher_scores={path}: none of the training pairs has a teacher score (e.g. query "
                          f"{q!r}, passage {data.passages.ids[p]!r}); the file's lines are qid<TAB>pid<TAB>score with "
                          "the ids of the training data")
    if share < 0.5:
        logger.warning("data.teacher_scores: only %.0f%% of the training pairs (first %d queries) have a score; "
                       "groups with a missing score take no part in distillation", 100 * share, len(groups))


# ----- the formats ---------------------------------------------------------------------------------------


def _clean_negatives(positives: np.ndarray, negatives: np.ndarray, query_position: int) -> np.ndarray:
    """Negatives without the query's positives and without the passage that is the query itself, order kept,
    each once."""
    keep = ~np.isin(negatives, positives) & (negatives != query_position) & (negatives >= 0)
    _, first = np.unique(negatives, return_index=True)
    once = np.zeros(len(negatives), bool)
    once[first] = True
    return negatives[keep & once]


def _assemble(query_ids: list[str], queries: list[str], positives: list, negatives: list, passages: Collection,
              source: str) -> TrainingData:
    query_positions = passages.positions(query_ids) if len(passages) else np.full(len(query_ids), -1)
    cleaned = [_clean_negatives(np.asarray(p), np.asarray(n, dtype=np.int64), int(qp))
               for p, n, qp in zip(positives, negatives, query_positions)]
    return TrainingData(query_ids, queries, Ragged.from_rows(positives), Ragged.from_rows(cleaned), passages, source)


def _positions_or_error(corpus: Collection, ids: list[str], where: str, query_id: str) -> np.ndarray:
    positions = corpus.positions(ids)
    if (positions < 0).any():
        missing = ids[int(np.argmax(positions < 0))]
        raise CorpusError(f"{where}: passage id {missing!r} (query {query_id!r}) is not in the corpus")
    return positions


def _corpus(path: str) -> Collection:
    """A BEIR folder / corpus.jsonl or an MS MARCO folder / collection.tsv."""
    p = Path(path)
    if p.is_dir():
        p = p / "collection.tsv" if (p / "collection.tsv").is_file() else p / "corpus.jsonl"
    if not p.is_file():
        raise CorpusError(not_found(p, "corpus file"))
    return load_collection(p, "msmarco" if p.suffix == ".tsv" else "beir")


def load_beir_groups(folder: str, split: str, negatives: str | None = None) -> TrainingData:
    """Positives from a BEIR qrels split (grade >= 1); negatives from a mined file, or none (in-batch only)."""
    from retromae.retrieval.data import load_beir_folder

    data = load_beir_folder(folder, split)
    mined = _read_mined(negatives, data.corpus) if negatives else {}
    query_ids, queries, positives, negs = [], [], [], []
    for qid, rels in data.qrels.items():
        relevant = [d for d, g in rels.items() if g >= 1]
        found = data.corpus.positions(relevant)
        if not relevant or (found < 0).all():
            continue
        query_ids.append(qid)
        queries.append(data.queries[qid])
        positives.append(found[found >= 0])
        negs.append(mined.get(qid, (None, np.zeros(0, np.int64)))[1])
    return _assemble(query_ids, queries, positives, negs, data.corpus, data.sources["qrels"])


def _read_mined(path: str, corpus: Collection) -> dict[str, tuple[dict, np.ndarray]]:
    """Our mined format: one JSON object per line {query_id, query, positive_ids, negative_ids} -> {query id:
    (record without its id lists, negative positions)}; ids resolved against the corpus a line at a time."""
    rows = {}
    for number, r in json_records(path, ("query_id", "query", "positive_ids")):
        where = f"{path}:{number}"
        if not str(r["query"]).strip():
            raise CorpusError(f"{where}: the query is empty")
        if not r["positive_ids"]:
            raise CorpusError(f"{where}: query {r['query_id']!r} has no positive passage")
        qid = str(r["query_id"])
        positives = _positions_or_error(corpus, [str(x) for x in r["positive_ids"]], where, qid)
        negatives = _positions_or_error(corpus, [str(x) for x in r.get("negative_ids", [])], where, qid)
        rows[qid] = ({"query": str(r["query"]), "positives": positives}, negatives)
    return rows


def load_mined(path: str, corpus_path: str) -> TrainingData:
    corpus = _corpus(corpus_path)
    rows = _read_mined(path, corpus)
    return _assemble(list(rows), [r["query"] for r, _ in rows.values()], [r["positives"] for r, _ in rows.values()],
                     [n for _, n in rows.values()], corpus, path)


def load_msmarco_groups(folder: str, negatives: str | None, per_query: int, seed: int) -> TrainingData:
    """MS MARCO: collection.tsv, queries.train.tsv, qrels.train.tsv, and negatives from `negatives`:
    qidpidtriples (qid<TAB>pos<TAB>neg, a uniform sample of `per_query` per query, read in a stream) or a
    train_negs list (qid<TAB>pid,pid,...)."""
    from retromae.retrieval.data import _read_id_text_tsv, read_trec_qrels

    root = Path(folder)
    corpus = _corpus(str(root))
    queries = _read_id_text_tsv(root / "queries.train.tsv", "query")
    relevant: dict[str, list[str]] = {}
    qrels_path = root / "qrels.train.tsv"
    for number, qid, pid, grade in read_trec_qrels(qrels_path):
        if qid not in queries:
            raise CorpusError(f"{qrels_path}:{number}: query id {qid!r} is not in queries.train.tsv")
        if grade >= 1:
            relevant.setdefault(qid, []).append(pid)
    query_ids = list(relevant)
    index = {q: i for i, q in enumerate(query_ids)}
    positives = [_positions_or_error(corpus, relevant[q], str(qrels_path), q) for q in query_ids]
    negs = [np.zeros(0, np.int64)] * len(query_ids)
    if negatives:
        negs = _msmarco_negatives(negatives, index, corpus, per_query, seed, positives)
    return _assemble(query_ids, [queries[q] for q in query_ids], positives, negs, corpus, str(root))


def _msmarco_negatives(path: str, index: dict[str, int], corpus: Collection, per_query: int, seed: int,
                       positives: list) -> list:
    first = next((line for _, line in _lines(path) if line.strip()), "")
    if len(first.split("\t")) == 3:
        return sample_triples(path, index, corpus, per_query, seed, positives)
    negatives = [np.zeros(0, np.int64)] * len(index)
    for number, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise CorpusError(f"{path}:{number}: expected 'qid<TAB>pos<TAB>neg' or 'qid<TAB>pid,pid,...'")
        if parts[0] in index:
            negatives[index[parts[0]]] = _positions_or_error(corpus, [x for x in parts[1].strip().split(",") if x],
                                                             f"{path}:{number}", parts[0])
    return negatives


def sample_triples(path: str, index: dict[str, int], corpus: Collection, per_query: int, seed: int,
                   positives: list, block: int = 2_000_000) -> list:
    """A uniform sample (without replacement) of `per_query` distinct negatives per query from a qidpidtriples
    file, in one pass, a block of lines at a time: each (query, negative) pair gets a seeded hash key and each
    query keeps the pairs with the smallest keys (bottom-k sampling), so memory is bounded by queries x per_query
    plus one block, whatever the file's size (397M lines for MS MARCO). A query's positives (`positives`, by query
    index) are never kept. Cached beside the collection, as memory-mapped arrays (shared by the processes). Under a
    launch one process samples (~40 minutes for MS MARCO's file) while the others wait on a file lock, not in a
    collective, and then read its result."""
    p = Path(path)
    key = hashlib.sha256(json.dumps([str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns, per_query, seed,
                                     len(corpus), len(index), 3]).encode()).hexdigest()[:24]
    folder = cache_root() / "triples"
    folder.mkdir(parents=True, exist_ok=True)
    offsets_file, values_file = folder / f"{key}.offsets.npy", folder / f"{key}.values.npy"
    if not offsets_file.is_file():
        with open(folder / f".{key}.lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one process samples; the others wait here, then read it
            if not offsets_file.is_file():
                logger.info("sampling %d negatives per query from %s (once: cached in %s)", per_query, path, folder)
                ragged = _sample_triples(path, index, corpus, per_query, seed, positives, block)
                for name, array in ((values_file, ragged.values), (offsets_file, ragged.offsets)):  # offsets last
                    tmp = name.with_name(f".{name.name}.{os.getpid()}.tmp.npy")
                    np.save(tmp, array)
                    os.replace(tmp, name)
    ragged = Ragged(np.load(offsets_file, mmap_mode="r"), np.load(values_file, mmap_mode="r"))
    return [ragged.row(i) for i in range(len(ragged))]


def _sample_triples(path: str, index: dict[str, int], corpus: Collection, per_query: int, seed: int,
                    positives: list, block: int) -> Ragged:
    kept_q, kept_n, kept_k = (np.zeros(0, np.int64),) * 3
    queries, negatives = [], []
    width = np.int64(len(corpus) + 1)
    judged = np.sort(np.concatenate([np.full(len(p), q, np.int64) * width + np.asarray(p, np.int64)
                                     for q, p in enumerate(positives)] or [np.zeros(0, np.int64)]))

    def fold(q_ids, n_ids):
        nonlocal kept_q, kept_n, kept_k
        q = np.fromiter((index.get(x, -1) for x in q_ids), dtype=np.int64, count=len(q_ids))
        n = corpus.positions(n_ids)
        pair = q * width + n
        slot = np.searchsorted(judged, pair).clip(max=max(0, len(judged) - 1))
        positive = (judged[slot] == pair) if len(judged) else np.zeros(len(pair), bool)
        ok = (q >= 0) & (n >= 0) & ~positive
        q, n = q[ok], n[ok]
        k = _mix64(q * np.int64(0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF) ^ n ^ np.int64(seed))
        q, n, k = np.concatenate([kept_q, q]), np.concatenate([kept_n, n]), np.concatenate([kept_k, k])
        order = np.lexsort((k, q))
        q, n, k = q[order], n[order], k[order]
        fresh = np.ones(len(q), bool)
        fresh[1:] = (q[1:] != q[:-1]) | (n[1:] != n[:-1])  # the same pair (same key) once
        q, n, k = q[fresh], n[fresh], k[fresh]
        starts = np.searchsorted(q, q, side="left")
        rank = np.arange(len(q)) - starts
        keep = rank < per_query
        kept_q, kept_n, kept_k = q[keep], n[keep], k[keep]

    for number, line in _lines(path):
        parts = line.split("\t")
        if len(parts) != 3:
            if not line.strip():
                continue
            raise CorpusError(f"{path}:{number}: expected 'qid<TAB>pos<TAB>neg'")
        queries.append(parts[0])
        negatives.append(parts[2].strip())
        if len(queries) >= block:
            fold(queries, negatives)
            queries, negatives = [], []
    fold(queries, negatives)
    counts = np.bincount(kept_q, minlength=len(index))
    return Ragged(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), kept_n)  # kept_q is sorted


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on int64 arrays (wrapping arithmetic): a well-spread sampling key."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x.astype(np.int64)


def load_inline(records, source: str, fingerprint: list | None = None) -> TrainingData:
    """Tevatron-style groups that carry their passages ({query_id, query, positive_passages: [{docid, title, text}],
    negative_passages: [...]}), from (where, record) pairs: the passages go into a table of their own (docid,
    title, text; written to disk a batch at a time and memory-mapped, cached when `fingerprint` is given), the
    groups hold positions in it."""
    import pyarrow as pa

    folder = cache_root() / "inline"
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps(fingerprint or [source, os.getpid(), id(records)]).encode()).hexdigest()[:24]
    table_file, groups_file = folder / f"{key}.arrow", folder / f"{key}.groups.json"
    if fingerprint is not None and table_file.is_file() and groups_file.is_file():
        groups = json.loads(groups_file.read_text(encoding="utf-8"))
    else:
        groups = _write_inline(records, table_file)
        if fingerprint is not None:
            from retromae.io import atomic_write_text

            atomic_write_text(groups_file, json.dumps(groups))
    table = pa.ipc.open_file(pa.memory_map(str(table_file), "r")).read_all()
    positives = Ragged(np.asarray(groups["pos_offsets"]), np.asarray(groups["pos"], dtype=np.int64))
    negatives = Ragged(np.asarray(groups["neg_offsets"]), np.asarray(groups["neg"], dtype=np.int64))
    return TrainingData(groups["query_ids"], groups["queries"], positives, negatives,
                        Collection(table, {"inline": source}), source)


def _write_inline(records, table_file: Path) -> dict:
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
    groups = {"query_ids": [], "queries": [], "pos": [], "neg": [], "pos_offsets": [0], "neg_offsets": [0]}
    tmp = table_file.with_name(f".{table_file.name}.{os.getpid()}.tmp")
    written, batch = 0, {"id": [], "title": [], "text": []}
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for where, r in records:
            for key in ("query", "positive_passages"):
                if key not in r:
                    raise CorpusError(f"{where}: no '{key}' field (fields: {', '.join(r) or 'none'})")
            if not str(r["query"]).strip():
                raise CorpusError(f"{where}: the query is empty")
            if not r["positive_passages"]:
                raise CorpusError(f"{where}: query {r.get('query_id', '?')!r} has no positive passage")
            for kind, short in (("positive_passages", "pos"), ("negative_passages", "neg")):
                for p in r.get(kind) or []:
                    if "text" not in p:
                        raise CorpusError(f"{where}: a passage has no 'text' field")
                    batch["id"].append(str(p.get("docid", "")))
                    batch["title"].append(str(p.get("title") or ""))
                    batch["text"].append(str(p["text"]))
                    groups[short].append(written)
                    written += 1
                groups[f"{short}_offsets"].append(len(groups[short]))
            groups["query_ids"].append(str(r.get("query_id", where)))
            groups["queries"].append(str(r["query"]))
            if len(batch["id"]) >= 50_000:
                writer.write_batch(pa.record_batch(list(batch.values()), schema=schema))
                batch = {k: [] for k in batch}
        writer.write_batch(pa.record_batch(list(batch.values()), schema=schema))
    os.replace(tmp, table_file)
    return groups


def load_training_data(path: str, fmt: str = "auto", split: str = "train", corpus: str | None = None,
                       negatives: str | None = None, title_separator: str = " ", negatives_per_query: int = 30,
                       seed: int = 42) -> TrainingData:
    """Training groups from a file or folder; see the module docstring for the formats."""
    p = Path(path)
    if fmt == "auto":
        if p.is_dir():
            fmt = "msmarco" if (p / "collection.tsv").is_file() else "beir"
        elif p.suffix in (".jsonl", ".json", ".gz"):
            first = next((line for _, line in _lines(path) if line.strip()), "{}")
            fmt = "mined" if "positive_ids" in first else "tevatron"
        elif not p.exists():
            raise CorpusError(not_found(path) + "; for a Hugging Face dataset set data.format=hf")
        else:
            raise ConfigError(f"{path}: cannot tell the format; set data.format to one of {', '.join(FORMATS)}")
    if fmt == "beir":
        return load_beir_groups(path, split, negatives)
    if fmt == "msmarco":
        return load_msmarco_groups(path, negatives, negatives_per_query, seed)
    if fmt == "mined":
        if not corpus:
            raise ConfigError(f"{path}: a mined file names passages by id; set data.corpus to their corpus")
        return load_mined(path, corpus)
    if fmt == "tevatron":
        records = ((f"{path}:{number}", r) for number, r in iter_json_records(path))
        return load_inline(records, path, [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns, 1])
    if fmt == "hf":
        import datasets

        rows = datasets.load_dataset(path, split=split)
        fingerprint = getattr(rows, "_fingerprint", None)
        return load_inline(((f"{path} row {i}", r) for i, r in enumerate(rows)), path,
                           [path, split, fingerprint, 1] if fingerprint else None)
    raise ConfigError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")


# ----- batches -------------------------------------------------------------------------------------------


def sample_group(positives: np.ndarray, negatives: np.ndarray, size: int, rng: random.Random) -> list[int]:
    """[one positive, size - 1 negatives] for this epoch (negatives drawn with replacement if too few; none if
    the query has none)."""
    chosen = [int(positives[rng.randrange(len(positives))])]
    if len(negatives) and size > 1:
        if len(negatives) >= size - 1:
            chosen += [int(negatives[i]) for i in rng.sample(range(len(negatives)), size - 1)]
        else:
            chosen += [int(negatives[rng.randrange(len(negatives))]) for _ in range(size - 1)]
    return chosen


class GroupBatch:
    """Builds one micro-batch (tokenized queries and passages) from group indices; picklable for workers."""

    def __init__(self, data: TrainingData, tokenizer, group_size: int, query_max_len: int, passage_max_len: int,
                 seed: int, query_prefix: str = "", passage_prefix: str = "", teacher: TeacherScores | None = None,
                 title_separator: str = " "):
        self.data, self.tokenizer, self.group_size = data, tokenizer, group_size
        self.query_max_len, self.passage_max_len, self.seed = query_max_len, passage_max_len, seed
        self.query_prefix, self.passage_prefix, self.teacher = query_prefix, passage_prefix, teacher
        self.title_separator = title_separator

    def __call__(self, indices: list[int], epoch: int) -> dict:
        data = self.data
        queries, refs, valid = [], [], []
        for i in indices:
            rng = random.Random(mix32_int(mix32_int(self.seed) ^ mix32_int(epoch) ^ (i * 0x9E3779B9)))
            chosen = sample_group(data.positives.row(i), data.negatives.row(i), self.group_size, rng)
            queries.append(self.query_prefix + data.queries[i])
            for slot in range(self.group_size):
                refs.append((i, chosen[slot] if slot < len(chosen) else -1))
                valid.append(slot < len(chosen))
        positions = [p for _, p in refs if p >= 0]
        texts = iter(_texts(data.passages, positions, self.title_separator))
        passages = [self.passage_prefix + next(texts) if p >= 0 else "" for _, p in refs]
        q = self.tokenizer(queries, truncation=True, max_length=self.query_max_len, padding=True, return_tensors="pt")
        p = self.tokenizer(passages, truncation=True, max_length=self.passage_max_len, padding=True,
                           return_tensors="pt")
        batch = {
            "query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
            "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"],
            "passage_valid": torch.tensor(valid),
        }
        if self.teacher is not None:
            scores = self.teacher.lookup([data.query_ids[i] for i, _ in refs],
                                         [data.passages.ids[p] if p >= 0 else "" for _, p in refs])
            scores[[k for k, (_, p) in enumerate(refs) if p < 0]] = np.nan
            batch["teacher_scores"] = torch.from_numpy(scores).view(len(indices), -1)
        return batch


def _texts(passages: Collection, positions: list[int], separator: str) -> list[str]:
    """The passages at `positions`, read from the table in one take."""
    if not positions:
        return []
    rows = passages.table.take(np.asarray(positions, dtype=np.int64)).to_pydict()
    return [f"{t.strip()}{separator}{x}" if (t or "").strip() else x for t, x in zip(rows["title"], rows["text"])]
