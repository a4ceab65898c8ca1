"""Encode texts into vectors with any encoder this toolkit exports, any sentence-transformers model or any
Hugging Face model: CLS or mean pooling, optional normalisation, separate query / passage lengths and
prefixes, length-sorted batches with dynamic padding, `inference_mode`, bf16 / fp16 half precision.

Written as a small loop rather than through `SentenceTransformer.encode` because evaluation needs what that
call does not give: different settings for queries and passages of one model, writing large corpora to
memory-mapped shards as they go (one per process), precision chosen by the hardware, and tokenization
overlapped with the forward passes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retromae.config import ConfigError
from retromae.hardware import resolve_precision
from retromae.modeling import resolve_model_path

logger = logging.getLogger(__name__)

POOLINGS = ("auto", "cls", "mean")


@dataclass
class EncodeConfig:
    pooling: str = "auto"  # auto (the model's sentence-transformers pooling, else cls) | cls | mean
    normalize: bool | None = None  # L2-normalise; null: as the model's sentence-transformers config says
    query_max_len: int = 64  # tokens per query, special tokens included
    passage_max_len: int = 256  # tokens per passage, special tokens included
    query_prefix: str = ""  # put before every query (e.g. "query: " for E5-style models)
    passage_prefix: str = ""  # put before every passage
    batch_size: int = 128  # texts per forward pass
    precision: str = "auto"  # auto (bf16 where the hardware has it) | no (fp32) | bf16 | fp16 (weights cast)
    chunk_size: int = 16384  # texts tokenized and length-sorted together; bounds memory on huge corpora
    compile: bool = False  # torch.compile the model (dynamic shapes): ~7% faster on a CPU, after a ~40 s compile

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r} must be one of {', '.join(POOLINGS)}")


def sentence_transformers_settings(path: str) -> tuple[str | None, bool]:
    """(pooling, normalize) read from a sentence-transformers folder, or (None, False) for other models."""
    folder = Path(path)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None, False
    modules = json.loads(modules_file.read_text())
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    pooling = None
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            config = json.loads((folder / m["path"] / "config.json").read_text())
            mode = config.get("pooling_mode")
            if mode is None:
                mode = "cls" if config.get("pooling_mode_cls_token") else "mean" if config.get(
                    "pooling_mode_mean_tokens") else None
            if mode in ("cls", "mean"):
                pooling = mode
    return pooling, normalize


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TextEncoder:
    """A model ready to turn queries and passages into float32 vectors."""

    def __init__(self, model, cfg: EncodeConfig | None = None, device: str | torch.device | None = None,
                 trust_remote_code: bool = False, tokenizer=None, pooling: str | None = None,
                 normalize: bool | None = None):
        """`model`: a path, hub id or pkg:MODULE to load, or a loaded Hugging Face model body (with its
        `tokenizer`, `pooling` and `normalize`), e.g. a model in training: it is used as it is, in place, and
        half precision then runs as autocast rather than by casting its weights."""
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg or EncodeConfig()
        self.cfg.validate()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(self.cfg.precision, self.device.type)
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.autocast = None
        if isinstance(model, torch.nn.Module):
            self.model, self.tokenizer = model, tokenizer
            st_pooling, st_normalize = pooling, bool(normalize)
            self.autocast = half
        else:
            path = resolve_model_path(model)
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            # fp32 weights whatever the checkpoint stores: precision is chosen by `precision`, not by the file
            self.model = AutoModel.from_pretrained(path, attn_implementation="sdpa",
                                                   trust_remote_code=trust_remote_code, dtype=torch.float32)
            self.model.eval().to(self.device)
            if half is not None:
                # inference in half precision: the weights are cast (as sentence-transformers' model.half() does),
                # which is faster than autocast's per-op casts; pooling and normalisation stay in fp32
                self.model.to(half)
            st_pooling, st_normalize = sentence_transformers_settings(path) if os.path.isdir(path) else (None, False)
        if self.cfg.compile:
            self.model = torch.compile(self.model, dynamic=True)
        self.pooling = (st_pooling or "cls") if self.cfg.pooling == "auto" else self.cfg.pooling
        self.normalize = st_normalize if self.cfg.normalize is None else self.cfg.normalize
        self.dimension = self.model.config.hidden_size

    def settings(self) -> dict:
        return {"pooling": self.pooling, "normalize": self.normalize, "precision": self.precision,
                "query_max_len": self.cfg.query_max_len, "passage_max_len": self.cfg.passage_max_len,
                "query_prefix": self.cfg.query_prefix, "passage_prefix": self.cfg.passage_prefix,
                "batch_size": self.cfg.batch_size, "device": str(self.device)}

    def _kind(self, kind: str) -> tuple[int, str]:
        if kind == "query":
            return self.cfg.query_max_len, self.cfg.query_prefix
        if kind == "passage":
            return self.cfg.passage_max_len, self.cfg.passage_prefix
        raise ValueError(f"kind must be 'query' or 'passage', not {kind!r}")

    def _tokenize(self, texts: list[str], max_len: int) -> dict:
        features = self.tokenizer(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        features = {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"]}
        if self.device.type == "cuda":
            features = {k: v.pin_memory() for k, v in features.items()}  # lets the copy to the GPU run async
        return features

    @torch.inference_mode()
    def _forward(self, features: dict) -> torch.Tensor:
        features = {k: v.to(self.device, non_blocking=True) for k, v in features.items()}
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            hidden = self.model(**features).last_hidden_state
        vectors = pool(hidden.float(), features["attention_mask"], self.pooling)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors

    def iter_batches(self, texts: list[str], kind: str) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(positions in `texts`, vectors on the device) batch by batch, longest texts first within each chunk.

        A background thread tokenizes and pads the next batches while the device encodes the current one (the
        Rust tokenizer releases the GIL), and no batch waits for its vectors to reach the CPU: on a GPU,
        tokenization is otherwise most of the time.
        """
        from concurrent.futures import ThreadPoolExecutor

        max_len, prefix = self._kind(kind)
        size = self.cfg.batch_size
        with ThreadPoolExecutor(max_workers=1) as pool_:
            for start in range(0, len(texts), self.cfg.chunk_size):
                chunk = texts[start : start + self.cfg.chunk_size]
                # sorted by characters, a free proxy for tokens (sorting by tokens would tokenize everything first)
                order = np.argsort([-len(t) for t in chunk], kind="stable")
                batches = [order[b : b + size] for b in range(0, len(order), size)]
                tokenize = lambda rows: self._tokenize([prefix + chunk[i] for i in rows], max_len)  # noqa: E731
                pending = [pool_.submit(tokenize, rows) for rows in batches[:2]]
                for i, rows in enumerate(batches):
                    features = pending.pop(0).result()
                    if i + 2 < len(batches):
                        pending.append(pool_.submit(tokenize, batches[i + 2]))
                    yield start + rows, self._forward(features)

    def encode(self, texts: list[str], kind: str = "passage", show_progress: bool = True,
               out: np.ndarray | None = None) -> np.ndarray:
        """Vectors (len(texts), dimension) in float32, in the order of `texts`; written into `out` if given
        (e.g. a memory-mapped array). Vectors are gathered on the device and copied out once per chunk."""
        from tqdm.auto import tqdm

        if out is None:
            out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        rows_done, vectors_done = [], []

        def flush():
            if rows_done:
                out[np.concatenate(rows_done)] = torch.cat(vectors_done).cpu().numpy()
                rows_done.clear()
                vectors_done.clear()

        with tqdm(total=len(texts), desc=f"encode {kind}s", disable=not show_progress, unit="text") as bar:
            for rows, vectors in self.iter_batches(texts, kind):
                rows_done.append(rows)
                vectors_done.append(vectors)
                bar.update(len(rows))
                if sum(len(r) for r in rows_done) >= self.cfg.chunk_size:
                    flush()
            flush()
        return out


