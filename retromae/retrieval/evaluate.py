"""`retromae evaluate`: encode a corpus, index it with FAISS, search, score; one dataset or a suite of them.

Under `accelerate launch` with several processes, every process encodes a contiguous share of the corpus into
a memory-mapped shard; the main process then indexes the shards, encodes the queries, searches and scores.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from retromae.config import ConfigError, build, load_yaml
from retromae.data.corpus import CorpusError
from retromae.io import atomic_write_text
from retromae.retrieval.data import RetrievalData, load_dataset, write_trec_run
from retromae.retrieval.encoder import EncodeConfig, TextEncoder, encode_shard, read_shards
from retromae.retrieval.index import DenseIndex, run_from_hits
from retromae.retrieval.metrics import DEFAULT_METRICS, evaluate, parse_metric

logger = logging.getLogger(__name__)


@dataclass
class SearchConfig:
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))  # e.g. ndcg@10, recall@100, mrr@10
    depth: int = 0  # documents retrieved per query (0: the largest cut-off of the metrics, at least 100)
    index: str = "Flat"  # faiss factory string; Flat = exact inner product
    use_gpu: str = "auto"  # auto | true | false: put the index on all GPUs (needs faiss with GPU support)
    ignore_identical_ids: bool = True  # BEIR's rule: drop documents whose id equals the query id
    title_separator: str = " "  # between a document's title and text (" [SEP] " for MS MARCO recipes)
    representation: str = "dense"  # dense | dupmae ([W h ; top-k mu], dense dot + sparse dot)
    hybrid_search: str = "exact"  # dupmae only: exact (sparse matrix product) | pooled (FAISS pool, re-scored)
    candidate_pool: int = 1000  # dupmae pooled search: dense candidates re-scored per query

    def retrieval_depth(self) -> int:
        if self.depth > 0:
            return self.depth
        cuts = [k for _, k in map(parse_metric, self.metrics) if k]
        return max([100, *cuts])


def encode_corpus(encoder: TextEncoder, data: RetrievalData, search: SearchConfig, work_dir: Path, state) -> None:
    ids, texts = data.passages(search.title_separator)
    encode_shard(encoder, ids, texts, work_dir, state.process_index, state.num_processes,
                 show_progress=state.is_main_process)


def dense_run(encoder: TextEncoder, data: RetrievalData, search: SearchConfig, shards_dir: Path) -> tuple[dict, bool]:
    """Index the corpus shards, encode the queries, search; (run, whether the index ran on GPUs)."""
    index = DenseIndex(encoder.dimension, search.index, _gpu_setting(search.use_gpu))
    for ids, vectors in read_shards(shards_dir):
        index.add(vectors, ids)
    query_ids = list(data.queries)
    queries = encoder.encode([data.queries[q] for q in query_ids], "query", show_progress=False)
    scores, hits = index.search(queries, _search_depth(search))
    return run_from_hits(query_ids, scores, hits), index.on_gpu


def hybrid_run(encoder, data: RetrievalData, search: SearchConfig) -> dict:
    """DupMAE's joint representation: exact (sparse product) or pooled (FAISS candidates re-scored) search."""
    from retromae.retrieval.hybrid import exact_search, pooled_search

    ids, texts = data.passages(search.title_separator)
    docs = encoder.encode(texts, "passage")
    query_ids = list(data.queries)
    queries = encoder.encode([data.queries[q] for q in query_ids], "query")
    if search.hybrid_search == "pooled":
        scores, positions = pooled_search(queries, docs, _search_depth(search), search.candidate_pool, search.index,
                                          _gpu_setting(search.use_gpu))
    else:
        scores, positions = exact_search(queries, docs, _search_depth(search))
    return run_from_hits(query_ids, scores, [[ids[p] for p in row] for row in positions])


def _search_depth(search: SearchConfig) -> int:
    # one more when identical ids are dropped, so that every query keeps `depth` documents
    return search.retrieval_depth() + int(search.ignore_identical_ids)


def score_run(run: dict, data: RetrievalData, search: SearchConfig, run_file: str | None = None) -> tuple[dict, dict]:
    """Cut the run to its depth (after BEIR's identical-id rule), write it if asked, score it."""
    depth = search.retrieval_depth()
    run = {q: dict([(d, s) for d, s in docs.items() if not (search.ignore_identical_ids and d == q)][:depth])
           for q, docs in run.items()}
    if run_file:
        write_trec_run(run_file, run)
    return evaluate(data.qrels, run, search.metrics, search.ignore_identical_ids)


def _gpu_setting(value: str):
    return {"auto": "auto", "true": True, "false": False}.get(str(value).lower(), "auto")


