"""Encode texts into vectors with any encoder this toolkit exports, any sentence-transformers model or any
Hugging Face model: CLS or mean pooling, optional normalisation, separate query / passage lengths and
prefixes, length-sorted batches with dynamic padding, `inference_mode`, bf16 / fp16 half precision.

Written as a small loop rather than through `SentenceTransformer.encode` because evaluation needs what that
call does not give: different settings for queries and passages of one model, writing large corpora to
memory-mapped shards as they go (one per process), precision chosen by the hardware, and tokenization
overlapped with the forward passes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from retromae.architectures import attention_for, encoder_of
from retromae.config import ConfigError
from retromae.hardware import resolve_precision
from retromae.modeling import from_pretrained, resolve_model_path
from retromae.sentence_config import EncoderSettings, default_max_length, read_settings

logger = logging.getLogger(__name__)

POOLINGS = ("auto", "cls", "mean")


@dataclass
class EncodeConfig:
    pooling: str = "auto"  # auto (as the model's sentence-transformers config says, else cls) | cls | mean
    normalize: bool | None = None  # L2-normalise; null: as the model declares (Normalize module, cosine similarity)
    query_max_len: int | None = None  # tokens per query; null: the model's max_seq_length, as encode_query truncates
    passage_max_len: int | None = None  # tokens per passage; null: the model's max_seq_length (else its position limit)
    query_prefix: str | None = None  # put before every query; null: the model's "query" prompt (usually none)
    passage_prefix: str | None = None  # put before every passage; null: the model's "document" prompt
    batch_size: int = 128  # texts per forward pass
    precision: str = "auto"  # auto (bf16 where the hardware has it) | no (fp32) | bf16 | fp16 (weights cast)
    chunk_size: int = 16384  # texts tokenized and length-sorted together; bounds memory on huge corpora
    compile: bool = False  # torch.compile the model (dynamic shapes): ~7% faster on a CPU, after a ~40 s compile
    token_cache: bool = True  # reuse a collection's cached token ids (tokenized once per tokenizer, length, prefix)

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r} must be one of {', '.join(POOLINGS)}", key="pooling")
        for key in ("query_max_len", "passage_max_len"):
            if getattr(self, key) is not None and getattr(self, key) < 2:
                raise ConfigError(f"{key}={getattr(self, key)} must be at least 2 (the special tokens)", key=key)

    def resolve(self, declared: EncoderSettings, max_length: int) -> "EncodeConfig":
        """Every null field filled in from what the model declares (`declared`), `max_length` being its own limit
        when it declares none: the settings `SentenceTransformer(path).encode_query / encode_document` use."""
        limit = declared.max_seq_length or max_length
        return replace(
            self,
            pooling=declared.pooling or "cls" if self.pooling == "auto" else self.pooling,
            normalize=declared.normalize if self.normalize is None else self.normalize,
            query_max_len=self.query_max_len or limit,
            passage_max_len=self.passage_max_len or limit,
            query_prefix=declared.query_prefix if self.query_prefix is None else self.query_prefix,
            passage_prefix=declared.passage_prefix if self.passage_prefix is None else self.passage_prefix,
        )


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TextEncoder:
    """A model ready to turn queries and passages into float32 vectors."""

    def __init__(self, model, cfg: EncodeConfig | None = None, device: str | torch.device | None = None,
                 trust_remote_code: bool = False, tokenizer=None, pooling: str | None = None,
                 normalize: bool | None = None, query_model=None):
        """`model`: a path, hub id or pkg:MODULE to load, or a loaded Hugging Face model body (with its
        `tokenizer`, `pooling`, `normalize` and, with separate towers, `query_model`), e.g. a model in training:
        it is used as it is, in place, and half precision then runs as autocast rather than by casting its
        weights. A model folder with a `query_encoder/` (separate towers) encodes queries with that."""
        from transformers import AutoTokenizer

        cfg = cfg or EncodeConfig()
        cfg.validate()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(cfg.precision, self.device.type)
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.autocast, self.query_model = None, None
        if isinstance(model, torch.nn.Module):
            self.model, self.tokenizer, self.query_model = model, tokenizer, query_model
            declared = EncoderSettings(pooling=pooling, normalize=bool(normalize))
            self.autocast = half
        else:
            path = resolve_model_path(model)
            self.tokenizer = from_pretrained(AutoTokenizer, model, "model", trust_remote_code=trust_remote_code)
            self.model = self._load(model, half, trust_remote_code)
            declared = read_settings(path) if os.path.isdir(path) else EncoderSettings()
            if os.path.isfile(os.path.join(path, "query_encoder", "config.json")):
                # a bi-encoder fine-tuned with separate towers: queries go through their own
                self.query_model = self._load(os.path.join(path, "query_encoder"), half, trust_remote_code)
        if cfg.compile:
            self.model = torch.compile(self.model, dynamic=True)
        self.cfg = cfg.resolve(declared, default_max_length(self.tokenizer, self.model.config))
        self.pooling, self.normalize = self.cfg.pooling, self.cfg.normalize
        self.dimension = self.model.config.hidden_size
        self.layers: list[int] | None = None

    def with_layers(self, layers: list[int]) -> "TextEncoder":
        """Encode each text as [vector at layer l1 ; vector at layer l2 ; ...] (pooled, normalised per layer if
        the model is): one pass for the (layer, dim) evaluation of Starbucks-style models. Layer l is the output of
        transformer layer l (0: the embeddings)."""
        count = encoder_of(self.model).num_layers
        wrong = [layer for layer in layers if not 0 <= layer <= count]
        if wrong:
            raise ConfigError(f"layers {wrong}: the model has layers 0 (embeddings) to {count}")
        self.layers = list(layers)
        self.dimension = encoder_of(self.model).hidden_size * len(layers)
        return self

    def _load(self, path: str, half, trust_remote_code: bool):
        from transformers import AutoConfig, AutoModel

        # fp32 weights whatever the checkpoint stores: precision is chosen by `precision`, not by the file; the
        # family's fast attention (sdpa where its transformers class has it, else eager)
        config = from_pretrained(AutoConfig, path, "model", trust_remote_code=trust_remote_code)
        model = from_pretrained(AutoModel, path, "model", config=config, attn_implementation=attention_for(config),
                                trust_remote_code=trust_remote_code, dtype=torch.float32)
        model.eval().to(self.device)
        if half is not None:
            # inference in half precision: the weights are cast (as sentence-transformers' model.half() does),
            # which is faster than autocast's per-op casts; pooling and normalisation stay in fp32
            model.to(half)
        return model

    def settings(self) -> dict:
        return {"pooling": self.pooling, "normalize": self.normalize, "precision": self.precision,
                "query_max_len": self.cfg.query_max_len, "passage_max_len": self.cfg.passage_max_len,
                "query_prefix": self.cfg.query_prefix, "passage_prefix": self.cfg.passage_prefix,
                "query_encoder": "separate" if self.query_model is not None else "shared",
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
    def _forward(self, features: dict, kind: str = "passage") -> torch.Tensor:
        features = {k: v.to(self.device, non_blocking=True) for k, v in features.items()}
        model = self.query_model if kind == "query" and self.query_model is not None else self.model
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            if self.layers:  # each layer's states as the model's head reads them (a pre-norm model's final norm)
                every = encoder_of(model).layer_states(features["input_ids"], features["attention_mask"])
                states = [every[layer] for layer in self.layers]
            else:
                states = [model(**features).last_hidden_state]
        vectors = [pool(hidden.float(), features["attention_mask"], self.pooling) for hidden in states]
        if self.normalize:
            vectors = [torch.nn.functional.normalize(v, dim=-1) for v in vectors]
        return torch.cat(vectors, dim=-1) if len(vectors) > 1 else vectors[0]

    def iter_batches(self, texts: list[str], kind: str) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(positions in `texts`, vectors on the device) batch by batch, longest texts first within each chunk.

        A background thread tokenizes and pads the next batches while the device encodes the current one (the
        Rust tokenizer releases the GIL), and no batch waits for its vectors to reach the CPU: on a GPU,
        tokenization is otherwise most of the time.
        """
        from concurrent.futures import ThreadPoolExecutor

        max_len, prefix = self._kind(kind)
        size = self.cfg.batch_size
        cache = self._token_cache(texts, max_len, prefix)
        if cache is not None:
            yield from self._cached_batches(texts, cache, kind)
            return
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
                    yield start + rows, self._forward(features, kind)

    def _token_cache(self, texts, max_len: int, prefix: str):
        """The token cache of a collection's passages (retrieval.token_cache), when `texts` are those and caching
        is on; else None."""
        key = getattr(texts, "cache_key", None)
        if not (self.cfg.token_cache and key):
            return None
        from retromae.retrieval.token_cache import TokenCache

        return TokenCache(key, self.tokenizer, max_len, prefix)

    def _cached_batches(self, texts, cache, kind: str) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Batches padded straight from cached token ids, longest first within each chunk: no tokenizer call."""
        base, whole = getattr(texts, "lo", 0), getattr(texts, "texts", texts)
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(texts), self.cfg.chunk_size):
            rows = cache.rows(whole, base + start, base + min(len(texts), start + self.cfg.chunk_size))
            lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
            order = np.argsort(-lengths, kind="stable")
            for b in range(0, len(order), self.cfg.batch_size):
                picked = order[b : b + self.cfg.batch_size]
                longest = int(lengths[picked].max())
                ids = np.full((len(picked), longest), pad, dtype=np.int64)
                for row, i in enumerate(picked):
                    ids[row, : lengths[i]] = rows[i]
                features = {"input_ids": torch.from_numpy(ids),
                            "attention_mask": torch.from_numpy((np.arange(longest)[None] < lengths[picked, None])
                                                               .astype(np.int64))}
                if self.device.type == "cuda":
                    features = {k: v.pin_memory() for k, v in features.items()}
                yield start + picked, self._forward(features, kind)

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


class Window(Sequence):
    """texts[lo:hi] without copying them out: the encoder reads it a chunk at a time (a lazily read collection
    stays on disk, and its token cache is addressed by absolute position)."""

    def __init__(self, texts: Sequence[str], lo: int, hi: int):
        self.texts, self.lo, self.hi = texts, lo, hi
        self.cache_key = getattr(texts, "cache_key", None)

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, item):
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            return self.texts[self.lo + start : self.lo + stop][::step]
        if not -len(self) <= item < len(self):  # Sequence's iteration stops at this IndexError, not at texts' end
            raise IndexError(f"index {item} outside a window of {len(self)}")
        return self.texts[self.lo + (item if item >= 0 else item + len(self))]


def shard_range(n: int, process_index: int, num_processes: int) -> tuple[int, int]:
    return n * process_index // num_processes, n * (process_index + 1) // num_processes


def encode_shard(encoder: TextEncoder, ids: list[str], texts: list[str], out_dir: str | Path, process_index: int = 0,
                 num_processes: int = 1, kind: str = "passage", show_progress: bool = True, dtype=np.float32) -> Path:
    """Encode this process's contiguous share of `texts` into a memory-mapped .npy shard (written under a
    temporary name, then renamed) with its ids beside it. The shards of all processes, in order, are the
    embeddings of the whole corpus."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = shard_range(len(texts), process_index, num_processes)
    stem = f"shard-{process_index:05d}-of-{num_processes:05d}"
    tmp = out_dir / f".{stem}.tmp.npy"
    from retromae.retrieval.scratch import allocate_array

    array = allocate_array(tmp, (hi - lo, encoder.dimension), dtype)  # blocks allocated: a full disk is an error
    encoder.encode(Window(texts, lo, hi), kind, show_progress=show_progress, out=array)
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
