"""`retromae mine`: hard negatives for every training query, from a given model's dense retrieval.

Every query with a positive is searched (not only those that have a BM25 list, a pitfall users report); the
positives are dropped, and so is an optional top band of the ranking (`skip_top`), a guard against unjudged
positives (false negatives) that sit at the very top. The result is a training file in our mined format
({query_id, query, positive_ids, negative_ids} per line), resolved against the corpus at training time.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from retromae.data.corpus import CorpusError
from retromae.io import atomic_write_text
from retromae.retrieval.encoder import EncodeConfig, TextEncoder, encode_shard, read_shards
from retromae.retrieval.index import DenseIndex

logger = logging.getLogger(__name__)


@dataclass
class MineConfig:
    depth: int = 100  # negatives kept per query
    skip_top: int = 0  # ranks skipped after removing positives (false-negative guard), e.g. 3
    index: str = "Flat"  # faiss factory string
    title_separator: str = " "  # between a passage's title and text


def mine_negatives(model: str, data: str, output: str, split: str = "train", encode: EncodeConfig | None = None,
                   cfg: MineConfig | None = None) -> dict:
    """Search `depth + skip_top + |positives|` passages for every training query of `data` (a BEIR folder with a
    qrels split, or an MS MARCO folder with queries.train.tsv / qrels.train.tsv) and write the mined file."""
    from retromae.distributed import process_state
    from retromae.finetune.data import load_training_data

    cfg = cfg or MineConfig()
    state = process_state()
    training = load_training_data(data, split=split, title_separator=cfg.title_separator)
    if training.corpus is None:
        raise CorpusError(f"{data}: mining needs a corpus of passages with ids (a BEIR or MS MARCO folder)")
    encoder = TextEncoder(model, encode or EncodeConfig(), device=state.device)
    ids, texts = list(training.corpus), list(training.corpus.values())
    work = Path(tempfile.mkdtemp(prefix="retromae-mine-")) if state.num_processes == 1 else None
    if work is None:
        from retromae.retrieval.evaluate import _shared_work_dir

        work = _shared_work_dir(state)
    try:
        encode_shard(encoder, ids, texts, work, state.process_index, state.num_processes,
                     show_progress=state.is_main_process)
        state.wait_for_everyone()
        summary = {}
        if state.is_main_process:
            index = DenseIndex(encoder.dimension, cfg.index)
            for shard_ids, vectors in read_shards(work):
                index.add(vectors, shard_ids)
            groups = training.groups
            queries = encoder.encode([g.query for g in groups], "query", show_progress=True)
            widest = max(len(g.positives) for g in groups)
            _, hits = index.search(queries, cfg.depth + cfg.skip_top + widest)
            lines, kept = [], []
            for g, row in zip(groups, hits):
                positives = set(g.positives)
                negatives = [d for d in row if d not in positives][cfg.skip_top : cfg.skip_top + cfg.depth]
                kept.append(len(negatives))
                lines.append(json.dumps({"query_id": g.query_id, "query": g.query, "positive_ids": g.positives,
                                         "negative_ids": negatives}) + "\n")
            atomic_write_text(output, "".join(lines))
            summary = {"queries": len(groups), "negatives_per_query": sum(kept) / len(kept), "output": output}
        state.wait_for_everyone()
        return summary
    finally:
        if state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
