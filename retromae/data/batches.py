"""Micro-batches for each process, in an order fixed by (seed, epoch), with a position that can be resumed.

The run is a sequence of *global* batches (per-device batch x processes). Process r takes slice r of every
global batch, so the union of what all processes see at a step is exactly what one process holding the
global batch would see. Each example carries a seed made from (run seed, epoch, example index): masks built
from it do not depend on the number of processes, on padding, or on an interruption.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from retromae.config import ConfigError
from retromae.rng import example_seeds, mix32, to_int32


@dataclass
class Position:
    """Where the data stream is: `offset` global batches into `epoch`; a streamed corpus also keeps each of the
    process's stream workers' cursor (retromae.data.stream)."""

    epoch: int = 0
    offset: int = 0
    cursors: list | None = None


def collate(examples: list[list[int]], indices: list[int], epoch: int, seed: int, pad_id: int, multiple: int,
            docs: list[int] | None = None, sentence_lengths: list[list[int]] | None = None) -> dict:
    """A padded micro-batch: input_ids, attention_mask, per-example seeds; `doc` (each example's document, so that
    contrastive losses can leave out negatives from the same document); `sentence_ids` (the sentence of each token,
    -1 at padding) for whole-document examples."""
    lengths = torch.tensor([len(e) for e in examples])
    longest = int(lengths.max())
    if multiple > 1:
        longest = -(-longest // multiple) * multiple
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    for row, ids in enumerate(examples):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": (torch.arange(longest)[None, :] < lengths[:, None]).long(),
        "seeds": example_seeds(seed, epoch, torch.as_tensor(indices, dtype=torch.long)),
        "doc": torch.as_tensor(docs if docs is not None else indices, dtype=torch.long),
    }
    if sentence_lengths is not None:
        sentence_ids = torch.full((len(examples), longest), -1, dtype=torch.long)
        for row, sizes in enumerate(sentence_lengths):
            sentence = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes, dtype=torch.long))
            sentence_ids[row, : len(sentence)] = sentence
        batch["sentence_ids"] = sentence_ids
    return batch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = int(mix32(mix32(to_int32(seed)) ^ to_int32(epoch + 0x5EED)).item()) & 0xFFFFFFFF
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))


class TokenBatch:
    """Collates the pretraining examples of a store (one Arrow read per batch); picklable for DataLoader workers."""

    def __init__(self, store, seed: int, pad_id: int, multiple: int):
        self.store, self.seed, self.pad_id, self.multiple = store, seed, pad_id, multiple

    def __call__(self, indices: list[int], epoch: int) -> dict:
        rows = self.store[indices]
        return collate(rows["input_ids"], indices, epoch, self.seed, self.pad_id, self.multiple, rows.get("doc"),
                       rows.get("sentence_lengths"))


class _IndexedStore(torch.utils.data.Dataset):
    """Maps (epoch, example indices) to one micro-batch."""

    def __init__(self, size: int, make_batch):
        self.size, self.make_batch = size, make_batch

    def __len__(self):
        return self.size

    def __getitem__(self, item: tuple[int, list[int]]) -> dict:
        epoch, indices = item
        return self.make_batch(indices, epoch)


class _SliceSampler(torch.utils.data.Sampler):
    def __init__(self, batches: "StoreBatches", start: Position):
        self.batches, self.start = batches, start

    def __iter__(self):
        b = self.batches
        epoch, offset = self.start.epoch, self.start.offset
        while True:
            order = epoch_permutation(b.size, b.seed, epoch)
            for g in range(offset, b.per_epoch):
                first = g * b.global_batch + b.process_index * b.batch_size
                yield epoch, order[first : first + b.batch_size].tolist()
            epoch, offset = epoch + 1, 0


class StoreBatches:
    """Batches from a map-style example store; epochs are reshuffled permutations, the last partial global batch
    is dropped so every process always holds the same number of examples.

    `make_batch(indices, epoch)` builds one micro-batch from example indices (default: pretraining examples of a
    `datasets.Dataset` with an `input_ids` column, padded, with per-example seeds)."""

    def __init__(self, store, batch_size: int, num_processes: int, process_index: int, seed: int, pad_id: int = 0,
                 pad_to_multiple_of: int = 8, num_workers: int = 0, make_batch=None):
        self.size, self.batch_size, self.seed = len(store), batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.global_batch = batch_size * num_processes
        self.per_epoch = self.size // self.global_batch
        if self.per_epoch == 0:
            raise ConfigError(
                f"the data has {self.size} examples, fewer than one global batch "
                f"({batch_size} per device x {num_processes} processes); lower train.per_device_batch_size"
            )
        self.make_batch = make_batch or TokenBatch(store, seed, pad_id, pad_to_multiple_of)
        self.num_workers = num_workers

    @property
    def batches_per_epoch(self) -> int:
        return self.per_epoch

    def iterate(self, start: Position) -> Iterator[tuple[dict, Position]]:
        """Micro-batches from `start` on, forever, each with the position just after it."""
        loader = torch.utils.data.DataLoader(
            _IndexedStore(self.size, self.make_batch),
            sampler=_SliceSampler(self, start),
            batch_size=None,
            num_workers=self.num_workers,
            # Its own generator: creating the iterator must not draw from the global RNG, which drives dropout
            # and is restored exactly on resume.
            generator=torch.Generator(),
            pin_memory=torch.cuda.is_available(),  # lets the trainer's copies to the GPU run asynchronously
        )
        epoch, offset = start.epoch, start.offset
        for batch in loader:
            offset += 1
            if offset == self.per_epoch:
                epoch, offset = epoch + 1, 0
            yield batch, Position(epoch, offset)
