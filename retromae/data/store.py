"""The example cache: a corpus tokenized and cut once, in parallel, into memory-mapped Arrow shards.

The corpus is cut into shards of about `data.shard_mb` MB (a byte range of a file, at line boundaries, found by one
fast scan that also counts lines, so that errors still name the line; or a row range of a Hugging Face dataset).
The shards depend only on the corpus and that size, never on the number of processes, so the cache is the same
whoever builds it. Each shard is tokenized and cut by one process (`retromae.data.examples.ExampleBuilder`) and
written as `shard-NNNNN.arrow` under a temporary name, then renamed; `meta.json` is written once every shard is
there. The whole cache opens as one memory-mapped `datasets.Dataset` (columns `input_ids`, `doc`, and
`sentence_lengths` for whole documents) beside `token_counts.npy`, the corpus frequency of every token id (for
objectives that weigh words by their corpus statistics).

Who builds it: `retromae prepare` (with `data.num_proc` processes), or `retromae pretrain` itself when the cache
is missing, every training process taking its share of the shards (shard i goes to process i mod N) with
`data.num_proc` workers each. A process that has finished waits for the others by watching the cache folder,
not in a collective, so no process group's watchdog can time out during a long preparation. Any failure in one
process (bad input, any exception, a worker killed by the system, e.g. for lack of memory) is written beside the
shards and stops the others with the same message; a process that dies without a word is noticed when no shard has
appeared for `train.timeout_minutes`. At the start, if the cache is not complete everywhere, every process checks
that it sees the same cache folder as the main process (machines that do not share it would each wait for the
others' shards in their own folder).

Written by hand rather than with `datasets.Dataset.map(num_proc=...)`: local files are read line by line so that
bad input is reported with its file and line, packing must carry a document across rows, and preparation must
be shared by the processes of a launch without a barrier; the result is still a plain `datasets.Dataset`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retromae.config import ConfigError
from retromae.data.corpus import CorpusError, Row, _lines, detect_format, open_hf, read_hf, read_rows
from retromae.data.examples import DataConfig, ExampleBuilder, store_fingerprint
from retromae.io import atomic_write_text, follow_umask

logger = logging.getLogger(__name__)

SCAN_BLOCK = 16 << 20  # bytes read at a time when planning shards


@dataclass(frozen=True)
class Shard:
    index: int  # position in the corpus's shard list; document ids of the shard start at index << 32
    source: str
    kind: str  # jsonl | text | tsv | hf
    start: int = 0  # first byte (files) or row (hf)
    end: int | None = None  # end byte / row (exclusive); None: to the end
    first_line: int = 1  # line number of `start` (files)


def plan_shards(cfg: DataConfig) -> list[Shard]:
    """The corpus's shards, in corpus order (see the module docstring)."""
    target = cfg.shard_mb << 20
    shards: list[Shard] = []
    for source in cfg.corpus:
        kind = detect_format(source) if cfg.format == "auto" else cfg.format
        if kind == "hf":
            ranges = _hf_ranges(source, cfg, target)
            shards += [Shard(len(shards) + i, source, kind, a, b) for i, (a, b) in enumerate(ranges)]
        elif source.endswith(".gz") or not os.path.isfile(source):
            shards.append(Shard(len(shards), source, kind))  # compressed: read whole (no seeking)
        else:
            shards += [Shard(len(shards) + i, source, kind, a, b, line)
                       for i, (a, b, line) in enumerate(file_ranges(source, target))]
    return shards


def file_ranges(path: str, target: int) -> list[tuple[int, int, int]]:
    """(start byte, end byte, first line number) of pieces of about `target` bytes, cut after a line break."""
    size = os.path.getsize(path)
    if size <= target:
        return [(0, size, 1)]
    ranges, start, first_line, lines_before = [], 0, 1, 0
    next_cut = target
    with open(path, "rb") as f:
        offset = 0
        while True:
            block = f.read(SCAN_BLOCK)
            if not block:
                break
            while next_cut < offset + len(block):
                newline = block.find(b"\n", max(0, next_cut - offset))
                if newline < 0:
                    break  # the line goes on in the next block
                cut = offset + newline + 1
                lines = lines_before + block.count(b"\n", 0, newline + 1)
                ranges.append((start, cut, first_line))
                start, first_line = cut, lines + 1
                next_cut = cut + target
            lines_before += block.count(b"\n")
            offset += len(block)
    if start < size:
        ranges.append((start, size, first_line))
    return ranges


