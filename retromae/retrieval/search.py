"""Search a corpus shard, and merge the shards' results: how evaluation and mining spread search over processes.

Every process of a launch encodes its own contiguous share of the corpus (a memory-mapped shard), then searches
*all* the queries against *its* shard and writes the top-k (scores, global positions); the shards' results are then
merged into the exact top-k of the whole corpus (`merge_top_k`). Every process does the same amount of work, so none
waits long in a barrier, and none holds more than its share of the vectors. The queries may be given as several
blocks (the memory-mapped query shards of a launch): they are searched one block at a time, never concatenated.

Backends for a shard, chosen by `SearchConfig.backend`:
- `faiss`: any factory string (Flat = exact inner product, IVF..., HNSW...), on the CPU, or on the process's own
  GPU under a launch (on every GPU when the process is alone) when faiss has GPU support (not HNSW, which faiss
  cannot run on GPUs). On the CPU an exact (Flat) search reads the memory-mapped shard a chunk at a time and merges
  the chunks' top-k exactly: the shard is never copied into an index;
- `torch`: exact inner product as matrix products and top-k over corpus chunks, on every GPU the process may use
  (fp32 on the CPU), merged exactly: GPU search where no faiss-gpu build matches the machine's CUDA (faiss-gpu
  wheels are CUDA 12 builds of 50-135 MB). On GPUs the chunks are scored in fp16 to find candidates (the top k plus
  a margin) and the candidates are scored again in fp32, with a bound on the fp16 error that proves no other passage
  can enter the top k; a query whose proof fails is searched in fp32. Scores and ranking are fp32-exact: for
  dot-product models (RetroMAE, tau = 1) scores are ~150-250, where fp16 steps are 0.125 apart and would tie and
  reorder most top-10 lists;
- `auto` (default): faiss with GPU support if there is one, else torch on GPUs, else faiss on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Iterator

import numpy as np
import torch

from retromae.config import ConfigError

logger = logging.getLogger(__name__)

# rows of a memory-mapped shard read (and searched) at a time on the CPU: ~100 MB of 768-dim fp32 vectors
CPU_CHUNK_ROWS = 1 << 15


def merge_top_k(scores: list[np.ndarray], positions: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of several (Q, k_i) result blocks, per query: scores descending, ties by position (ascending),
    so that the merge does not depend on how the corpus was split. Positions < 0 (padding) come last."""
    all_scores = np.concatenate(scores, axis=1)
    all_positions = np.concatenate(positions, axis=1)
    all_scores = np.where(all_positions < 0, -np.inf, all_scores)
    order = np.lexsort((all_positions, -all_scores), axis=-1)[:, :k]
    return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_positions, order, 1)


