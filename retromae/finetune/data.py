"""Fine-tuning data: training groups (a query, its positives, its negatives) from BEIR folders, MS MARCO files,
Tevatron-style JSON lines, our mined files, or a Hugging Face dataset; and the micro-batches built from them.

A group in a batch is one query, one positive and n - 1 negatives, sampled per epoch from the query's lists by a
generator seeded with (run seed, epoch, example index), so a group does not depend on the batch it lands in or
on the number of processes. A query with no negatives yet has only its positive: it is trained with in-batch
negatives alone (its other slots are padding, masked out of the loss).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retromae.config import ConfigError
from retromae.data.corpus import CorpusError, _lines, json_records
from retromae.rng import mix32_int

FORMATS = ("auto", "beir", "msmarco", "tevatron", "mined", "hf")


@dataclass
class Group:
    """One training query: its text, and passages given by corpus id or inline text."""

    query_id: str
    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)


@dataclass
class TrainingData:
    groups: list[Group]
    corpus: dict[str, str] | None  # id -> passage text, when groups refer to passages by id
    source: str

    def passage(self, ref: str) -> str:
        return self.corpus[ref] if self.corpus is not None else ref


def _corpus_texts(path: str, title_separator: str) -> dict[str, str]:
    """id -> 'title<sep>text' from a BEIR folder / corpus.jsonl, or an MS MARCO folder / collection.tsv."""
    from retromae.retrieval.data import _read_id_text_tsv, read_beir_corpus

    p = Path(path)
    if p.is_dir():
        if (p / "collection.tsv").is_file():
            p = p / "collection.tsv"
        else:
            p = p / "corpus.jsonl"
    if not p.is_file():
        raise CorpusError(f"{p}: corpus file not found")
    if p.suffix == ".tsv":
        texts = _read_id_text_tsv(p, "passage")
        titles_file = p.parent / "para.title.tsv"
        if titles_file.is_file():
            titles = _read_id_text_tsv(titles_file, "title")
            texts = {k: f"{titles[k]}{title_separator}{v}" if titles.get(k, "-") not in ("", "-") else v
                     for k, v in texts.items()}
        return texts
    return {k: f"{d['title']}{title_separator}{d['text']}" if d["title"] else d["text"]
            for k, d in read_beir_corpus(p).items()}


def _check_ids(groups: list[Group], corpus: dict[str, str], source: str, lines: dict[str, int]) -> None:
    for g in groups:
        for ref in g.positives + g.negatives:
            if ref not in corpus:
                line = lines.get(g.query_id)
                where = f"{source}:{line}" if line else source
                raise CorpusError(f"{where}: passage id {ref!r} (query {g.query_id!r}) is not in the corpus")


def load_beir_groups(folder: str, split: str, title_separator: str) -> TrainingData:
    """Positives from a BEIR qrels split (grade >= 1); no negatives (mine them, or train with in-batch ones)."""
    from retromae.retrieval.data import load_beir_folder

    data = load_beir_folder(folder, split)
    groups = [Group(qid, data.queries[qid], [d for d, g in rels.items() if g >= 1])
              for qid, rels in data.qrels.items()]
    groups = [g for g in groups if g.positives]
    corpus = {i: t for i, t in zip(*data.passages(title_separator))}
    return TrainingData(groups, corpus, data.sources["qrels"])


def read_mined(path: str) -> tuple[list[Group], dict[str, int]]:
    """Our mined format: one JSON object per line {query_id, query, positive_ids, negative_ids}."""
    groups, lines = [], {}
    for number, r in json_records(path, ("query_id", "query", "positive_ids")):
        if not str(r["query"]).strip():
            raise CorpusError(f"{path}:{number}: the query is empty")
        if not r["positive_ids"]:
            raise CorpusError(f"{path}:{number}: query {r['query_id']!r} has no positive passage")
        groups.append(Group(str(r["query_id"]), str(r["query"]), [str(x) for x in r["positive_ids"]],
                            [str(x) for x in r.get("negative_ids", [])]))
        lines[str(r["query_id"])] = number
    return groups, lines


def _passage_text(p: dict, title_separator: str) -> str:
    title = (p.get("title") or "").strip()
    return f"{title}{title_separator}{p['text']}" if title else p["text"]


def read_tevatron(path: str, title_separator: str) -> list[Group]:
    """Tevatron JSON lines: {query_id, query, positive_passages: [{docid, title, text}], negative_passages: [...]}."""
    groups = []
    for number, r in json_records(path):
        groups.append(_tevatron_group(r, f"{path}:{number}", title_separator))
    return groups


def _tevatron_group(r: dict, where: str, title_separator: str) -> Group:
    for key in ("query", "positive_passages"):
        if key not in r:
            raise CorpusError(f"{where}: no '{key}' field (fields: {', '.join(r) or 'none'})")
    if not str(r["query"]).strip():
        raise CorpusError(f"{where}: the query is empty")
    if not r["positive_passages"]:
        raise CorpusError(f"{where}: query {r.get('query_id', '?')!r} has no positive passage")
    for p in r["positive_passages"] + (r.get("negative_passages") or []):
        if "text" not in p:
            raise CorpusError(f"{where}: a passage has no 'text' field")
    return Group(str(r.get("query_id", where)), str(r["query"]),
                 [_passage_text(p, title_separator) for p in r["positive_passages"]],
                 [_passage_text(p, title_separator) for p in r.get("negative_passages") or []])


def load_msmarco_groups(folder: str, title_separator: str, negatives: str | None) -> TrainingData:
    """MS MARCO: collection.tsv, queries.train.tsv, qrels.train.tsv, and negatives from `negatives`:
    qidpidtriples (qid<TAB>pos<TAB>neg) or a train_negs list (qid<TAB>pid,pid,...)."""
    from retromae.retrieval.data import _read_id_text_tsv, read_trec_qrels

    root = Path(folder)
    corpus = _corpus_texts(str(root), title_separator)
    queries = _read_id_text_tsv(root / "queries.train.tsv", "query")
    positives: dict[str, list[str]] = {}
    for number, qid, pid, grade in read_trec_qrels(root / "qrels.train.tsv"):
        if grade >= 1:
            positives.setdefault(qid, []).append(pid)
    negs: dict[str, list[str]] = {}
    if negatives:
        for number, line in _lines(negatives):
            parts = line.split("\t")
            if len(parts) == 3:  # qidpidtriples
                qid, pos, neg = parts
                positives.setdefault(qid, [])
                if pos not in positives[qid]:
                    positives[qid].append(pos)
                negs.setdefault(qid, []).append(neg.strip())
            elif len(parts) == 2:
                negs.setdefault(parts[0], []).extend(x for x in parts[1].strip().split(",") if x)
            elif line.strip():
                raise CorpusError(f"{negatives}:{number}: expected 'qid<TAB>pos<TAB>neg' or 'qid<TAB>pid,pid,...'")
    groups = []
    for qid, pos in positives.items():
        if qid not in queries:
            raise CorpusError(f"{root / 'qrels.train.tsv'}: query id {qid!r} is not in queries.train.tsv")
        groups.append(Group(qid, queries[qid], pos, list(dict.fromkeys(negs.get(qid, [])))))
    _check_ids(groups, corpus, negatives or str(root / "qrels.train.tsv"), {})
    return TrainingData(groups, corpus, str(root))


def load_training_data(path: str, fmt: str = "auto", split: str = "train", corpus: str | None = None,
                       negatives: str | None = None, title_separator: str = " ") -> TrainingData:
    """Training groups from a file or folder; see the module docstring for the formats."""
    p = Path(path)
    if fmt == "auto":
        if p.is_dir():
            fmt = "msmarco" if (p / "collection.tsv").is_file() else "beir"
        elif p.suffix in (".jsonl", ".json", ".gz"):
            first = next((line for _, line in _lines(path) if line.strip()), "{}")
            fmt = "mined" if "positive_ids" in first else "tevatron"
        elif not p.exists():
            raise CorpusError(f"{path}: not found (for a Hugging Face dataset set data.format=hf)")
        else:
            raise ConfigError(f"{path}: cannot tell the format; set data.format to one of {', '.join(FORMATS)}")
    if fmt == "beir":
        data = load_beir_groups(path, split, title_separator)
        if negatives:
            mined, _ = read_mined(negatives)
            extra = {g.query_id: g.negatives for g in mined}
            for g in data.groups:
                g.negatives = [n for n in extra.get(g.query_id, []) if n not in g.positives]
            _check_ids(data.groups, data.corpus, negatives, {})
        return data
    if fmt == "msmarco":
        return load_msmarco_groups(path, title_separator, negatives)
    if fmt == "mined":
        if not corpus:
            raise ConfigError(f"{path}: a mined file names passages by id; set data.corpus to their corpus")
        groups, lines = read_mined(path)
        texts = _corpus_texts(corpus, title_separator)
        _check_ids(groups, texts, path, lines)
        return TrainingData(groups, texts, path)
    if fmt == "tevatron":
        return TrainingData(read_tevatron(path, title_separator), None, path)
    if fmt == "hf":
        import datasets

        rows = datasets.load_dataset(path, split=split)
        return TrainingData([_tevatron_group(r, f"{path} row {i}", title_separator) for i, r in enumerate(rows)],
                            None, path)
    raise ConfigError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")


def read_teacher_scores(path: str) -> dict[tuple[str, str], float]:
    """Cross-encoder scores for distillation: `qid<TAB>pid<TAB>score` per line."""
    scores = {}
    for number, line in _lines(path):
        parts = line.split("\t")
        if not line.strip():
            continue
        if len(parts) != 3:
            raise CorpusError(f"{path}:{number}: expected 'qid<TAB>pid<TAB>score'")
        try:
            scores[(parts[0], parts[1])] = float(parts[2])
        except ValueError:
            raise CorpusError(f"{path}:{number}: score {parts[2]!r} is not a number") from None
    return scores


def sample_group(group: Group, size: int, rng: random.Random) -> list[str]:
    """[one positive, size - 1 negatives] for this epoch (negatives drawn with replacement if too few; none if
    the query has none yet)."""
    chosen = [rng.choice(group.positives)]
    if group.negatives and size > 1:
        if len(group.negatives) >= size - 1:
            chosen += rng.sample(group.negatives, size - 1)
        else:
            chosen += rng.choices(group.negatives, k=size - 1)
    return chosen


class GroupBatch:
    """Builds one micro-batch (tokenized queries and passages) from group indices; picklable for workers."""

    def __init__(self, data: TrainingData, tokenizer, group_size: int, query_max_len: int, passage_max_len: int,
                 seed: int, query_prefix: str = "", passage_prefix: str = "",
                 teacher: dict[tuple[str, str], float] | None = None):
        self.data, self.tokenizer, self.group_size = data, tokenizer, group_size
        self.query_max_len, self.passage_max_len, self.seed = query_max_len, passage_max_len, seed
        self.query_prefix, self.passage_prefix, self.teacher = query_prefix, passage_prefix, teacher

    def __call__(self, indices: list[int], epoch: int) -> dict:
        queries, passages, valid, refs = [], [], [], []
        for i in indices:
            group = self.data.groups[i]
            rng = random.Random(mix32_int(mix32_int(self.seed) ^ mix32_int(epoch) ^ (i * 0x9E3779B9)))
            chosen = sample_group(group, self.group_size, rng)
            queries.append(self.query_prefix + group.query)
            for slot in range(self.group_size):
                ref = chosen[slot] if slot < len(chosen) else None
                refs.append((group.query_id, ref))
                valid.append(ref is not None)
                passages.append(self.passage_prefix + self.data.passage(ref) if ref is not None else "")
        q = self.tokenizer(queries, truncation=True, max_length=self.query_max_len, padding=True, return_tensors="pt")
        p = self.tokenizer(passages, truncation=True, max_length=self.passage_max_len, padding=True,
                           return_tensors="pt")
        batch = {
            "query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
            "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"],
            "passage_valid": torch.tensor(valid),
        }
        if self.teacher is not None:
            batch["teacher_scores"] = torch.tensor([self.teacher.get(r, float("nan")) if r[1] is not None
                                                    else float("nan") for r in refs]).view(len(indices), -1)
        return batch
