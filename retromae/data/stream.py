"""Streamed pretraining data: corpora too large (or too changing) to prepare a cache for, tokenized on the fly.

How it scales to many processes and resumes without re-reading:
- the corpus is cut into shards as for the cache (`retromae.data.store.plan_shards`: byte ranges of files, or
  the shards of a streamed Hugging Face dataset), and process r reads only shards r, r + N, ... (its share),
  in an order reshuffled every epoch;
- within a process, DataLoader workers tokenize: worker w of W reads every W-th of the process's shards, so
  tokenization runs beside the training step, in parallel;
- a worker reads `data.shuffle_chunk` raw lines (rows) at a time, tokenizes and cuts them, shuffles the chunk's
  examples (seeded) and cuts batches from them. After every batch it reports its cursor: epoch, shard, where the
  chunk starts (byte offset and line number, or row) and how many of its examples were used;
- the trainer keeps the latest cursor of every worker in the checkpoint (`data_position_<process>.json`); on
  resume each worker seeks straight to its chunk (files: a seek; streamed Hugging Face shards: rows skipped
  without tokenizing) and re-tokenizes only that one chunk.
Shuffling is therefore within a chunk, across workers and across shard order; neighbouring blocks of one document
can share a batch, which is why every example carries its document id and the contrastive objectives leave
same-document pairs out of their negatives. A streamed run does not equal a run with another number of
processes (each reads other shards); cached data does (`retromae.data.batches.StoreBatches`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from retromae.config import ConfigError
from retromae.data.batches import Position, collate
from retromae.data.corpus import lines_with_offsets, open_hf, read_hf, read_rows
from retromae.data.examples import DataConfig, ExampleBuilder
from retromae.rng import mix32_int


@dataclass(frozen=True)
class Cursor:
    """Where one worker is: the chunk it is cutting batches from."""

    epoch: int = 0
    slot: int = 0  # position in the worker's (epoch-shuffled) shard list
    offset: int = -1  # chunk start: byte offset (files) or row (Hugging Face); -1: the shard's start
    line: int = 1  # line number at `offset` (files)
    used: int = 0  # examples of the chunk already in batches


def stream_shards(cfg: DataConfig, pieces: int):
    """The corpus's shards for streaming: at least `pieces` of them (processes x workers), so that every worker has
    something to read; streamed Hugging Face datasets contribute their own shards."""
    from retromae.data.corpus import detect_format
    from retromae.data.store import Shard, file_ranges

    files = [s for s in cfg.corpus if (detect_format(s) if cfg.format == "auto" else cfg.format) != "hf"]
    total = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    target = max(1 << 16, min(cfg.shard_mb << 20, total // max(1, 4 * pieces) or 1))
    shards = []
    for source in cfg.corpus:
        kind = detect_format(source) if cfg.format == "auto" else cfg.format
        if kind == "hf":
            n = getattr(open_hf(source, cfg.hf_config, cfg.hf_split, streaming=True), "n_shards", 1) or 1
            shards += [Shard(len(shards) + i, source, kind, i, n) for i in range(n)]  # start: shard i of end: n
        elif source.endswith(".gz"):
            shards.append(Shard(len(shards), source, kind))
        else:
            shards += [Shard(len(shards) + i, source, kind, a, b, line)
                       for i, (a, b, line) in enumerate(file_ranges(source, target))]
    return shards


class _Chunks:
    """Reads one shard chunk by chunk from a cursor: (chunk start, rows of the chunk, start of the next chunk)."""

    def __init__(self, shard, cfg: DataConfig):
        self.shard, self.cfg = shard, cfg

    def __call__(self, offset: int, line: int) -> Iterator[tuple[int, int, list, int, int]]:
        """(offset, line, rows, next offset, next line) per chunk, from (`offset`, `line`)."""
        shard, cfg, size = self.shard, self.cfg, self.cfg.shuffle_chunk
        fields = cfg.text_fields()
        if shard.kind == "hf":
            rows = open_hf(shard.source, cfg.hf_config, cfg.hf_split, streaming=True)
            if getattr(rows, "n_shards", 1) > 1:
                rows = rows.shard(num_shards=shard.end, index=shard.start)
            offset = max(offset, 0)
            records = iter(rows.skip(offset) if offset else rows)  # skipped rows are read, not tokenized
            while True:
                block = [r for _, r in zip(range(size), records)]
                if not block:
                    return
                parsed = list(read_hf(shard.source, fields, None, "", rows=block, first_row=offset))
                yield offset, 0, parsed, offset + len(block), 0
                offset += len(block)
        else:
            start = shard.start if offset < 0 else offset
            line = shard.first_line if offset < 0 else line
            reader = lines_with_offsets(shard.source, start, shard.end, line)
            while True:
                block = [item for _, item in zip(range(size), reader)]
                if not block:
                    return
                lines = [(number, text) for number, text, _ in block]
                rows = list(read_rows(shard.source, shard.kind, fields, lines=iter(lines)))
                end = block[-1][2]
                yield start, line, rows, end, block[-1][0] + 1
                start, line = end, block[-1][0] + 1


class _WorkerStream(torch.utils.data.IterableDataset):
    """The batches of one process: each DataLoader worker cuts batches from its own shards (see the module
    docstring); every batch carries its worker's cursor after it."""

    def __init__(self, owner: "StreamBatches", cursors: list[Cursor], rotation: int):
        self.owner, self.cursors, self.rotation = owner, cursors, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers in turn, starting with worker 0; a resumed stream must go
        # on with the worker whose turn it was, so worker ids are rotated by the batches already taken.
        worker = (physical + self.rotation) % workers
        return self.owner._worker_batches(worker, workers, self.cursors[worker])


