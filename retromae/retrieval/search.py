"""Search a corpus shard, and merge the shards' results: how evaluation and mining spread search over processes.

Every process of a launch encodes its own contiguous share of the corpus (a memory-mapped shard), then searches
*all* the queries against *its* shard and writes the top-k (scores, global positions); the shards' results are then
merged into the exact top-k of the whole corpus (`merge_top_k`). Every process does the same amount of work, so none
waits long in a barrier, and none holds more than its share of the vectors.

Backends for a shard, chosen by `SearchConfig.backend`:
- `faiss`: any factory string (Flat = exact inner product, IVF..., HNSW...), on the CPU, or on the process's GPU(s)
  when faiss has GPU support (not HNSW, which faiss cannot run on GPUs);
- `torch`: exact inner product as matrix products and top-k over corpus chunks, in fp16/bf16 on every GPU the
  process may use (fp32 on the CPU), merged exactly: GPU search where no faiss-gpu build matches the machine's CUDA
  (faiss-gpu wheels are CUDA 12 builds of 50-135 MB);
- `auto` (default): faiss with GPU support if there is one, else torch on GPUs, else faiss on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from retromae.config import ConfigError


def merge_top_k(scores: list[np.ndarray], positions: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of several (Q, k_i) result blocks, per query: scores descending, ties by position (ascending),
    so that the merge does not depend on how the corpus was split. Positions < 0 (padding) come last."""
    all_scores = np.concatenate(scores, axis=1)
    all_positions = np.concatenate(positions, axis=1)
    all_scores = np.where(all_positions < 0, -np.inf, all_scores)
    order = np.lexsort((all_positions, -all_scores), axis=-1)[:, :k]
    return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_positions, order, 1)


def torch_devices(device) -> list[torch.device]:
    """The devices the torch backend spreads a shard over: every visible GPU when this process is alone on the
    machine, else its own device."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return [device]
    import torch.distributed as dist

    alone = not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
    if alone and device.index in (None, 0):
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


class TorchExact:
    """Exact inner-product search with torch: the shard's vectors split over `devices` (half precision on GPUs),
    each query block scored against each part in chunks, the per-chunk top-k merged exactly."""

    def __init__(self, vectors: np.ndarray, devices: list[torch.device], dtype: torch.dtype | None = None,
                 chunk_rows: int = 1 << 20):
        self.devices, self.chunk_rows = devices, chunk_rows
        self.dtype = dtype or (torch.float16 if devices[0].type == "cuda" else torch.float32)
        self.parts: list[tuple[int, torch.Tensor]] = []
        n = len(vectors)
        bounds = [n * i // len(devices) for i in range(len(devices) + 1)]
        for device, lo, hi in zip(devices, bounds, bounds[1:]):
            part = torch.empty((hi - lo, vectors.shape[1]), dtype=self.dtype, device=device)
            for start in range(lo, hi, chunk_rows):  # copied a chunk at a time: memory-mapped shards stay on disk
                stop = min(hi, start + chunk_rows)
                part[start - lo : stop - lo] = torch.from_numpy(np.ascontiguousarray(vectors[start:stop])).to(
                    device, self.dtype)
            self.parts.append((lo, part))

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int, query_batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        n = sum(p.shape[0] for _, p in self.parts)
        k = min(k, n)
        out_scores = np.empty((len(queries), k), dtype=np.float32)
        out_positions = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), query_batch):
            block = torch.from_numpy(np.ascontiguousarray(queries[start : start + query_batch], dtype=np.float32))
            found_scores, found_positions = [], []
            for lo, part in self.parts:
                q = block.to(part.device, self.dtype)
                for c in range(0, part.shape[0], self.chunk_rows):
                    chunk = part[c : c + self.chunk_rows]
                    scores = (q @ chunk.T).float()
                    top = scores.topk(min(k, chunk.shape[0]), dim=1)
                    found_scores.append(top.values.cpu().numpy())
                    found_positions.append((top.indices + lo + c).cpu().numpy())
            scores, positions = merge_top_k(found_scores, found_positions, k)
            out_scores[start : start + len(block)], out_positions[start : start + len(block)] = scores, positions
        return out_scores, out_positions


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


def search_shard(queries: np.ndarray, vectors: np.ndarray, k: int, factory: str = "Flat", backend: str = "auto",
                 use_gpu="auto", nprobe: int = 32, device=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions in `vectors`) of the top-k of every query, best first."""
    if len(vectors) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if choose_backend(backend, factory, device) == "torch":
        return TorchExact(vectors, torch_devices(device)).search(queries, k)
    from retromae.retrieval.index import DenseIndex

    index = DenseIndex(vectors.shape[1], factory, use_gpu, nprobe=nprobe, seed=seed)
    index.add(vectors)
    return index.search_positions(queries, k)