def read_rows(vectors: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """vectors[lo:hi] as a contiguous fp32 array. From a memory-mapped .npy file the rows are read with a plain file
    read: pages touched through the mapping would stay in this process's resident memory (as its own pages when no
    other process maps them) until the array is closed, a whole shard's worth by the end of a search."""
    if isinstance(vectors, np.memmap) and isinstance(vectors.base, mmap.mmap) and vectors.flags.c_contiguous:
        hi = min(hi, len(vectors))
        row = int(np.prod(vectors.shape[1:], dtype=np.int64)) if vectors.ndim > 1 else 1
        rows = np.fromfile(vectors.filename, dtype=vectors.dtype, count=max(0, hi - lo) * row,
                           offset=vectors.offset + lo * row * vectors.dtype.itemsize)
        return np.ascontiguousarray(rows.reshape((max(0, hi - lo), *vectors.shape[1:])), dtype=np.float32)
    return np.ascontiguousarray(vectors[lo:hi], dtype=np.float32)


def query_blocks(queries, rows: int = 1024) -> Iterator[np.ndarray]:
    """Blocks of at most `rows` fp32 query vectors, read in turn from one array or a list of arrays (memory-mapped
    shards: only one block is in memory at a time)."""
    for part in queries if isinstance(queries, (list, tuple)) else [queries]:
        for start in range(0, len(part), rows):
            yield read_rows(part, start, start + rows)


def count_queries(queries) -> int:
    return sum(len(p) for p in queries) if isinstance(queries, (list, tuple)) else len(queries)


def torch_devices(device) -> list[torch.device]:
    """The devices the torch backend spreads a shard over: every visible GPU when this process is alone on the
    machine, else its own device."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return [device]
    from retromae.distributed import world

    if world()[1] == 1 and device.index in (None, 0):
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def approximation_bound(dtype: torch.dtype, dimension: int) -> float:
    """c such that |half-precision score - exact score| <= c * |q| * |d| for vectors rounded to `dtype` and
    products accumulated in fp32 (reduced-precision reductions are turned off while searching): the rounding of
    both operands (2u + u^2, summed over coordinates and bounded by Cauchy-Schwarz), fp32 accumulation over
    `dimension` terms (D * 2^-24) and the rounding of the result to `dtype` (u), with a factor 2 of safety."""
    u = unit_roundoff(dtype)
    return 2.0 * (3 * u + u * u + dimension * 2.0**-24)


@contextlib.contextmanager
def _full_precision_reductions():
    """cuBLAS may accumulate fp16/bf16 products in reduced precision (split-K in fp16) unless told not to; the
    error bound above assumes fp32 accumulation."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_fp16_reduced_precision_reduction = matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = saved


class TorchExact:
    """Exact inner-product search with torch: the shard's vectors split over `devices`, each query block scored
    against each chunk, the per-chunk top-k merged exactly.

    `dtype` (default: fp16 on GPUs, fp32 elsewhere) is the precision of the first pass. Below fp32 every chunk is
    kept twice on its device (6 bytes a coordinate): in `dtype` to score all passages fast, in fp32 to score again
    the top `k + margin` candidates, which are then exact (see the module docstring for the proof of the rest)."""

    def __init__(self, vectors: np.ndarray, devices: list[torch.device], dtype: torch.dtype | None = None,
                 chunk_rows: int = 1 << 20, margin: int | None = None):
        self.devices, self.chunk_rows, self.margin = devices, chunk_rows, margin
        self.dtype = dtype or (torch.float16 if devices[0].type == "cuda" else torch.float32)
        self.exact = self.dtype == torch.float32
        self.bound = approximation_bound(self.dtype, vectors.shape[1])
        # (first position, fp32 chunk, chunk in self.dtype or None, the chunk's largest vector norm)
        self.chunks: list[tuple[int, torch.Tensor, torch.Tensor | None, float]] = []
        self.fallbacks = 0  # (query, chunk) pairs searched again in fp32 because the bound could not prove them
        n = len(vectors)
        bounds = [n * i // len(devices) for i in range(len(devices) + 1)]
        for device, lo, hi in zip(devices, bounds, bounds[1:]):
            for start in range(lo, hi, chunk_rows):  # copied a chunk at a time: memory-mapped shards stay on disk
                stop = min(hi, start + chunk_rows)
                full = torch.from_numpy(read_rows(vectors, start, stop)).to(device)
                low = None if self.exact else full.to(self.dtype)
                self.chunks.append((start, full, low, float(full.norm(dim=1).max()) if len(full) else 0.0))

    def __len__(self) -> int:
        return sum(len(full) for _, full, _, _ in self.chunks)

    @torch.inference_mode()
    def search(self, queries, k: int, query_batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the top-k of every query (an array, or a list of arrays searched in turn)."""
        k = min(k, len(self))
        total = count_queries(queries)
        out_scores = np.empty((total, k), dtype=np.float32)
        out_positions = np.empty((total, k), dtype=np.int64)
        done = 0
        with _full_precision_reductions():
            for block in query_blocks(queries, query_batch):
                scores, positions = self._search_block(block, k)
                out_scores[done : done + len(block)], out_positions[done : done + len(block)] = scores, positions
                done += len(block)
        return out_scores, out_positions

    def _search_block(self, block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found = [self._chunk_candidates(block, k, chunk) for chunk in self.chunks]
        scores, positions = merge_top_k([s for s, _, _ in found], [p for _, p, _ in found], k)
        if self.exact:
            return scores, positions
        # proof: a passage of chunk c that is not a candidate scores at most (the chunk's lowest candidate by the
        # first pass) + (the error bound); if that is below the k-th exact score found, it cannot be in the top k
        kth = scores[:, k - 1]
        redo = False
        for i, (chunk, (s, p, ceiling)) in enumerate(zip(self.chunks, found)):
            unproven = ~(ceiling < kth)
            if unproven.any():
                redo = True
                self.fallbacks += int(unproven.sum())
                exact_s, exact_p = self._chunk_exact(block[unproven], k, chunk)
                s, p = s.copy(), p.copy()
                s[unproven], p[unproven] = -np.inf, -1
                found[i] = (np.concatenate([s, _pad(exact_s, unproven, -np.inf)], 1),
                            np.concatenate([p, _pad(exact_p, unproven, -1)], 1), ceiling)
        if redo:
            scores, positions = merge_top_k([s for s, _, _ in found], [p for _, p, _ in found], k)
        return scores, positions

    def _chunk_candidates(self, block: np.ndarray, k: int, chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, positions, ceiling) of the chunk's candidates for every query of the block: its exact top k
        (fp32 chunks), or its top k + margin by the first pass scored again in fp32, and the highest score a
        passage left out can have (-inf when none is left out)."""
        lo, full, low, largest = chunk
        q32 = torch.from_numpy(block).to(full.device)
        if self.exact:
            top = (q32 @ full.T).topk(min(k, len(full)), dim=1)
            ceiling = np.full(len(block), -np.inf)
            return top.values.cpu().numpy(), (top.indices + lo).cpu().numpy(), ceiling
        approximate = q32.to(self.dtype) @ low.T  # kept in half precision: a (block x chunk) fp32 copy is 4 GB
        wanted = min(len(full), k + (self.margin if self.margin is not None else max(64, k // 4)))
        top = approximate.topk(wanted, dim=1)
        exact = _rescore(q32, full, top.indices)
        if wanted < len(full):
            error = self.bound * q32.norm(dim=1) * largest
            ceiling = top.values[:, -1].float() + error
            ceiling = torch.where(torch.isfinite(approximate).all(dim=1), ceiling, torch.inf)  # fp16 overflowed
        else:
            ceiling = torch.full((len(block),), -torch.inf, device=full.device)
        return exact.cpu().numpy(), (top.indices + lo).cpu().numpy(), ceiling.double().cpu().numpy()

    def _chunk_exact(self, block: np.ndarray, k: int, chunk) -> tuple[np.ndarray, np.ndarray]:
        lo, full, _, _ = chunk
        top = (torch.from_numpy(block).to(full.device) @ full.T).topk(min(k, len(full)), dim=1)
        return top.values.cpu().numpy(), (top.indices + lo).cpu().numpy()


def _rescore(queries: torch.Tensor, vectors: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """fp32 scores of each query's candidate rows, a few queries at a time (the gathered rows of a whole block
    would take Q x candidates x D x 4 bytes)."""
    per_step = max(1, (1 << 26) // max(1, candidates.shape[1] * vectors.shape[1]))
    parts = []
    for start in range(0, len(queries), per_step):
        rows = vectors[candidates[start : start + per_step]]  # (q, candidates, D)
        parts.append(torch.bmm(rows, queries[start : start + per_step, :, None])[:, :, 0])
    return torch.cat(parts)


def _pad(values: np.ndarray, rows: np.ndarray, fill) -> np.ndarray:
    """`values` (one row per True in `rows`) spread over all the rows, `fill` elsewhere."""
    out = np.full((len(rows), values.shape[1]), fill, dtype=values.dtype)
    out[rows] = values
    return out


def faiss_has_gpus() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def choose_backend(backend: str, factory: str, device) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if backend not in ("auto", "faiss", "torch"):
        raise ConfigError(f"search backend {backend!r} must be auto, faiss or torch")
    if backend == "torch" and factory != "Flat":
        raise ConfigError(f"the torch search backend is exact inner product only; index {factory!r} needs faiss")
    if backend != "auto":
        return backend
    if device.type == "cuda" and factory == "Flat" and not faiss_has_gpus():
        return "torch"
    return "faiss"


def search_chunked_flat(queries, vectors: np.ndarray, k: int, chunk_rows: int = CPU_CHUNK_ROWS,
                        query_batch: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k on the CPU, a chunk of the (memory-mapped) shard at a time: each chunk goes into a
    small faiss Flat index, is searched by every query block, and its top-k is merged into the running one. Only
    one chunk (and the results) is in memory, never a copy of the shard."""
    import faiss

    k = min(k, len(vectors))
    total = count_queries(queries)
    best_scores = np.full((total, k), -np.inf, dtype=np.float32)
    best_positions = np.full((total, k), -1, dtype=np.int64)
    index = faiss.IndexFlatIP(vectors.shape[1])
    for lo in range(0, len(vectors), chunk_rows):
        index.reset()
        index.add(read_rows(vectors, lo, lo + chunk_rows))
        done = 0
        for block in query_blocks(queries, query_batch):
            scores, positions = index.search(block, min(k, index.ntotal))
            rows = slice(done, done + len(block))
            best_scores[rows], best_positions[rows] = merge_top_k(
                [best_scores[rows], scores], [best_positions[rows], np.where(positions >= 0, positions + lo, -1)], k)
            done += len(block)
    return best_scores, best_positions


def search_shard(queries, vectors: np.ndarray, k: int, factory: str = "Flat", backend: str = "auto",
                 use_gpu="auto", nprobe: int = 32, device=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions in `vectors`) of the top-k of every query, best first. `queries`: an array, or a list of
    arrays (searched in turn, results in order)."""
    if len(vectors) == 0:
        total = count_queries(queries)
        return np.zeros((total, 0), np.float32), np.zeros((total, 0), np.int64)
    if choose_backend(backend, factory, device) == "torch":
        return TorchExact(vectors, torch_devices(device)).search(queries, k)
    from retromae.retrieval.index import DenseIndex, gpu_wanted

    if factory == "Flat" and not gpu_wanted(use_gpu):
        return search_chunked_flat(queries, vectors, k)
    index = DenseIndex(vectors.shape[1], factory, use_gpu, nprobe=nprobe, seed=seed, device=device)
    index.add(vectors)
    return index.search_positions(queries, k)