def shard_range(n: int, process_index: int, num_processes: int) -> tuple[int, int]:
    return n * process_index // num_processes, n * (process_index + 1) // num_processes


def encode_shard(encoder: TextEncoder, ids: list[str], texts: list[str], out_dir: str | Path, process_index: int = 0,
                 num_processes: int = 1, kind: str = "passage", show_progress: bool = True) -> Path:
    """Encode this process's contiguous share of `texts` into a memory-mapped .npy shard (written under a
    temporary name, then renamed) with its ids beside it. The shards of all processes, in order, are the
    embeddings of the whole corpus."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = shard_range(len(texts), process_index, num_processes)
    stem = f"shard-{process_index:05d}-of-{num_processes:05d}"
    tmp = out_dir / f".{stem}.tmp.npy"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(hi - lo, encoder.dimension))
    encoder.encode(texts[lo:hi], kind, show_progress=show_progress, out=array)
    array.flush()
    del array
    shard_ids = ids[lo:hi]
    if any("\n" in i for i in shard_ids):
        raise ValueError("document ids may not contain line breaks")
    (out_dir / f".{stem}.ids.tmp").write_text("".join(i + "\n" for i in shard_ids), encoding="utf-8")
    os.replace(out_dir / f".{stem}.ids.tmp", out_dir / f"{stem}.ids")
    os.replace(tmp, out_dir / f"{stem}.npy")
    return out_dir / f"{stem}.npy"


def read_shards(out_dir: str | Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, memory-mapped vectors) of each shard in order."""
    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob("shard-*.npy"))
    if not shards:
        raise FileNotFoundError(f"{out_dir}: no embedding shards")
    expected = int(shards[0].stem.split("-of-")[1])
    if len(shards) != expected:
        raise FileNotFoundError(f"{out_dir}: {len(shards)} of {expected} shards present")
    for shard in shards:
        ids = shard.with_suffix(".ids").read_text(encoding="utf-8").splitlines()
        yield ids, np.load(shard, mmap_mode="r")