class StreamBatches:
    """Batches from a streamed corpus (see the module docstring). A stream has no known length: set
    train.max_steps. `iterate(position)` yields (batch, position after it), as `StoreBatches` does."""

    batches_per_epoch = None

    def __init__(self, cfg: DataConfig, tokenizer, batch_size: int, num_processes: int, process_index: int,
                 seed: int, pad_id: int, pad_to_multiple_of: int = 8, num_workers: int = 0):
        self.cfg, self.tokenizer, self.batch_size, self.seed = cfg, tokenizer, batch_size, seed
        self.pad_id, self.multiple, self.num_workers = pad_id, pad_to_multiple_of, num_workers
        self.process_index = process_index
        shards = stream_shards(cfg, num_processes * max(1, num_workers))
        self.shards = shards[process_index::num_processes]
        if len(self.shards) < max(1, num_workers):
            raise ConfigError(
                f"the streamed corpus has {len(shards)} shard(s) for {num_processes} process(es) x "
                f"{max(1, num_workers)} worker(s); give more files, lower data.num_workers, or prepare a cache "
                "(data.streaming: false)"
            )

    def _order(self, epoch: int, worker: int, workers: int) -> list:
        """This worker's shards for `epoch`: the process's shards reshuffled per epoch, every `workers`-th."""
        order = list(self.shards)
        random.Random(mix32_int(mix32_int(self.seed) ^ mix32_int(epoch + 7919 * self.process_index))).shuffle(order)
        return order[worker::workers]

    def _worker_batches(self, worker: int, workers: int, cursor: Cursor) -> Iterator[dict]:
        pending: list = []  # examples of the chunk in hand, after the shuffle
        while True:
            produced = False
            shards = self._order(cursor.epoch, worker, workers)
            for slot in range(cursor.slot, len(shards)):
                shard = shards[slot]
                offset, line = (cursor.offset, cursor.line) if slot == cursor.slot else (-1, 1)
                skip = cursor.used if slot == cursor.slot else 0
                for start, start_line, rows, _, _ in _Chunks(shard, self.cfg)(offset, line):
                    examples = self._chunk_examples(shard, start, rows, cursor.epoch)
                    pending = examples[skip:]
                    used, skip = skip, 0
                    while len(pending) >= self.batch_size:
                        take, pending = pending[: self.batch_size], pending[self.batch_size :]
                        used += len(take)
                        cursor = Cursor(cursor.epoch, slot, start, start_line, used)
                        produced = True
                        yield self._collate(take, cursor, worker)
                    # the examples left over (fewer than a batch) are dropped: chunks stay independent, which is
                    # what lets a worker resume from a chunk start
                cursor = replace(cursor, offset=-1, line=1, used=0)
            if not produced:
                raise ConfigError(f"stream worker {worker}: a whole pass over its shards gave no batch of "
                                  f"{self.batch_size}; raise data.shuffle_chunk (rows per chunk) or lower "
                                  "train.per_device_batch_size")
            cursor = Cursor(cursor.epoch + 1)

    def _chunk_examples(self, shard, start: int, rows: list, epoch: int) -> list:
        """A chunk's examples, each with a seed counter, shuffled by (run seed, epoch, shard, chunk start)."""
        first_doc = (shard.index << 40) | (max(start, 0) & ((1 << 40) - 1))
        builder = ExampleBuilder(self.tokenizer, self.cfg, first_doc=first_doc)
        examples = list(builder.examples(iter(rows), self.cfg.joins(shard.source)))
        key = mix32_int(mix32_int(self.seed) ^ mix32_int(epoch) ^ mix32_int(shard.index) ^ mix32_int(start & 0xFFFFFFFF))
        tagged = [(e, (first_doc * 131 + i) & 0x7FFFFFFFFFFF) for i, e in enumerate(examples)]
        random.Random(key).shuffle(tagged)
        return tagged

    def _collate(self, tagged: list, cursor: Cursor, worker: int) -> dict:
        examples = [e for e, _ in tagged]
        sentences = [e.sentence_lengths for e in examples] if self.cfg.cut == "document" else None
        batch = collate([e.input_ids for e in examples], [c for _, c in tagged], cursor.epoch, self.seed, self.pad_id,
                        self.multiple, [e.doc for e in examples], sentences)
        batch["stream_cursor"] = torch.tensor([worker, cursor.epoch, cursor.slot, cursor.offset, cursor.line,
                                               cursor.used], dtype=torch.long)
        return batch

    def iterate(self, start: Position) -> Iterator[tuple[dict, Position]]:
        workers = max(1, self.num_workers)
        cursors = [Cursor(**c) for c in start.cursors] if start.cursors else [Cursor() for _ in range(workers)]
        if len(cursors) != workers:
            raise ConfigError(f"the checkpoint's data position has {len(cursors)} stream worker(s); resume with "
                              f"data.num_workers={len(cursors) if len(cursors) > 1 else 0}")
        loader = torch.utils.data.DataLoader(_WorkerStream(self, cursors, start.offset % workers), batch_size=None,
                                             num_workers=self.num_workers, generator=torch.Generator(),
                                             pin_memory=torch.cuda.is_available())
        taken = start.offset
        for batch in loader:
            w, epoch, slot, offset, line, used = batch.pop("stream_cursor").tolist()
            cursors[w] = Cursor(epoch, slot, offset, line, used)
            taken += 1
            yield batch, Position(min(c.epoch for c in cursors), taken,
                                  [c.__dict__.copy() for c in cursors])


def read_position(folder: str | Path, process_index: int) -> dict | None:
    path = Path(folder) / f"data_position_{process_index}.json"
    if not path.is_file():
        return None
    import json

    return json.loads(path.read_text(encoding="utf-8"))