def _hf_ranges(source: str, cfg: DataConfig, target: int) -> list[tuple[int, int]]:
    rows = open_hf(source, cfg.hf_config, cfg.hf_split, streaming=False)
    n = len(rows)
    if n == 0:
        return [(0, 0)]
    sample = rows.select(range(min(n, 1000)))[cfg.text_field]
    per_row = max(1, sum(len(t or "") for t in sample) // len(sample))
    per_shard = max(1, target // per_row)
    return [(a, min(n, a + per_shard)) for a in range(0, n, per_shard)]


def shard_rows(shard: Shard, cfg: DataConfig) -> Iterator[Row]:
    fields = cfg.text_fields()
    if shard.kind == "hf":
        rows = open_hf(shard.source, cfg.hf_config, cfg.hf_split, streaming=False)
        end = len(rows) if shard.end is None else shard.end
        return read_hf(shard.source, fields, cfg.hf_config, cfg.hf_split,
                       rows=rows.select(range(shard.start, end)), first_row=shard.start)
    lines = _lines(shard.source, shard.start, shard.end, shard.first_line)
    return read_rows(shard.source, shard.kind, fields, lines=lines)


def _features(cfg: DataConfig):
    import datasets

    columns = {"input_ids": datasets.Sequence(datasets.Value("int32")), "doc": datasets.Value("int64")}
    if cfg.cut == "document":
        columns["sentence_lengths"] = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features(columns)


def build_shard(shard: Shard, cfg: DataConfig, tokenizer, folder: Path) -> dict:
    """Tokenize and cut one shard into `folder/shard-NNNNN.arrow` (+ its token counts); returns its statistics."""
    from datasets.arrow_writer import ArrowWriter

    final = folder / f"shard-{shard.index:05d}.arrow"
    tmp = folder / f".shard-{shard.index:05d}.{os.getpid()}.tmp"
    builder = ExampleBuilder(tokenizer, cfg, first_doc=shard.index << 32)
    counts = np.zeros(len(tokenizer) + 1, dtype=np.int64)
    examples = tokens = 0
    columns = {name: [] for name in _features(cfg)}
    writer = ArrowWriter(features=_features(cfg), path=str(tmp))
    try:
        for example in builder.examples(shard_rows(shard, cfg), cfg.joins(shard.source)):
            columns["input_ids"].append(example.input_ids)
            columns["doc"].append(example.doc)
            if "sentence_lengths" in columns:
                columns["sentence_lengths"].append(example.sentence_lengths)
            if len(columns["doc"]) >= 2000:
                examples, tokens = _flush(writer, columns, counts, examples, tokens)
        examples, tokens = _flush(writer, columns, counts, examples, tokens)
        writer.finalize()
    finally:
        writer.close()
    np.save(folder / f".shard-{shard.index:05d}.counts.npy", counts)
    follow_umask(tmp)
    os.replace(tmp, final)
    return {"shard": shard.index, "examples": examples, "tokens": tokens}


def _flush(writer, columns: dict, counts: np.ndarray, examples: int, tokens: int) -> tuple[int, int]:
    if columns["doc"]:
        flat = np.fromiter((t for ids in columns["input_ids"] for t in ids), dtype=np.int64)
        counts += np.bincount(flat, minlength=len(counts))[: len(counts)]
        writer.write_batch(columns)
        examples, tokens = examples + len(columns["doc"]), tokens + int(flat.size)
        for values in columns.values():
            values.clear()
    return examples, tokens


def cache_folder(cfg: DataConfig, tokenizer) -> Path:
    root = Path(cfg.cache_dir) if cfg.cache_dir else Path(_datasets_cache())
    return root / "retromae-examples" / store_fingerprint(cfg, tokenizer)


def _datasets_cache() -> str:
    from datasets import config

    return str(config.HF_DATASETS_CACHE)


def is_prepared(cfg: DataConfig, tokenizer) -> bool:
    return (cache_folder(cfg, tokenizer) / "meta.json").is_file()


def _worker_init() -> None:
    # one process, one core (and no torch call in a forked child: its OpenMP pool does not survive a fork)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _fault_point(shard: Shard) -> None:
    """Fault injection for tests: RETROMAE_FAULT=prepare-kill:N kills the worker building shard N with SIGKILL (as
    the OOM killer would); prepare-raise:N makes it raise an unexpected exception."""
    fault = os.environ.get("RETROMAE_FAULT", "")
    if fault == f"prepare-kill:{shard.index}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if fault == f"prepare-raise:{shard.index}":
        raise RuntimeError(f"injected failure while building shard {shard.index}")


def _build_one(job) -> dict:
    shard, cfg, tokenizer, folder = job
    try:
        _fault_point(shard)
        return build_shard(shard, cfg, tokenizer, folder)
    except Exception as err:  # noqa: BLE001 (any failure must reach the parent, and through it the other processes)
        return {"shard": shard.index, "error": f"{type(err).__name__}: {err}"}


def prepare_store(cfg: DataConfig, tokenizer, num_proc: int | None = None, rank: int = 0, world: int = 1,
                  wait_minutes: float | None = None):
    """Build the example cache if it is missing (this process's share of the shards, see the module docstring)
    and open it. Returns the memory-mapped `datasets.Dataset`. `wait_minutes`: how long a process waits while no
    shard appears (default: the launch's timeout, train.timeout_minutes)."""
    from retromae.distributed import timeout_minutes

    folder = cache_folder(cfg, tokenizer)
    wait_minutes = wait_minutes or timeout_minutes()
    started = time.perf_counter()
    if not (folder / "meta.json").is_file():
        shards = plan_shards(cfg)
        mine = [s for s in shards if s.index % world == rank and not _done(folder, s)]
        _remove_leftovers(folder, mine, rank)
    if world > 1:
        _check_shared(folder)  # a collective: no process waits for shards before every one has cleaned up its own
    if not (folder / "meta.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        if mine:
            logger.info("preparing %d of the corpus's %d shards with %d process(es) into %s", len(mine), len(shards),
                        num_proc or cfg.num_proc, folder)
        _run(mine, cfg, tokenizer, folder, num_proc or cfg.num_proc)
        if rank == 0:
            _wait_for_shards(folder, shards, wait_minutes)
            _finish(folder, shards, cfg, tokenizer, time.perf_counter() - started)
        else:
            _wait_for(folder / "meta.json", folder, wait_minutes)
    return open_store(folder)


def _remove_leftovers(folder: Path, mine: list[Shard], rank: int) -> None:
    """What an earlier attempt left: each process removes its own shards' temporary files and failure markers only
    (processes given a rank without a process group start unsynchronised: one must not delete a file another is
    writing); process 0 also removes the markers of failed workers."""
    for shard in mine:
        for stale in [*folder.glob(f".shard-{shard.index:05d}.*.tmp"), folder / f"shard-{shard.index:05d}.failed"]:
            stale.unlink(missing_ok=True)
    if rank == 0:
        for stale in folder.glob("worker-*.failed"):
            stale.unlink(missing_ok=True)


def _check_shared(folder: Path) -> None:
    """Under a launch: unless every process finds the cache complete, all must see the same cache folder."""
    from retromae.distributed import gather_objects, world

    if world()[1] == 1:
        return
    if not all(gather_objects((folder / "meta.json").is_file())):
        from retromae.runs import check_same_folder

        check_same_folder(folder, "data.cache_dir")


def _done(folder: Path, shard: Shard) -> bool:
    return (folder / f"shard-{shard.index:05d}.arrow").is_file()


def _run(shards: list[Shard], cfg: DataConfig, tokenizer, folder: Path, num_proc: int) -> None:
    """Build `shards` with `num_proc` worker processes. A pool of processes whose results come back as futures:
    when a worker dies (SIGKILL, the OOM killer) the pool breaks and says so, where multiprocessing.Pool would wait
    for the lost result forever."""
    jobs = [(s, cfg, tokenizer, folder) for s in shards]
    if num_proc > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        pool = ProcessPoolExecutor(min(num_proc, len(jobs)), mp_context=multiprocessing.get_context("fork"),
                                   initializer=_worker_init)
        try:
            futures = [pool.submit(_build_one, job) for job in jobs]
            _check((f.result() for f in as_completed(futures)), folder, len(jobs))
        except BrokenProcessPool:
            _fail(folder, "ConfigError: data preparation: a worker process died while tokenizing the corpus "
                  "(killed by the system, most often for lack of memory: lower data.num_proc)")
        finally:  # on a failure, the shards not started are dropped (the workers finish the one they are on)
            pool.shutdown(wait=False, cancel_futures=True)
    else:
        _check(map(_build_one, jobs), folder, len(jobs))


def _check(results, folder: Path, total: int) -> None:
    from tqdm.auto import tqdm

    for result in tqdm(results, total=total, desc="prepare shards", unit="shard", disable=None):
        if "error" in result:
            _fail(folder, result["error"], result["shard"])


def _fail(folder: Path, error: str, shard: int | None = None) -> None:
    """Leave `error` ("Kind: message") beside the shards, for the other processes of the launch, which stop with the
    same message; then stop this one with it."""
    name = f"shard-{shard:05d}.failed" if shard is not None else f"worker-{os.getpid()}.failed"
    atomic_write_text(folder / name, error)
    _raise_failure(folder, error)


def _failure(folder: Path) -> str | None:
    failed = sorted(folder.glob("*.failed"))
    return failed[0].read_text(encoding="utf-8") if failed else None


def _wait_for_shards(folder: Path, shards: list[Shard], minutes: float) -> None:
    _wait(folder, lambda: not [s for s in shards if not _done(folder, s)], minutes,
          lambda: f"shard(s) {[s.index for s in shards if not _done(folder, s)][:5]} from the other processes")


def _wait_for(path: Path, folder: Path, minutes: float) -> None:
    _wait(folder, path.is_file, minutes, lambda: f"{path.name} from process 0")


def _wait(folder: Path, finished, minutes: float, what) -> None:
    """Watch the folder until `finished()`, a failure marker appears (raised), or no shard has been added for
    `minutes` (a process died without a word, or the folder is not shared)."""
    last_count, last_progress = -1, time.monotonic()
    while not finished():
        _raise_failure(folder)
        count = len(list(folder.glob("shard-*.arrow")))
        if count != last_count:
            last_count, last_progress = count, time.monotonic()
        elif time.monotonic() - last_progress > minutes * 60:
            raise ConfigError(f"{folder}: no new shard for {minutes:g} min while waiting for {what()}: a process of "
                              "the launch may have died (see its log); is data.cache_dir on a filesystem every "
                              "process sees? (else run `retromae prepare` on each machine first)")
        time.sleep(1.0)


def _raise_failure(folder: Path, failure: str | None = None) -> None:
    failure = failure or _failure(folder)
    if failure:
        kind, _, message = failure.partition(": ")
        if kind == "CorpusError":
            raise CorpusError(message)
        raise ConfigError(message if kind == "ConfigError" else f"data preparation failed: {failure}")


def _finish(folder: Path, shards: list[Shard], cfg: DataConfig, tokenizer, seconds: float) -> None:
    """Sum the shards' token counts and write meta.json (its presence says the cache is complete)."""
    counts = np.zeros(len(tokenizer) + 1, dtype=np.int64)
    for s in shards:
        part = folder / f".shard-{s.index:05d}.counts.npy"
        if part.is_file():
            counts += np.load(part)
    store = open_store(folder, check=False)
    if len(store) == 0:
        raise CorpusError(f"{', '.join(cfg.corpus)}: the corpus gave no examples (is it empty?)")
    tmp = folder / ".token_counts.tmp.npy"
    np.save(tmp, counts)
    os.replace(tmp, folder / "token_counts.npy")
    meta = {"examples": len(store), "tokens": int(counts.sum()), "shards": len(shards), "seconds": round(seconds, 1),
            "fingerprint": folder.name, "data": asdict(cfg), "tokenizer": tokenizer.name_or_path}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
    for s in shards:
        (folder / f".shard-{s.index:05d}.counts.npy").unlink(missing_ok=True)


def open_store(folder: Path, check: bool = True):
    """The cache as one memory-mapped `datasets.Dataset` (its shards concatenated in order)."""
    import datasets

    if check and not (folder / "meta.json").is_file():
        raise ConfigError(f"{folder}: the example cache is incomplete (no meta.json); run `retromae prepare`")
    parts = sorted(folder.glob("shard-*.arrow"))
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in parts])


def corpus_statistics(cfg: DataConfig, tokenizer) -> tuple[np.ndarray, int]:
    """(token id -> corpus frequency, total tokens) of a prepared cache."""
    folder = cache_folder(cfg, tokenizer)
    counts = np.load(folder / "token_counts.npy")
    return counts, int(counts.sum())


def build_example_store(cfg: DataConfig, tokenizer):
    """The corpus's examples as a memory-mapped `datasets.Dataset`, prepared here if the cache lacks them."""
    return prepare_store(cfg, tokenizer)
