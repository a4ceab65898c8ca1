"""Retrieval collections: BEIR folders (local or on the Hugging Face hub) and MS MARCO passage TSVs.

Read by hand, line by line, so that a malformed line, a qrel pointing to an unknown query or an empty query set
is reported with its file and line; BEIR's `GenericDataLoader` reads the same layout but names neither. The corpus
is a memory-mapped `retromae.retrieval.collection.Collection` (MS MARCO's 8.8M passages would be ~6 GB of Python
objects per process); queries and judgements are small and stay dictionaries.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from retromae.data.corpus import CorpusError, _lines, json_records, not_found
from retromae.retrieval.collection import Collection, load_collection

logger = logging.getLogger(__name__)


@dataclass
class RetrievalData:
    """A corpus, a query set and its judgements."""

    name: str
    corpus: Collection  # ids, titles, texts (memory-mapped)
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade}
    sources: dict[str, str] = field(default_factory=dict)  # what was read from where
    split: str = "test"  # the qrels split
    kind: str = "beir"  # beir | msmarco: which collection's conventions apply (e.g. the identical-id rule)

    def passages(self, title_separator: str = " "):
        """(doc ids, texts), the text being title + separator + text when there is a title; sequences read from
        the memory-mapped collection as they are indexed."""
        return self.corpus.passages(title_separator)


def read_beir_queries(path: Path) -> dict[str, str]:
    queries, lines = {}, {}
    for number, record in json_records(path, ("_id", "text")):
        text = str(record["text"] or "").strip()
        query_id = str(record["_id"])
        if not text:
            raise CorpusError(f"{path}:{number}: query {query_id!r} is empty")
        if query_id in queries:
            raise CorpusError(f"{path}:{number}: query id {query_id!r} appears twice (first at line {lines[query_id]})")
        queries[query_id], lines[query_id] = text, number
    return queries


def read_qrels_tsv(path: Path) -> list[tuple[int, str, str, int]]:
    """BEIR qrels: header `query-id corpus-id score`, tab-separated. Returns (line, qid, docid, grade)."""
    rows = []
    for number, line in _lines(str(path)):
        if not line.strip():
            continue
        parts = line.split("\t")
        if number == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(parts) == 4:  # TREC layout: qid 0 docid grade
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise CorpusError(f"{path}:{number}: expected 'query-id<TAB>corpus-id<TAB>score', got {line!r}")
        try:
            grade = int(float(parts[2]))
        except ValueError:
            raise CorpusError(f"{path}:{number}: score {parts[2]!r} is not a number") from None
        rows.append((number, parts[0].strip(), parts[1].strip(), grade))
    return rows


def read_trec_qrels(path: Path) -> list[tuple[int, str, str, int]]:
    """TREC qrels (`qid 0 docid grade`, whitespace-separated), as MS MARCO ships them."""
    rows = []
    for number, line in _lines(str(path)):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4:
            raise CorpusError(f"{path}:{number}: expected 'qid 0 docid grade', got {line!r}")
        try:
            grade = int(parts[3])
        except ValueError:
            raise CorpusError(f"{path}:{number}: grade {parts[3]!r} is not an integer") from None
        rows.append((number, parts[0], parts[2], grade))
    return rows


def build_qrels(rows, path: Path, corpus: Collection, queries: dict) -> dict[str, dict[str, int]]:
    """Judgements by query. A query missing from the query file stops with its line; a document missing from the
    corpus is kept, with a warning (ArguAna's qrels name such documents; BEIR and pytrec_eval keep them: they
    can only lower recall)."""
    qrels: dict[str, dict[str, int]] = {}
    for number, qid, doc_id, grade in rows:
        if qid not in queries:
            raise CorpusError(f"{path}:{number}: query id {qid!r} is not in the query file")
        qrels.setdefault(qid, {})[doc_id] = grade
    if not qrels:
        raise CorpusError(f"{path}: no judgements, so there is no query to evaluate")
    judged = [(qid, doc) for qid, docs in qrels.items() for doc in docs]
    missing = int((corpus.positions([d for _, d in judged]) < 0).sum())
    if missing == len(judged):
        # not ArguAna's few strays: these judgements are for another corpus (or name its documents otherwise)
        number, _, doc_id, _ = next(iter(rows))
        raise CorpusError(f"{path}:{number}: none of the {len(judged)} judgements names a document of the corpus "
                          f"(e.g. {doc_id!r}), so every score would be 0; are these judgements for another corpus, "
                          "or are its document ids written differently?")
    if missing:
        example = next(d for d, p in zip((d for _, d in judged), corpus.positions([d for _, d in judged])) if p < 0)
        logger.warning("%s: %d of %d judgements name documents that are not in the corpus (e.g. %r); kept, as BEIR "
                       "and trec_eval keep them (they can only lower recall)", path, missing, len(judged), example)
    return qrels


def load_beir_folder(folder: str | Path, split: str = "test") -> RetrievalData:
    folder = Path(folder)
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for path in (corpus_path, queries_path, qrels_path):
        if not path.is_file():
            hint = ""
            if path == qrels_path and (folder / "qrels").is_dir():
                hint = f" (splits here: {', '.join(sorted(p.stem for p in (folder / 'qrels').glob('*.tsv')))})"
            raise CorpusError(f"{path}: file not found{hint}")
    corpus = load_collection(corpus_path, "beir")
    queries = read_beir_queries(queries_path)
    qrels = build_qrels(read_qrels_tsv(qrels_path), qrels_path, corpus, queries)
    queries = {qid: queries[qid] for qid in qrels}
    return RetrievalData(folder.name, corpus, queries, qrels,
                         {"corpus": str(corpus_path), "queries": str(queries_path), "qrels": str(qrels_path)}, split)


def _read_id_text_tsv(path: Path, what: str) -> dict[str, str]:
    rows, lines = {}, {}
    for number, line in _lines(str(path)):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise CorpusError(f"{path}:{number}: expected 'id<TAB>{what}', got {line[:80]!r}")
        key = parts[0].strip()
        if key in rows:
            raise CorpusError(f"{path}:{number}: id {key!r} appears twice (first at line {lines[key]})")
        rows[key], lines[key] = parts[-1].strip(), number
    return rows


def load_msmarco_folder(folder: str | Path, split: str = "dev.small", title_separator: str | None = None) -> RetrievalData:
    """MS MARCO passage: collection.tsv, queries.<split>.tsv, qrels.<split>.tsv (TREC), and optionally
    para.title.tsv (pid<TAB>title) for the `title [SEP] text` convention of RocketQA / Tevatron."""
    folder = Path(folder)
    collection, queries_path, qrels_path = (folder / "collection.tsv", folder / f"queries.{split}.tsv",
                                            folder / f"qrels.{split}.tsv")
    for path in (collection, queries_path, qrels_path):
        if not path.is_file():
            raise CorpusError(f"{path}: file not found")
    corpus = load_collection(collection, "msmarco")
    queries = _read_id_text_tsv(queries_path, "query")
    if not queries:
        raise CorpusError(f"{queries_path}: no queries")
    qrels = build_qrels(read_trec_qrels(qrels_path), qrels_path, corpus, queries)
    queries = {qid: queries[qid] for qid in qrels}
    return RetrievalData("msmarco", corpus, queries, qrels,
                         {"corpus": str(collection), "queries": str(queries_path), "qrels": str(qrels_path)}, split,
                         kind="msmarco")


def load_beir_hub(name: str, split: str = "test") -> RetrievalData:
    """A BEIR dataset from the Hugging Face hub: BeIR/<name> (corpus, queries) and BeIR/<name>-qrels."""
    import datasets

    base = name if "/" in name else f"BeIR/{name}"
    try:
        corpus_rows = datasets.load_dataset(base, "corpus", split="corpus")
        query_rows = datasets.load_dataset(base, "queries", split="queries")
        qrel_rows = datasets.load_dataset(f"{base}-qrels", split=split)
    except Exception as err:  # hub client errors come in many types; all mean "not available"
        raise CorpusError(f"{base}: cannot load from the Hugging Face hub ({err})") from err
    import pyarrow as pa

    corpus = Collection(pa.table({"id": [str(i) for i in corpus_rows["_id"]],
                                  "title": [t or "" for t in corpus_rows["title"]],
                                  "text": [t or "" for t in corpus_rows["text"]]}), {"hub": base})
    queries = {str(r["_id"]): r["text"] for r in query_rows}
    rows = [(i + 1, str(r["query-id"]), str(r["corpus-id"]), int(r["score"])) for i, r in enumerate(qrel_rows)]
    qrels = build_qrels(rows, Path(f"{base}-qrels/{split}"), corpus, queries)
    queries = {qid: queries[qid] for qid in qrels}
    return RetrievalData(base.split("/")[-1], corpus, queries, qrels, {"hub": base}, split)


def load_dataset(name_or_path: str, split: str | None = None, title_separator: str = " ") -> RetrievalData:
    """A local BEIR folder, a local MS MARCO folder (collection.tsv ...), a dataset `retromae data get` put under
    the data root (by its name: nfcorpus, msmarco-passage ...), or a BEIR dataset on the hub."""
    from retromae.data.download import target_folder

    path = Path(name_or_path)
    if not path.is_dir() and "/" not in name_or_path and target_folder(name_or_path).is_dir():
        path = target_folder(name_or_path)
    if path.is_dir():
        if (path / "collection.tsv").is_file():
            return load_msmarco_folder(path, split or "dev.small", title_separator)
        return load_beir_folder(path, split or "test")
    from retromae.modeling import hub_unreachable, looks_local

    if looks_local(name_or_path) or os.sep in name_or_path:
        raise CorpusError(not_found(name_or_path, "folder"))
    offline = hub_unreachable()
    if offline:
        raise CorpusError(f"{name_or_path}: no local folder of that name (relative to {os.getcwd()}) nor at "
                          f"{target_folder(name_or_path)}, and the Hugging Face hub, where BEIR datasets are looked up "
                          f"by name, cannot be used ({offline}); `retromae data get {name_or_path}` downloads a BEIR "
                          "dataset into the data root")
    return load_beir_hub(name_or_path, split or "test")


def write_trec_run(path: str | Path, run: dict[str, dict[str, float]], name: str = "retromae") -> None:
    """The run in TREC format (qid Q0 docid rank score name), ranks in trec_eval's order."""
    from retromae.io import atomic_write_text
    from retromae.retrieval.metrics import top_k_trec_order

    lines = []
    for qid, docs in run.items():
        for rank, (doc_id, score) in enumerate(top_k_trec_order(docs, len(docs)).items(), start=1):
            lines.append(f"{qid} Q0 {doc_id} {rank} {score:.6f} {name}\n")
    atomic_write_text(path, "".join(lines))


