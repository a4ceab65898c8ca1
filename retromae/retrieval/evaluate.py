"""`retromae evaluate`: encode a corpus, search it, score; one dataset or a suite of them.

Under `accelerate launch` every process encodes a contiguous share of the corpus and of the queries into
memory-mapped shards, searches all the queries against its own corpus shard (`retromae.retrieval.search`), and
the main process merges the shards' top-k into the exact top-k of the whole corpus and scores it. DupMAE's joint
representation is encoded and searched the same way, shard by shard. The shards go to a scratch folder beside the
output (`retromae.retrieval.scratch`: its free space is checked first, its files allocated for real).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retromae.config import ConfigError, build, data_root as default_data_root, load_yaml
from retromae.data.corpus import CorpusError
from retromae.io import atomic_write_text
from retromae.retrieval.data import RetrievalData, load_dataset, write_trec_run
from retromae.retrieval.encoder import EncodeConfig, TextEncoder, encode_shard, read_shards, shard_range
from retromae.retrieval.bm25 import is_bm25
from retromae.retrieval.metrics import DEFAULT_METRICS, evaluate, parse_metric
from retromae.retrieval.scratch import check_space, make_scratch, scratch_root, shard_dtype
from retromae.retrieval.search import merge_top_k, search_shard
from retromae.retrieval.sparse import SparseSearchConfig

logger = logging.getLogger(__name__)


@dataclass
class SearchConfig:
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))  # e.g. ndcg@10, recall@100, mrr@10
    depth: int = 0  # documents retrieved per query (0: the largest cut-off of the metrics, at least 100)
    index: str = "Flat"  # faiss factory string; Flat = exact inner product
    backend: str = "auto"  # auto | faiss | torch (exact search on GPUs without faiss-gpu; see retrieval/search.py)
    use_gpu: str = "auto"  # auto | true | false: faiss indexes on GPUs (needs faiss with GPU support)
    nprobe: int = 32  # IVF indexes: inverted lists searched per query
    ignore_identical_ids: bool | None = None  # drop documents whose id equals the query id; null: BEIR yes, MS MARCO no
    title_separator: str = " "  # between a document's title and text (" [SEP] " for MS MARCO recipes)
    representation: str = "dense"  # dense | dupmae ([W h ; top-k mu], dense dot + sparse dot) | splade (sparse.py)
    hybrid_search: str = "exact"  # dupmae only: exact (sparse matrix product) | pooled (FAISS pool, re-scored)
    candidate_pool: int = 1000  # dupmae pooled search: dense candidates re-scored per query
    layers: list[int] = field(default_factory=list)  # (layer, dim) evaluation (Starbucks): the layers scored ([]: off)
    dims: list[int] = field(default_factory=list)  # ... and the prefix sizes: every layer x dim pair is scored
    sparse: SparseSearchConfig = field(default_factory=SparseSearchConfig)  # splade: exact or Seismic search
    work_dir: str | None = None  # scratch folder for the vector shards (null: $RETROMAE_WORK, else beside the output)
    shard_dtype: str = "float32"  # vectors in the scratch shards: float32 | float16 (half the disk, rounded vectors)

    def validate(self) -> None:
        if self.representation not in ("dense", "dupmae", "splade"):
            raise ConfigError(f"representation={self.representation!r} must be dense, dupmae or splade",
                              key="representation")
        self.sparse.validate()
        if bool(self.layers) != bool(self.dims):
            raise ConfigError("layers and dims go together: the (layer, dim) grid needs both", key="layers")
        if self.layers and self.representation != "dense":
            raise ConfigError("the (layer, dim) evaluation is for dense representations", key="layers")
        if self.backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"backend={self.backend!r} must be auto, faiss or torch", key="backend")
        if self.nprobe < 1:
            raise ConfigError("nprobe must be >= 1", key="nprobe")
        shard_dtype(self.shard_dtype)

    def retrieval_depth(self) -> int:
        if self.depth > 0:
            return self.depth
        cuts = [k for _, k in map(parse_metric, self.metrics) if k]
        return max([100, *cuts])

    def drops_identical_ids(self, data: RetrievalData) -> bool:
        """BEIR's rule (it matters for ArguAna and Quora); MS MARCO's official evaluation does not apply it."""
        if self.ignore_identical_ids is not None:
            return self.ignore_identical_ids
        return data.kind != "msmarco"


def _gpu_setting(value: str):
    return {"auto": "auto", "true": True, "false": False}.get(str(value).lower(), "auto")


def shard_search(queries, shard: Path, first: int, k: int, search: SearchConfig, device) -> tuple:
    """This process's corpus shard searched for every query (an array, or the list of query shards): (scores,
    global positions)."""
    vectors = np.load(shard, mmap_mode="r")
    scores, positions = search_shard(queries, vectors, k, search.index, search.backend, _gpu_setting(search.use_gpu),
                                     search.nprobe, device)
    return scores, np.where(positions >= 0, positions + first, -1)


def encode_corpus_and_queries(encoder: TextEncoder, data: RetrievalData, search: SearchConfig, work: Path, state,
                              depth: int = 0) -> tuple[list[str], Path, list[np.ndarray], int]:
    """This process's shard of the corpus and of the queries encoded into `work`; then every query shard.
    Returns (query ids, this process's corpus shard file, the query shards (memory-mapped, in order: never
    concatenated), the shard's first corpus position)."""
    rank, world = state.process_index, state.num_processes
    ids, texts = data.passages(search.title_separator)
    query_ids = list(data.queries)
    dtype = shard_dtype(search.shard_dtype)
    vectors = (len(ids) + len(query_ids)) * encoder.dimension * np.dtype(dtype).itemsize
    check_space_everywhere(work, vectors + world * len(query_ids) * depth * 12, "encoding the corpus and the queries")
    shard = encode_shard(encoder, ids, texts, work / "corpus", rank, world, show_progress=state.is_main_process,
                         dtype=dtype)
    encode_shard(encoder, query_ids, [data.queries[q] for q in query_ids], work / "queries", rank, world,
                 kind="query", show_progress=False, dtype=dtype)
    state.wait_for_everyone()
    queries = [v for _, v in read_shards(work / "queries")]
    return query_ids, shard, queries, shard_range(len(ids), rank, world)[0]


