"""`retromae data pairs PAIRS --texts TEXTS --output FOLDER`: a retrieval task in BEIR layout from a user's own
query-passage pairs, which fine-tuning (`data.train`) and `retromae evaluate --dataset` then read.

PAIRS is a TSV file, one `query<TAB>relevant passage` a line (an optional header `query<TAB>passage`); TEXTS, any
corpus file pretraining reads (one passage a line, JSON lines, TSV), joins the corpus the queries are searched in,
so retrieval is scored against every passage, not only the paired ones. The queries are split at random (seeded)
into a training and a test share: `qrels/train.tsv` and `qrels/test.tsv`. A query written twice is one query with
several relevant passages; a passage written twice (or also in TEXTS) is one document.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from retromae.data.corpus import CorpusError, TextFields, _lines, is_blank, read_corpus
from retromae.io import atomic_directory


def read_pairs(path: str | Path) -> list[tuple[int, str, str]]:
    """(line, query, passage) of a pairs file; a malformed line is an error naming it."""
    pairs = []
    for number, line in _lines(str(path)):
        if is_blank(line):
            continue
        parts = line.split("\t")
        if number == 1 and [p.strip().lower() for p in parts] == ["query", "passage"]:
            continue
        if len(parts) != 2:
            raise CorpusError(f"{path}:{number}: expected 'query<TAB>passage', got {len(parts)} tab-separated "
                              "column(s)")
        query, passage = parts[0].strip(), parts[1].strip()
        if is_blank(query) or is_blank(passage):
            raise CorpusError(f"{path}:{number}: empty {'query' if is_blank(query) else 'passage'}")
        pairs.append((number, query, passage))
    if len(pairs) < 2:
        raise CorpusError(f"{path}: {len(pairs)} pair(s); at least 2 are needed (one to train on, one to test)")
    return pairs


def write_task(pairs_file: str | Path, output: str | Path, texts: str | None = None, test_share: float = 0.2,
               seed: int = 0, force: bool = False) -> dict:
    """Write the BEIR folder (written whole or not at all); returns its counts."""
    if not 0 < test_share < 1:
        raise CorpusError(f"--test-share {test_share}: must be between 0 and 1")
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not force:
        raise CorpusError(f"{output}: exists and is not empty; choose another --output, or --force to replace it")
    pairs = read_pairs(pairs_file)
    documents: dict[str, str] = {}  # text -> id, in order of appearance
    if texts:
        for text in read_corpus([texts], "auto", TextFields()):
            documents.setdefault(text, f"d{len(documents)}")
    queries: dict[str, str] = {}  # text -> id
    relevant: dict[str, list[str]] = {}
    for _, query, passage in pairs:
        doc = documents.setdefault(passage, f"d{len(documents)}")
        qid = queries.setdefault(query, f"q{len(queries)}")
        if doc not in relevant.setdefault(qid, []):
            relevant[qid].append(doc)
    order = list(relevant)
    if len(order) < 2:
        raise CorpusError(f"{pairs_file}: every pair has the same query; at least 2 queries are needed")
    random.Random(seed).shuffle(order)
    n_test = min(len(order) - 1, max(1, round(test_share * len(order))))
    splits = {"test": order[:n_test], "train": order[n_test:]}
    with atomic_directory(output) as tmp:
        (tmp / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                                                  for t, i in documents.items()), encoding="utf-8")
        (tmp / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n"
                                                   for t, i in queries.items()), encoding="utf-8")
        (tmp / "qrels").mkdir()
        for split, ids in splits.items():
            rows = "".join(f"{q}\t{d}\t1\n" for q in sorted(ids, key=lambda q: int(q[1:])) for d in relevant[q])
            (tmp / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows, encoding="utf-8")
    return {"documents": len(documents), "queries": len(queries), "train": len(splits["train"]),
            "test": len(splits["test"]), "folder": str(output)}
