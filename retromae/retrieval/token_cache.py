"""A corpus tokenized once: the token ids of a collection's passages, cached on disk (memory-mapped Arrow) and
reused by every later encoding with the same tokenizer, length, prefix and title handling.

A study, the dev selection of a fine-tuning run and a suite of checkpoints encode the same corpus with the same
tokenizer again and again; on a GPU tokenization is most of encoding's time (H200: ours 1.76x
sentence-transformers, tokenization-bound). The cache is cut into blocks of 65,536 passages, each built by the first
process that needs it (under a file lock: the processes of a launch, each encoding its share, never build a block
twice) and written under a temporary name, then renamed. The key: the collection's fingerprint (its files' paths,
sizes and times), the title separator, the tokenizer's vocabulary, the token limit and the prefix.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import numpy as np

from retromae.retrieval.collection import cache_root

BLOCK = 1 << 16
TOKENIZE_CHUNK = 4096  # texts tokenized at once while a block is built


class TokenCache:
    def __init__(self, texts_key: str, tokenizer, max_len: int, prefix: str):
        from retromae.data.examples import tokenizer_signature

        key = f"{texts_key}|{tokenizer_signature(tokenizer)}|{max_len}|{prefix}|1"
        self.folder = cache_root() / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:32]
        self.tokenizer, self.max_len, self.prefix = tokenizer, max_len, prefix

    def rows(self, texts, start: int, stop: int) -> list[np.ndarray]:
        """Token ids (special tokens included, truncated) of texts[start:stop], from the cache's blocks."""
        rows = []
        for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            lo, hi = block * BLOCK, min(len(texts), (block + 1) * BLOCK)
            ids = self._block(texts, block, lo, hi)
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            offsets = ids.offsets.to_numpy()
            values = ids.values.to_numpy(zero_copy_only=False)
            rows += [values[offsets[i] : offsets[i + 1]] for i in range(a, b)]
        return rows

    def _block(self, texts, block: int, lo: int, hi: int):
        import pyarrow as pa

        path = self.folder / f"block-{block:06d}.arrow"
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / f".block-{block:06d}.lock", "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                if not path.is_file():
                    self._write(texts, lo, hi, path)
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        return table.column("input_ids").combine_chunks()

    def _write(self, texts, lo: int, hi: int, path: Path) -> None:
        import pyarrow as pa

        # A few thousand texts at a time: the tokenizer's output objects (tokens, offsets, masks: kilobytes per
        # text) of a whole block would peak at ~800 MB; the block's ids themselves are ~4 bytes a token.
        chunks = []
        for start in range(lo, hi, TOKENIZE_CHUNK):
            texts_chunk = texts[start : min(hi, start + TOKENIZE_CHUNK)]
            ids = self.tokenizer([self.prefix + t for t in texts_chunk], truncation=True, max_length=self.max_len,
                                 add_special_tokens=True, return_attention_mask=False,
                                 return_token_type_ids=False)["input_ids"]
            chunks.append(pa.array(ids, type=pa.list_(pa.int32())))
        table = pa.table({"input_ids": pa.concat_arrays(chunks)})  # one record batch: read back without a copy
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
