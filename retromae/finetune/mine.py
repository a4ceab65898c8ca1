"""`retromae mine`: hard negatives for every training query, from a given model's dense retrieval.

Every query with a positive is searched (not only those that have a BM25 list, a pitfall users report); the
positives are dropped, and so are the passage whose id is the query's and an optional top band of the ranking
(`skip_top`), a guard against unjudged positives (false negatives) that sit at the very top. The result is a
training file in our mined format ({query_id, query, positive_ids, negative_ids} per line), resolved against the
corpus at training time.

Spread over the processes of a launch as evaluation is (`retromae.retrieval.evaluate`): each process encodes its
share of the corpus and of the queries, searches every query against its corpus shard, then merges the shards'
results for its share of the queries and writes those lines; the main process joins the parts in order. No
process waits while another searches 500k queries alone. The query shards are searched one after the other, never
concatenated, and the vector shards go to a scratch folder beside the output (`retromae.retrieval.scratch`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retromae.data.corpus import CorpusError
from retromae.retrieval.encoder import EncodeConfig, TextEncoder, encode_shard, read_shards, shard_range


@dataclass
class MineConfig:
    depth: int = 100  # negatives kept per query
    skip_top: int = 0  # ranks skipped after removing positives (false-negative guard), e.g. 3
    index: str = "Flat"  # faiss factory string
    title_separator: str = " "  # between a passage's title and text
    backend: str = "auto"  # search backend: auto | faiss | torch (see retrieval/search.py)
    representation: str = "dense"  # dense | splade (SPLADE vectors, exact sparse search: retrieval/sparse.py)
    work_dir: str | None = None  # scratch folder for the vector shards (null: $RETROMAE_WORK, else beside the output)
    shard_dtype: str = "float32"  # vectors in the scratch shards: float32 | float16 (half the disk, rounded vectors)


def mine_negatives(model: str, data: str, output: str, split: str = "train", encode: EncodeConfig | None = None,
                   cfg: MineConfig | None = None) -> dict:
    """Search `depth + skip_top + |positives| + 1` passages for every training query of `data` (a BEIR folder with a
    qrels split, or an MS MARCO folder with queries.train.tsv / qrels.train.tsv) and write the mined file."""
    from retromae.distributed import process_state
    from retromae.finetune.data import load_training_data
    from retromae.retrieval.evaluate import _shared_work_dir
    from retromae.retrieval.scratch import make_scratch, scratch_root

    cfg = cfg or MineConfig()
    state = process_state()
    rank, world = state.process_index, state.num_processes
    training = load_training_data(data, split=split, title_separator=cfg.title_separator)
    corpus = training.passages
    if "corpus" not in corpus.sources:
        raise CorpusError(f"{data}: mining needs a corpus of passages with ids (a BEIR or MS MARCO folder)")
    widest = int(np.diff(training.positives.offsets).max())
    depth = cfg.depth + cfg.skip_top + widest + 1  # + 1: the query's own passage, where there is one
    root = scratch_root(cfg.work_dir, output)
    work = make_scratch(root, "retromae-mine-") if world == 1 else _shared_work_dir(state, root)
    try:
        ids, texts = corpus.passages(cfg.title_separator)
        if cfg.representation == "splade":  # sparse retrieval: retrieval/sparse.py
            from retromae.retrieval.sparse import SparseSearchConfig, SparseTextEncoder, sparse_shard_results

            encoder = SparseTextEncoder(model, encode or EncodeConfig(), device=state.device)
            scores, positions, _ = sparse_shard_results(encoder, texts, training.queries, depth,
                                                        SparseSearchConfig(), work, state)
        else:
            scores, positions = _dense_shard_results(model, encode, training, ids, texts, depth, cfg, work, state)
        np.save(work / f".scores-{rank}.npy", scores)
        np.save(work / f".positions-{rank}.npy", positions)
        state.wait_for_everyone()
        _write_share(training, work, rank, world, depth, cfg)
        state.wait_for_everyone()
        summary = {}
        if state.is_main_process:
            _join_parts(work, world, output)
            counts = [int(x) for r in range(world) for x in (work / f".kept-{r}.txt").read_text().split()]
            summary = {"queries": len(training), "negatives_per_query": sum(counts) / max(1, len(counts)),
                       "output": output}
        state.wait_for_everyone()
        return summary
    finally:
        if state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)


def _dense_shard_results(model, encode, training, ids, texts, depth: int, cfg: MineConfig, work: Path, state):
    """This process's corpus shard encoded and searched for every training query: (scores, global positions)."""
    from retromae.retrieval.evaluate import SearchConfig, check_space_everywhere, shard_search
    from retromae.retrieval.scratch import shard_dtype

    rank, world = state.process_index, state.num_processes
    encoder = TextEncoder(model, encode or EncodeConfig(), device=state.device)
    dtype = shard_dtype(cfg.shard_dtype)
    vectors = (len(ids) + len(training)) * encoder.dimension * np.dtype(dtype).itemsize
    check_space_everywhere(work, vectors + 2 * world * len(training) * depth * 12, "mining")
    shard = encode_shard(encoder, ids, texts, work / "corpus", rank, world, show_progress=state.is_main_process,
                         dtype=dtype)
    encode_shard(encoder, training.query_ids, training.queries, work / "queries", rank, world, kind="query",
                 show_progress=False, dtype=dtype)
    state.wait_for_everyone()
    queries = [v for _, v in read_shards(work / "queries")]  # searched in turn, never concatenated
    lo, _ = shard_range(len(texts), rank, world)
    search = SearchConfig(index=cfg.index, backend=cfg.backend)
    return shard_search(queries, shard, lo, depth, search, encoder.device)


