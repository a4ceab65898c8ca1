"""Scratch space for the vector shards of `evaluate` and `mine`: where it is, whether it is big enough, and files
that really hold their space.

At MS MARCO's size the fp32 shards take ~27 GB (8.8M passages x 768) plus ~1.5 GB per 500k queries, more than a
system temporary folder often has. A memory-mapped file created by seeking is sparse: on a full disk the first
write to a page that has no block raises SIGBUS and the process dies without a message (exit 135). So:
- the folder defaults to one beside the output (`--output`, the study's output_dir), which is where a user has made
  room, and `--work-dir` / `search.work_dir` / `$RETROMAE_WORK` choose another (several machines need one they all
  see); the system temporary folder is the last resort;
- before writing, the free space is compared with what the launch will write, and a shortfall stops the run with
  the size needed;
- every shard file is allocated for real (`posix_fallocate`) before it is written, and written with positioned writes
  rather than through a mapping (`ShardWriter`): a disk filled by someone else in the meantime gives an error, not
  SIGBUS, and the shard's pages are page cache, not the writing process's memory;
- shards may be written in fp16 (half the space; scores then carry fp16's rounding of the vectors, ~1e-3 relative).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from retromae.config import ConfigError

logger = logging.getLogger(__name__)

SHARD_DTYPES = {"float32": np.float32, "float16": np.float16}
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def shard_dtype(name: str):
    if name not in SHARD_DTYPES:
        raise ConfigError(f"shard_dtype={name!r} must be float32 or float16", key="shard_dtype")
    return SHARD_DTYPES[name]


def scratch_root(work_dir: str | None, output: str | None) -> Path | None:
    """Where the scratch folder goes: `work_dir`, else $RETROMAE_WORK, else the output's folder, else None (the
    system's temporary folder)."""
    chosen = work_dir or os.environ.get("RETROMAE_WORK")
    if chosen:
        return Path(chosen)
    if output:
        return Path(output).resolve().parent
    return None


def make_scratch(root: Path | None, prefix: str) -> Path:
    """A fresh folder under `root` (made if missing), named `.PREFIXXXXX.tmp` as every temporary of a run folder is,
    so that what a killed run leaves there is removed when the folder is next used; or one in the system's
    temporary folder."""
    if root is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{prefix}", suffix=".tmp", dir=str(root)))


def check_space(folder: Path, needed: int, what: str) -> None:
    """Stop with the sizes if `folder`'s filesystem has less than `needed` bytes free (and 1% to spare)."""
    free = shutil.disk_usage(folder).free
    if free < needed * 1.01:
        raise ConfigError(f"{folder}: {what} needs {_size(needed)} of scratch space and its filesystem has {_size(free)} "
                          "free; free some space, choose a larger folder (--work-dir, search.work_dir or "
                          "$RETROMAE_WORK), or write fp16 shards (--shard-dtype float16: half the size)")


class ShardWriter:
    """A .npy file of vectors written with positioned writes: `writer[rows] = vectors` as into an array. Written
    through a memory mapping, every page of the shard stayed in the writing process's resident memory until the
    mapping was closed (3.4 GB per process for MS MARCO's 768-dim shards); written with pwrite, they are page
    cache, which the kernel writes back and drops as it needs."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype, offset: int):
        self.path, self.shape, self.dtype, self.offset = path, shape, np.dtype(dtype), offset
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.handle = open(path, "r+b")  # noqa: SIM115 (closed by flush, as a memmap is by del)

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, rows, values) -> None:
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.size * self.dtype.itemsize != len(rows) * self.row_bytes:  # a reshape would spill into other rows
            raise ValueError(f"{self.path}: {values.shape} values for {len(rows)} rows of {self.shape[1:]}")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: rows {rows.min()}..{rows.max()} outside 0..{len(self) - 1}")
        values = values.reshape(len(rows), -1)
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive rows: one write each
        for run_rows, run_values in zip(np.split(rows, breaks), np.split(values, breaks)):
            if len(run_rows):
                os.pwrite(self.handle.fileno(), run_values.tobytes(), self.offset + int(run_rows[0]) * self.row_bytes)

    def flush(self) -> None:
        if not self.handle.closed:
            self.handle.close()


def allocate_array(path: str | Path, shape: tuple[int, ...], dtype=np.float32) -> ShardWriter:
    """A .npy file of `shape` whose blocks are allocated on disk before anything is written (see the module
    docstring), opened for positioned writes; a filesystem without room gives a ConfigError naming the file and
    the size."""
    path = Path(path)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # the header, a sparse file
    offset = array.offset
    del array
    size = path.stat().st_size
    try:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, size)
    except OSError as err:
        if err.errno in NO_SPACE:
            path.unlink(missing_ok=True)
            free = shutil.disk_usage(path.parent).free
            raise ConfigError(f"{path}: no room for {_size(size)} of vectors ({_size(free)} free on its filesystem); "
                              "free some space, choose a larger folder (--work-dir, search.work_dir or "
                              "$RETROMAE_WORK), or write fp16 shards (--shard-dtype float16)") from None
        logger.debug("%s: posix_fallocate not supported here (%s); the file stays sparse", path, err)
    return ShardWriter(path, shape, dtype, offset)


def _size(count: float) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"