def check_space_everywhere(work: Path, needed: int, what: str) -> None:
    """The main process checks the scratch folder's free space for the whole launch; every process stops with its
    message if it is short."""
    from retromae.distributed import broadcast_decision, world

    verdict = None
    if world()[0] == 0:
        try:
            check_space(work, needed, what)
        except ConfigError as err:
            verdict = str(err)
    verdict = broadcast_decision(verdict)
    if verdict:
        raise ConfigError(verdict)


def dense_run(encoder: TextEncoder, data: RetrievalData, search: SearchConfig, work: Path, state,
              depth: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """Encode, search and merge (see the module docstring); (query ids, scores, positions) on the main process."""
    query_ids, shard, queries, lo = encode_corpus_and_queries(encoder, data, search, work, state, depth)
    scores, positions = shard_search(queries, shard, lo, depth, search, encoder.device)
    return _gather_results(query_ids, scores, positions, depth, work, state)


def hybrid_run(encoder, data: RetrievalData, search: SearchConfig, work: Path, state,
               depth: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """DupMAE's joint representation, shard by shard: exact (sparse product) or pooled search of this process's
    share of the corpus against every query, merged as the dense path is."""
    from retromae.retrieval.hybrid import exact_search, pooled_search

    rank, world = state.process_index, state.num_processes
    _, texts = data.passages(search.title_separator)
    lo, hi = shard_range(len(texts), rank, world)
    docs = encoder.encode(texts[lo:hi], "passage")
    query_ids = list(data.queries)
    queries = encoder.encode([data.queries[q] for q in query_ids], "query")
    if hi == lo:
        scores, positions = np.zeros((len(query_ids), 0), np.float32), np.zeros((len(query_ids), 0), np.int64)
    elif search.hybrid_search == "pooled":
        scores, positions = pooled_search(queries, docs, depth, search.candidate_pool, search.index,
                                          _gpu_setting(search.use_gpu))
    else:
        scores, positions = exact_search(queries, docs, depth)
    return _gather_results(query_ids, scores, positions + lo, depth, work, state)


def matryoshka_run(encoder: TextEncoder, data: RetrievalData, search: SearchConfig, work: Path, state,
                   depth: int) -> dict | None:
    """(layer, dim) evaluation: every text encoded once as its vectors at `search.layers`, then every pair scored by
    the first `dim` coordinates of its layer's vector (no re-normalisation), as Starbucks evaluates; {(layer,
    dim): (query ids, scores, positions)} on the main process."""
    encoder.with_layers(search.layers)
    width = encoder.dimension // len(search.layers)
    query_ids, shard, query_shards, lo = encode_corpus_and_queries(encoder, data, search, work, state, depth)
    all_queries = np.concatenate(query_shards)
    vectors = np.load(shard, mmap_mode="r")
    found = {}
    for i, layer in enumerate(search.layers):
        for dim in search.dims:
            if dim > width:
                raise ConfigError(f"dims: {dim} is wider than the model's {width}")
            columns = slice(i * width, i * width + dim)
            scores, positions = search_shard(np.ascontiguousarray(all_queries[:, columns]),
                                             np.ascontiguousarray(vectors[:, columns]), depth, search.index,
                                             search.backend, _gpu_setting(search.use_gpu), search.nprobe,
                                             encoder.device)
            positions = np.where(positions >= 0, positions + lo, -1)
            found[(layer, dim)] = _gather_results(query_ids, scores, positions, depth, work, state, f"{layer}x{dim}")
    return found if state.is_main_process else None


def _gather_results(query_ids, scores, positions, depth, work: Path, state, tag: str = "dense"):
    """Every process's shard results, merged into the top `depth` on the main process (None elsewhere)."""
    if state.num_processes == 1:
        return query_ids, *merge_top_k([scores], [positions], depth)
    results = work / "results"
    results.mkdir(exist_ok=True)
    np.save(results / f".scores-{tag}-{state.process_index}.npy", scores)
    np.save(results / f".positions-{tag}-{state.process_index}.npy", positions)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    parts = [(np.load(results / f".scores-{tag}-{r}.npy", mmap_mode="r"),
              np.load(results / f".positions-{tag}-{r}.npy", mmap_mode="r")) for r in range(state.num_processes)]
    return query_ids, *merge_in_blocks(parts, depth)


def merge_in_blocks(parts: list[tuple[np.ndarray, np.ndarray]], depth: int, lo: int = 0, hi: int | None = None,
                    block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The processes' (scores, positions) of queries lo..hi merged a block of queries at a time: the merge of every
    process's results at once would hold them all, and sort them, together (8 x 7k x 1000 pairs at MS MARCO)."""
    hi = len(parts[0][0]) if hi is None else hi
    k = min(depth, sum(s.shape[1] for s, _ in parts))
    scores, positions = np.empty((hi - lo, k), np.float32), np.empty((hi - lo, k), np.int64)
    for start in range(lo, hi, block):
        stop = min(hi, start + block)
        merged = merge_top_k([np.asarray(s[start:stop]) for s, _ in parts],
                             [np.asarray(p[start:stop]) for _, p in parts], k)
        scores[start - lo : stop - lo], positions[start - lo : stop - lo] = merged
    return scores, positions


def _to_run(data: RetrievalData, query_ids: list[str], scores: np.ndarray, positions: np.ndarray) -> dict:
    """{query id: {doc id: score}}, the document ids read in one take from the collection."""
    flat = positions[positions >= 0]
    names = iter(data.corpus.ids_at(flat))
    run = {}
    for qid, row_scores, row in zip(query_ids, scores, positions):
        run[qid] = {next(names): float(s) for s, p in zip(row_scores, row) if p >= 0}
    return run


def score_run(run: dict, data: RetrievalData, search: SearchConfig, run_file: str | None = None) -> tuple[dict, dict]:
    """Cut the run to its depth (after the identical-id rule where it applies), write it if asked, score it."""
    depth = search.retrieval_depth()
    drop = search.drops_identical_ids(data)
    run = {q: dict([(d, s) for d, s in docs.items() if not (drop and d == q)][:depth]) for q, docs in run.items()}
    if run_file:
        write_trec_run(run_file, run)
    return evaluate(data.qrels, run, search.metrics, drop)


def evaluate_model(model: str, dataset: str | RetrievalData, split: str | None = None,
                   encode_cfg: EncodeConfig | None = None, search: SearchConfig | None = None,
                   run_file: str | None = None, output: str | None = None, encoder=None) -> dict | None:
    """Evaluate `model` on `dataset` (a local BEIR / MS MARCO folder, a hub name, or loaded data).

    Returns (and writes to `output` as JSON) the mean metrics at the top level, with the settings used, on the
    main process (None on the others). Under `accelerate launch` the corpus is encoded and searched in shards by
    every process (see the module docstring).
    """
    from retromae.distributed import process_state

    state = process_state()
    search = search or SearchConfig()
    search.validate()
    encode_cfg = encode_cfg or EncodeConfig()
    data = dataset if isinstance(dataset, RetrievalData) else load_dataset(dataset, split, search.title_separator)
    started = time.perf_counter()
    # one more when identical ids are dropped, so that every query keeps `depth` documents
    depth = search.retrieval_depth() + int(search.drops_identical_ids(data))
    settings = {**asdict(encode_cfg), **asdict(search), "depth": search.retrieval_depth(),
                "ignore_identical_ids": search.drops_identical_ids(data), "num_processes": state.num_processes}
    if is_bm25(model):
        if not state.is_main_process:
            return None  # BM25 runs on the main process alone (seconds on BEIR); the others go on
        from retromae.retrieval.bm25 import BM25Config, bm25_search

        query_ids = list(data.queries)
        scores, positions = bm25_search(data.passages(search.title_separator)[1],
                                        [data.queries[q] for q in query_ids], depth)
        settings = {**asdict(search), "depth": search.retrieval_depth(), "model": "bm25", **asdict(BM25Config()),
                    "ignore_identical_ids": search.drops_identical_ids(data)}
        return _finish(model, data, search, (query_ids, scores, positions), settings, started, run_file, output)
    root = scratch_root(search.work_dir, output)
    work = make_scratch(root, "retromae-eval-") if state.num_processes == 1 else _shared_work_dir(state, root)
    try:
        encoder = encoder or make_encoder(model, encode_cfg, search, state.device)
        if state.is_main_process:
            warn_if_unreadable_once(encoder.tokenizer, data, search.title_separator)
        sparsity = None
        if search.representation == "splade":  # learned sparse retrieval: retrieval/sparse.py
            from retromae.retrieval.sparse import sparse_run

            found, sparsity = sparse_run(encoder, data, search, work, state, depth)
            settings.update(encoder.settings())
        elif search.representation == "dupmae":
            found = hybrid_run(encoder, data, search, work, state, depth)
            settings.update(asdict(encoder.cfg))
        elif search.layers:
            grid = matryoshka_run(encoder, data, search, work, state, depth)
            settings.update(encoder.settings())
            found = grid[(search.layers[-1], max(search.dims))] if grid else None
        else:
            found = dense_run(encoder, data, search, work, state, depth)
            settings.update(encoder.settings())
        state.wait_for_everyone()
    finally:
        if state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
    if not state.is_main_process:
        return None
    if sparsity and "exact_run" in sparsity:  # Seismic's run, and the exact one on the same vectors beside it
        sparsity["exact"] = score_run(_to_run(data, *sparsity.pop("exact_run")), data, search)[0]
    extra = {"sparsity": sparsity} if sparsity else {}
    if search.layers:
        extra["matryoshka"] = {f"{layer}x{dim}": score_run(_to_run(data, *grid[(layer, dim)]), data, search)[0]
                               for layer, dim in grid}
    result = _finish(model, data, search, found, settings, started, run_file, output, extra)
    if search.layers and output:
        write_matryoshka(result, search, Path(output))
    return result


_READABILITY_CHECKED: set = set()


def warn_if_unreadable_once(tokenizer, data: RetrievalData, title_separator: str) -> None:
    """`retromae.inputs.warn_if_unreadable` on an evenly spaced sample of the corpus, once per collection and
    tokenizer in a process (a dev set scored every N steps is looked at once)."""
    from retromae.inputs import SAMPLE_TEXTS, warn_if_unreadable

    key = (json.dumps(data.sources, sort_keys=True), getattr(tokenizer, "name_or_path", id(tokenizer)))
    if tokenizer is None or key in _READABILITY_CHECKED:
        return
    _READABILITY_CHECKED.add(key)
    _, texts = data.passages(title_separator)
    step = max(1, len(texts) // SAMPLE_TEXTS)
    warn_if_unreadable(tokenizer, [texts[i] for i in range(0, len(texts), step)][:SAMPLE_TEXTS],
                       data.sources.get("corpus", data.name))


def matryoshka_table(result: dict, search: SearchConfig, metric: str | None = None) -> str:
    """Layers (rows) x dims (columns) of one metric, as Markdown."""
    metric = metric or search.metrics[0]
    grid = result["matryoshka"]
    lines = [f"{metric} by layer (rows) and dimensions (columns)\n", "| layer | " + " | ".join(map(str, search.dims))
             + " |", "|---|" + "---:|" * len(search.dims)]
    for layer in search.layers:
        lines.append(f"| {layer} | " + " | ".join(f"{grid[f'{layer}x{d}'][metric]:.4f}" for d in search.dims) + " |")
    return "\n".join(lines) + "\n"


def write_matryoshka(result: dict, search: SearchConfig, output: Path) -> None:
    """OUTPUT's stem + .matryoshka.md (the table) and .matryoshka.png (a heatmap of the first metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = search.metrics[0]
    stem = output.with_suffix("")
    atomic_write_text(f"{stem}.matryoshka.md", matryoshka_table(result, search))
    values = np.array([[result["matryoshka"][f"{layer}x{d}"][metric] for d in search.dims] for layer in search.layers])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(search.dims), 1.0 + 0.6 * len(search.layers)))
    image = ax.imshow(values, cmap="viridis", origin="lower", aspect="auto")
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=7, color="white" if v < values.mean() else "black")
    ax.set_xticks(range(len(search.dims)), search.dims)
    ax.set_yticks(range(len(search.layers)), search.layers)
    ax.set_xlabel("dimensions")
    ax.set_ylabel("layer")
    ax.set_title(f"{result['dataset']}: {metric}")
    fig.colorbar(image)
    fig.tight_layout()
    tmp = Path(f"{stem}.matryoshka.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(f"{stem}.matryoshka.png")


def _finish(model, data: RetrievalData, search: SearchConfig, found, settings: dict, started: float,
            run_file: str | None, output: str | None, extra: dict | None = None) -> dict:
    """Score the merged results, write the run and the JSON if asked; the result row."""
    run = _to_run(data, *found)
    means, per_query = score_run(run, data, search, run_file)
    result = {**means, "dataset": data.name, "split": data.split, "model": model, "num_queries": len(per_query),
              "num_documents": len(data.corpus), "seconds": round(time.perf_counter() - started, 1),
              "settings": settings, "sources": data.sources, **(extra or {})}
    if output:
        atomic_write_text(output, json.dumps({**result, "per_query": per_query}, indent=1))
    return result


def _shared_work_dir(state, root: Path | None = None) -> Path:
    """One scratch folder that every process of the launch writes its shards into, made by the main process under
    `root` (see retrieval/scratch.py; several machines need a folder they all see), and checked to be seen by all."""
    from retromae.distributed import broadcast_decision
    from retromae.runs import check_same_folder

    work = Path(broadcast_decision(str(make_scratch(root, "retromae-shards-")) if state.is_main_process else None))
    check_same_folder(work, "the scratch folder (--work-dir, search.work_dir or $RETROMAE_WORK)")
    return work


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
    data_root: str = field(default_factory=lambda: str(default_data_root() / "beir"))  # one folder per dataset
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


def make_encoder(model: str, encode: EncodeConfig, search: SearchConfig, device):
    if search.representation == "splade":
        from retromae.retrieval.sparse import SparseTextEncoder

        return SparseTextEncoder(model, encode, device=device)
    if search.representation == "dupmae":
        from retromae.retrieval.hybrid import HybridEncoder

        return HybridEncoder(model, encode, device=device)
    return TextEncoder(model, encode, device=device)


def run_suite(model: str, suite: SuiteConfig, output: str | None = None) -> tuple[list[dict], str]:
    """Evaluate every dataset of the suite found locally; skip (with a message) what is not there."""
    from retromae.data.download import get_command
    from retromae.distributed import process_state

    root = Path(suite.data_root)
    if output and not suite.search.work_dir:  # scratch shards beside the table, where there is room for results
        from dataclasses import replace

        suite = replace(suite, search=replace(suite.search, work_dir=str(Path(output).resolve().parent)))
    rows, notes = [], []
    encoder, main = None, process_state().is_main_process
    say = (lambda text: print(text, flush=True)) if main else (lambda text: None)  # noqa: E731
    entries = [(name, [root / name]) for name in suite.datasets]
    entries += [(name, [root / name / part for part in parts]) for name, parts in suite.groups.items()]
    evaluated = 0
    for name, folders in entries:
        missing = [f for f in folders if not f.is_dir()]
        if missing:
            notes.append(f"skipped {name}: not found at {missing[0]} ({get_command([folders[0]])}, or set "
                         "data_root)")
            say(notes[-1])
            continue
        results = []
        for folder in folders:
            try:
                data = load_dataset(str(folder), suite.split, suite.search.title_separator)
            except CorpusError as err:
                notes.append(f"skipped {name}: {err}")
                say(notes[-1])
                results = None
                break
            # built once for the suite, on this process's device (under a launch: cuda:<local rank>, not cuda:0)
            if not is_bm25(model):
                encoder = encoder or make_encoder(model, suite.encode, suite.search, process_state().device)
            results.append(evaluate_model(model, data, suite.split, suite.encode, suite.search, encoder=encoder))
        evaluated += bool(results)  # counted on every process (the others get None as results)
        if not results or results[0] is None:  # non-main processes get None
            continue
        row = {"dataset": name, **{m: statistics.mean(r[m] for r in results) for m in suite.search.metrics}}
        rows.append(row)
        say(f"{name}: " + "  ".join(f"{m} {row[m]:.4f}" for m in suite.search.metrics))
    if not evaluated:
        raise CorpusError(empty_suite_message(suite, entries, notes))
    table = f"### {suite.name}: {model}\n\n" + format_table(rows, suite.search.metrics)
    if rows:
        mean_row = {"dataset": f"**average ({len(rows)} of {len(entries)})**",
                    **{m: statistics.mean(r[m] for r in rows) for m in suite.search.metrics}}
        table += format_table([mean_row], suite.search.metrics).split("\n", 2)[2]
    if notes:
        table += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if output and main:
        atomic_write_text(output, table)
    return rows, table


def empty_suite_message(suite: SuiteConfig, entries: list, notes: list[str]) -> str:
    """One line: what the suite looked for, where, and how to get it."""
    from retromae.data.download import get_command

    names = [name for name, _ in entries]
    if not names:
        return f"suite {suite.name!r} names no dataset (datasets: [...] in its file)"
    unreadable = [n for n in notes if "not found at" not in n]
    if unreadable:
        return f"suite {suite.name!r}: no dataset could be evaluated; " + "; ".join(unreadable)
    root = Path(suite.data_root)
    where = str(root) if root.is_absolute() else f"{root} (relative to {Path.cwd()})"
    return (f"suite {suite.name!r}: none of its datasets ({', '.join(names)}) is under {where}; "
            f"{get_command([root / n for n in names])}, or point --data-root at a folder that holds them")


def check_metrics(metrics: list[str]) -> None:
    for m in metrics:
        try:
            parse_metric(m)
        except ValueError as err:
            raise ConfigError(str(err)) from None

