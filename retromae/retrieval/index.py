"""FAISS indexes: exact inner product by default, any factory string on request, on GPUs when faiss has GPU support
(fp16 storage), with the document ids kept beside the index.

Which GPUs: under a launch (several processes) each process uses its own GPU only, the one accelerate gave it. Cloning
every process's index onto every GPU (`index_cpu_to_all_gpus`) would make 8 processes create 64 GPU resource objects
(up to 1.5 GiB of scratch each) and 8 CUDA contexts per GPU. A process alone on a machine shards its index over all
the GPUs. The CPU copy of the vectors is not kept once they are on a GPU (3.4 GB per process at MS MARCO's size): a
Flat index is built on its GPU directly (a single-GPU Flat index takes repeated adds), other indexes are trained and
filled on the CPU, cloned, and the CPU copy emptied (its trained structure stays, for nprobe and saving).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retromae.io import atomic_directory, atomic_write_text

logger = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("searching needs faiss: pip install -e '.[cpu]' (or '.[gpu]' on CUDA machines)") from None
    return faiss


def faiss_gpus() -> int:
    faiss = _faiss()

    if not hasattr(faiss, "index_cpu_to_all_gpus") or not hasattr(faiss, "get_num_gpus"):
        return 0
    return faiss.get_num_gpus()


def gpu_wanted(use_gpu) -> bool:
    """Whether an index with this `use_gpu` setting ("auto", True, False) goes to GPUs."""
    return bool(faiss_gpus()) if use_gpu == "auto" else bool(use_gpu)


def own_gpu(device=None) -> int | None:
    """The one GPU this process may use under a launch (its device's index, else LOCAL_RANK), or None when the
    process is alone and may use them all."""
    import os

    from retromae.distributed import world

    if world()[1] == 1 and os.environ.get("LOCAL_WORLD_SIZE", "1") == "1":
        return None
    index = getattr(device, "index", None) if device is not None and str(device).startswith("cuda") else None
    return int(index if index is not None else os.environ.get("LOCAL_RANK", 0))


class DenseIndex:
    """Vectors (with string ids, or just positions), searched by inner product.

    factory: a faiss index factory string ("Flat" = exact `IndexFlatIP`; "IVF4096,Flat", "HNSW32", "IVF4096,PQ64"
    ... for approximate search). Vectors are queued by reference and the index is built at the first search; an
    index that needs training (IVF, PQ) is trained on a seeded random sample of everything added (not on the first
    rows, which may all come from one part of the corpus); IVF searches `nprobe` lists. use_gpu: "auto" puts the
    index on GPUs when faiss has GPU support (see the module docstring for which): a process alone clones the
    finished index, once, to all GPUs (sharded, fp16 storage: faiss's sharded multi-GPU Flat accepts a single add);
    a process of a launch uses the GPU of `device` (or LOCAL_RANK) only. HNSW stays on the CPU (faiss has no GPU
    HNSW). `cloner` (tests) replaces faiss's multi-GPU cloner.
    """

    def __init__(self, dimension: int, factory: str = "Flat", use_gpu: str | bool = "auto", fp16: bool = True,
                 nprobe: int = 32, seed: int = 0, cloner=None, device=None):
        faiss = _faiss()

        self.dimension, self.factory, self.fp16, self.nprobe, self.seed = dimension, factory, fp16, nprobe, seed
        self.cpu_index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
        self.ids: list[str] | None = []
        self.pending: list[np.ndarray] = []
        self.size = 0
        gpus = faiss_gpus()
        self.on_gpu = bool(gpus) if use_gpu == "auto" else bool(use_gpu)
        if self.on_gpu and not gpus and cloner is None:
            raise RuntimeError("use_gpu=True but this faiss has no GPU support (pip install faiss-gpu-cu12)")
        if self.on_gpu and "HNSW" in factory:
            logger.info("index %s: faiss has no GPU HNSW; it stays on the CPU", factory)
            self.on_gpu = False
        self.cloner = cloner
        self.gpu = own_gpu(device) if self.on_gpu else None  # None: all GPUs
        self.gpu_resources = None
        self.index = None

    def add(self, vectors: np.ndarray, ids: list[str] | None = None) -> None:
        """Queue `vectors` (kept by reference: a memory-mapped shard stays on disk until the index is built)."""
        if ids is not None and len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        if self.index is not None:
            raise RuntimeError("the index has been built (searched); add everything before the first search")
        if ids is None:
            self.ids = None
        elif self.ids is not None:
            self.ids.extend(ids)
        self.pending.append(vectors)
        self.size += len(vectors)

    def _build(self):
        """Train on a sample of everything added and fill the index: a Flat index for one GPU directly on it, any
        other on the CPU, then cloned to the GPU(s) once and the CPU copy emptied."""
        if self.on_gpu and self.gpu is not None and self.factory == "Flat" and self.cpu_index.ntotal == 0:
            self.index = self._fill(self._own_gpu_flat())
            self.pending = []
            return
        if not self.cpu_index.is_trained:
            self._check_trainable(self.size)
            self.cpu_index.train(self._sample())
        self._fill(self.cpu_index)
        self.pending = []
        index = self.cpu_index
        if self.on_gpu:
            index = self._clone_to_gpus()
            self.cpu_index.reset()  # the vectors live on the GPU(s) now; the trained structure stays
        self._set_nprobe(index)
        self.index = index

    def _fill(self, index):
        from retromae.retrieval.search import read_rows

        for vectors in self.pending:
            for start in range(0, len(vectors), 262144):
                index.add(read_rows(vectors, start, start + 262144))
        return index

    def _own_gpu_flat(self):
        faiss = _faiss()
        self.gpu_resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device, config.useFloat16 = self.gpu, self.fp16
        return faiss.GpuIndexFlatIP(self.gpu_resources, self.dimension, config)

    def _clone_to_gpus(self):
        faiss = _faiss()
        if self.gpu is not None:  # one process of a launch: its own GPU
            self.gpu_resources = faiss.StandardGpuResources()
            options = faiss.GpuClonerOptions()
            options.useFloat16 = self.fp16
            return faiss.index_cpu_to_gpu(self.gpu_resources, self.gpu, self.cpu_index, options)
        options = None
        if hasattr(faiss, "GpuMultipleClonerOptions"):
            options = faiss.GpuMultipleClonerOptions()
            options.shard, options.useFloat16 = True, self.fp16
        return (self.cloner or faiss.index_cpu_to_all_gpus)(self.cpu_index, options)

    def _sample(self) -> np.ndarray:
        """A seeded random sample of the added vectors, enough for the index's training (faiss uses 256 per
        centroid at most)."""
        faiss = _faiss()
        try:
            wanted = 256 * faiss.extract_index_ivf(self.cpu_index).nlist
        except RuntimeError:
            wanted = 100_000
        chosen = np.sort(np.random.default_rng(self.seed).permutation(self.size)[: min(self.size, wanted)])
        offsets = np.cumsum([0] + [len(v) for v in self.pending])
        parts = []
        for i, vectors in enumerate(self.pending):
            local = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
            parts.append(np.asarray(vectors[local], dtype=np.float32))
        return np.ascontiguousarray(np.concatenate(parts))

    def _set_nprobe(self, index) -> None:
        faiss = _faiss()
        try:
            faiss.extract_index_ivf(self.cpu_index)
        except RuntimeError:
            return  # not an IVF index
        space = faiss.GpuParameterSpace() if self.on_gpu and hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
        space.set_index_parameter(index, "nprobe", self.nprobe)

    def _live(self):
        if self.index is None:
            self._build()
        return self.index

    def _check_trainable(self, n: int) -> None:
        """An IVF index needs at least one training vector per cluster (faiss asks for 39): say so in one line,
        rather than faiss's C++ exception."""
        faiss = _faiss()
        try:
            clusters = faiss.extract_index_ivf(self.cpu_index).nlist
        except RuntimeError:  # not an IVF index
            return
        if n < clusters:
            from retromae.config import ConfigError

            suggestion = max(1, int(4 * n**0.5)) if n >= 16 else 0
            better = f"IVF{suggestion},Flat (about 4 x sqrt(N) clusters) or Flat" if suggestion else "Flat"
            raise ConfigError(f"index {self.factory!r}: {clusters} clusters need at least {clusters} training vectors "
                              f"(faiss advises {39 * clusters}), and this corpus has {n}; use {better}")

    def __len__(self) -> int:
        return self.size

    def search_positions(self, queries, k: int, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k'), positions (Q, k')) with k' = min(k, size); rows sorted by score, best first. `queries`:
        an array, or a list of arrays (memory-mapped shards) searched in turn."""
        from retromae.retrieval.search import query_blocks

        k = min(k, self.size)
        index = self._live()
        all_scores, all_positions = [], []
        for block in query_blocks(queries, batch):
            scores, positions = index.search(block, k)
            all_scores.append(scores)
            all_positions.append(positions)
        scores = np.concatenate(all_scores) if all_scores else np.zeros((0, k), np.float32)
        positions = np.concatenate(all_positions) if all_positions else np.zeros((0, k), np.int64)
        return scores, positions

    def search(self, queries: np.ndarray, k: int, batch: int = 1024) -> tuple[np.ndarray, list[list[str]]]:
        """(scores (Q, k'), ids) with k' = min(k, size); rows are sorted by score, best first."""
        scores, positions = self.search_positions(queries, k, batch)
        ids = self.ids if self.ids is not None else [str(i) for i in range(self.size)]
        return scores, [[ids[p] for p in row if p >= 0] for row in positions]

    def save(self, folder: str | Path) -> None:
        """index.faiss (a CPU index) and ids.txt, written atomically."""
        faiss = _faiss()

        self._live()
        cpu = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.cpu_index
        ids = self.ids if self.ids is not None else [str(i) for i in range(self.size)]
        with atomic_directory(folder) as tmp:
            faiss.write_index(cpu, str(tmp / "index.faiss"))
            atomic_write_text(tmp / "ids.txt", "".join(i + "\n" for i in ids))
            atomic_write_text(tmp / "factory.txt", self.factory + "\n")

    @classmethod
    def load(cls, folder: str | Path, use_gpu: str | bool = "auto", fp16: bool = True) -> "DenseIndex":
        import faiss

        folder = Path(folder)
        cpu = faiss.read_index(str(folder / "index.faiss"))
        factory = (folder / "factory.txt").read_text().strip() if (folder / "factory.txt").is_file() else "Flat"
        index = cls(cpu.d, factory, use_gpu, fp16)
        index.cpu_index = cpu
        index.ids = (folder / "ids.txt").read_text(encoding="utf-8").splitlines()
        index.size = cpu.ntotal
        if len(index.ids) != cpu.ntotal:
            raise ValueError(f"{folder}: {cpu.ntotal} vectors but {len(index.ids)} ids")
        return index


def run_from_hits(query_ids: list[str], scores: np.ndarray, ids: list[list[str]]) -> dict[str, dict[str, float]]:
    return {qid: {d: float(s) for d, s in zip(row_ids, row_scores)} for qid, row_scores, row_ids in
            zip(query_ids, scores, ids)}
