"""FAISS indexes: exact inner product by default, any factory string on request, on all GPUs when faiss has
GPU support (sharded, fp16), with the document ids kept beside the index."""

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


class DenseIndex:
    """Vectors with string ids, searched by inner product.

    factory: a faiss index factory string ("Flat" = exact `IndexFlatIP`; "IVF4096,Flat", "HNSW32", "IVF4096,PQ64"
    ... for approximate search; trained on the first vectors added). use_gpu: "auto" moves the index to all
    GPUs (sharded, fp16 storage) when faiss has GPU support, and stays on the CPU otherwise.
    """

    def __init__(self, dimension: int, factory: str = "Flat", use_gpu: str | bool = "auto", fp16: bool = True):
        faiss = _faiss()

        self.dimension, self.factory, self.fp16 = dimension, factory, fp16
        self.cpu_index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
        self.ids: list[str] = []
        gpus = faiss_gpus()
        self.on_gpu = bool(gpus) if use_gpu == "auto" else bool(use_gpu)
        if self.on_gpu and not gpus:
            raise RuntimeError("use_gpu=True but this faiss has no GPU support (pip install faiss-gpu-cu12)")
        self.index = None

    def _live(self):
        """The index searches run on: the CPU index, or its clone sharded over all GPUs."""
        if self.index is None:
            if self.on_gpu:
                import faiss

                options = faiss.GpuMultipleClonerOptions()
                options.shard, options.useFloat16 = True, self.fp16
                self.index = faiss.index_cpu_to_all_gpus(self.cpu_index, options)
            else:
                self.index = self.cpu_index
        return self.index

    def add(self, vectors: np.ndarray, ids: list[str], batch: int = 262144) -> None:
        if len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        if not self.cpu_index.is_trained:
            sample = np.ascontiguousarray(vectors[: max(256 * 39, 100000)], dtype=np.float32)
            self._check_trainable(len(sample))
            self.cpu_index.train(sample)
        index = self._live()
        for start in range(0, len(vectors), batch):
            index.add(np.ascontiguousarray(vectors[start : start + batch], dtype=np.float32))
        self.ids.extend(ids)

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
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int, batch: int = 1024) -> tuple[np.ndarray, list[list[str]]]:
        """(scores (Q, k'), ids) with k' = min(k, size); rows are sorted by score, best first."""
        k = min(k, len(self.ids))
        index = self._live()
        all_scores, all_positions = [], []
        for start in range(0, len(queries), batch):
            scores, positions = index.search(np.ascontiguousarray(queries[start : start + batch], dtype=np.float32), k)
            all_scores.append(scores)
            all_positions.append(positions)
        scores = np.concatenate(all_scores) if all_scores else np.zeros((0, k), np.float32)
        positions = np.concatenate(all_positions) if all_positions else np.zeros((0, k), np.int64)
        ids = [[self.ids[p] for p in row if p >= 0] for row in positions]
        return scores, ids

    def save(self, folder: str | Path) -> None:
        """index.faiss (a CPU index) and ids.txt, written atomically."""
        import faiss

        cpu = faiss.index_gpu_to_cpu(self.index) if self.on_gpu and self.index is not None else self.cpu_index
        with atomic_directory(folder) as tmp:
            faiss.write_index(cpu, str(tmp / "index.faiss"))
            atomic_write_text(tmp / "ids.txt", "".join(i + "\n" for i in self.ids))
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
        if len(index.ids) != cpu.ntotal:
            raise ValueError(f"{folder}: {cpu.ntotal} vectors but {len(index.ids)} ids")
        return index


def run_from_hits(query_ids: list[str], scores: np.ndarray, ids: list[list[str]]) -> dict[str, dict[str, float]]:
    return {qid: {d: float(s) for d, s in zip(row_ids, row_scores)} for qid, row_scores, row_ids in
            zip(query_ids, scores, ids)}