def evaluate_model(model: str, dataset: str | RetrievalData, split: str | None = None,
                   encode_cfg: EncodeConfig | None = None, search: SearchConfig | None = None,
                   run_file: str | None = None, output: str | None = None, encoder=None) -> dict | None:
    """Evaluate `model` on `dataset` (a local BEIR / MS MARCO folder, a hub name, or loaded data).

    Returns (and writes to `output` as JSON) the mean metrics at the top level, with the settings used, on the
    main process (None on the others). Under `accelerate launch` the corpus is encoded in shards by every
    process (dense representations; DupMAE's joint one is encoded by the main process alone).
    """
    from retromae.distributed import process_state

    state = process_state()
    search = search or SearchConfig()
    encode_cfg = encode_cfg or EncodeConfig()
    data = dataset if isinstance(dataset, RetrievalData) else load_dataset(dataset, split, search.title_separator)
    started = time.perf_counter()
    settings = {**asdict(encode_cfg), **asdict(search), "depth": search.retrieval_depth(),
                "num_processes": state.num_processes}
    if search.representation == "dupmae":
        if not state.is_main_process:
            return None
        from retromae.retrieval.hybrid import HybridEncoder

        run = hybrid_run(encoder or HybridEncoder(model, encode_cfg, device=state.device), data, search)
    else:
        encoder = encoder or TextEncoder(model, encode_cfg, device=state.device)
        work = Path(tempfile.mkdtemp(prefix="retromae-shards-")) if state.num_processes == 1 else _shared_work_dir(state)
        try:
            encode_corpus(encoder, data, search, work, state)
            state.wait_for_everyone()
            if state.is_main_process:
                run, on_gpu = dense_run(encoder, data, search, work)
                settings.update(encoder.settings(), index_on_gpu=on_gpu)
            state.wait_for_everyone()
        finally:
            if state.is_main_process:
                shutil.rmtree(work, ignore_errors=True)
        if not state.is_main_process:
            return None
    means, per_query = score_run(run, data, search, run_file)
    result = {**means, "dataset": data.name, "split": data.split, "model": model, "num_queries": len(per_query),
              "num_documents": len(data.corpus), "seconds": round(time.perf_counter() - started, 1),
              "settings": settings, "sources": data.sources}
    if output:
        atomic_write_text(output, json.dumps({**result, "per_query": per_query}, indent=1))
    return result


def _shared_work_dir(state) -> Path:
    """One temporary folder that every process of the launch writes its shard into (same machine)."""
    import torch.distributed as dist

    name = [tempfile.mkdtemp(prefix="retromae-shards-") if state.is_main_process else None]
    dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def format_table(rows: list[dict], metrics: list[str], first: str = "dataset") -> str:
    """A Markdown table: one row per result, one column per metric (4 decimals)."""
    head = f"| {first} | " + " | ".join(metrics) + " |\n|---|" + "---:|" * len(metrics) + "\n"
    body = ""
    for row in rows:
        cells = [f"{row[m]:.4f}" if isinstance(row.get(m), (int, float)) else "–" for m in metrics]
        body += f"| {row[first]} | " + " | ".join(cells) + " |\n"
    return head + body


# ----- suites ------------------------------------------------------------------------------------------


@dataclass
class SuiteConfig:
    name: str = "suite"  # printed in the table's title
    data_root: str = "../shared/data/beir"  # folder holding one sub-folder per dataset (BEIR layout)
    split: str | None = None  # qrels split (null: test for BEIR, dev.small for MS MARCO)
    datasets: list[str] = field(default_factory=list)  # sub-folders of data_root to evaluate
    groups: dict = field(default_factory=dict)  # name -> sub-folders averaged into one row (CQADupStack)
    search: SearchConfig = field(default_factory=SearchConfig)  # metrics, depth, index, title separator
    encode: EncodeConfig = field(default_factory=EncodeConfig)  # pooling, lengths, prefixes, precision


def load_suite(path: str, overrides: dict | None = None) -> SuiteConfig:
    data, lines = load_yaml(path)
    for key, value in (overrides or {}).items():
        data[key] = value
    return build(SuiteConfig, data, source=path, lines=lines)


def run_suite(model: str, suite: SuiteConfig, output: str | None = None) -> tuple[list[dict], str]:
    """Evaluate every dataset of the suite found locally; skip (with a message) what is not there."""
    root = Path(suite.data_root)
    rows, notes = [], []
    encoder = None
    entries = [(name, [root / name]) for name in suite.datasets]
    entries += [(name, [root / name / part for part in parts]) for name, parts in suite.groups.items()]
    for name, folders in entries:
        missing = [f for f in folders if not f.is_dir()]
        if missing:
            notes.append(f"skipped {name}: not found at {missing[0]} (put the BEIR folder there, or set data_root)")
            print(notes[-1], flush=True)
            continue
        results = []
        for folder in folders:
            try:
                data = load_dataset(str(folder), suite.split, suite.search.title_separator)
            except CorpusError as err:
                notes.append(f"skipped {name}: {err}")
                print(notes[-1], flush=True)
                results = None
                break
            encoder = encoder or TextEncoder(model, suite.encode)
            results.append(evaluate_model(model, data, suite.split, suite.encode, suite.search, encoder=encoder))
        if not results or results[0] is None:  # non-main processes get None
            continue
        row = {"dataset": name, **{m: statistics.mean(r[m] for r in results) for m in suite.search.metrics}}
        rows.append(row)
        print(f"{name}: " + "  ".join(f"{m} {row[m]:.4f}" for m in suite.search.metrics), flush=True)
    table = f"### {suite.name}: {model}\n\n" + format_table(rows, suite.search.metrics)
    if rows:
        mean_row = {"dataset": f"**average ({len(rows)} of {len(entries)})**",
                    **{m: statistics.mean(r[m] for r in rows) for m in suite.search.metrics}}
        table += format_table([mean_row], suite.search.metrics).split("\n", 2)[2]
    if notes:
        table += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if output:
        atomic_write_text(output, table)
    return rows, table


def check_metrics(metrics: list[str]) -> None:
    for m in metrics:
        try:
            parse_metric(m)
        except ValueError as err:
            raise ConfigError(str(err)) from None