def _write_share(training, work: Path, rank: int, world: int, depth: int, cfg: MineConfig,
                 block: int = 4096) -> list[int]:
    """Merge the shards' results for this process's share of the queries and write its lines, a block of queries
    at a time (the share's merged results and lines are never all in memory)."""
    from retromae.retrieval.evaluate import merge_in_blocks

    qlo, qhi = shard_range(len(training), rank, world)
    parts = [(np.load(work / f".scores-{r}.npy", mmap_mode="r"), np.load(work / f".positions-{r}.npy", mmap_mode="r"))
             for r in range(world)]
    corpus = training.passages
    kept = []
    with open(work / f".mined-{rank}.jsonl", "w", encoding="utf-8") as sink:
        for start in range(qlo, qhi, block):
            stop = min(qhi, start + block)
            _, positions = merge_in_blocks(parts, depth, start, stop)
            own = corpus.positions(training.query_ids[start:stop])  # a passage whose id is the query's is no negative
            chosen_rows = []
            for row, q in zip(positions, range(start, stop)):
                drop = np.isin(row, training.positives.row(q)) | (row == own[q - start]) | (row < 0)
                chosen_rows.append(row[~drop][cfg.skip_top : cfg.skip_top + cfg.depth])
            flat = np.concatenate(chosen_rows) if chosen_rows else np.zeros(0, np.int64)
            names = iter(corpus.ids_at(flat))
            lines = []
            for q, chosen in zip(range(start, stop), chosen_rows):
                negatives = [next(names) for _ in chosen]
                kept.append(len(negatives))
                lines.append(json.dumps({"query_id": training.query_ids[q], "query": training.queries[q],
                                         "positive_ids": corpus.ids_at(training.positives.row(q)),
                                         "negative_ids": negatives}) + "\n")
            sink.write("".join(lines))
    (work / f".kept-{rank}.txt").write_text(" ".join(map(str, kept)))
    return kept


def _join_parts(work: Path, world: int, output: str) -> None:
    """The processes' parts, in order, into `output` (written under a temporary name, then renamed)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as sink:
        for r in range(world):
            with open(work / f".mined-{r}.jsonl", "rb") as part:
                shutil.copyfileobj(part, sink)
    from retromae.io import follow_umask

    follow_umask(tmp)
    tmp.replace(out)

