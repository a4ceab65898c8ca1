"""What a model folder declares about how it encodes text, read from (and written to) the sentence-transformers
files: pooling (`1_Pooling/config.json`), normalisation (a `Normalize` module), the token limit
(`sentence_bert_config.json`: `max_seq_length`), the query and passage prefixes (`config_sentence_transformers.json`:
`prompts`) and the similarity (`similarity_fn_name`).

This is the one source of truth for `retromae evaluate`, `retromae mine` and the dev selection of fine-tuning:
with no option given, they encode a model exactly as `SentenceTransformer(path).encode_query(...)` /
`encode_document(...)` do, and the toolkit's exports declare what they were trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The prompt names sentence-transformers' encode_document tries, in its order.
DOCUMENT_PROMPTS = ("document", "passage", "corpus")


@dataclass
class EncoderSettings:
    pooling: str | None = None  # cls | mean | None (the folder does not say)
    normalize: bool = False  # vectors are L2-normalised (a Normalize module, or cosine similarity)
    max_seq_length: int | None = None  # tokens per text, special tokens included
    query_prefix: str = ""  # the "query" prompt
    passage_prefix: str = ""  # the "document" prompt
    similarity: str | None = None  # dot | cosine | ... as declared, None if not


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def read_settings(path: str | Path) -> EncoderSettings:
    """The settings a sentence-transformers folder declares; an empty `EncoderSettings` for other models."""
    folder = Path(path)
    modules = _json(folder / "modules.json")
    settings = EncoderSettings()
    if not isinstance(modules, list):
        return settings
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Normalize"):
            settings.normalize = True
        elif kind.endswith("Pooling"):
            config = _json(folder / module.get("path", "") / "config.json")
            mode = config.get("pooling_mode")
            if mode is None:
                mode = "cls" if config.get("pooling_mode_cls_token") else (
                    "mean" if config.get("pooling_mode_mean_tokens") else None)
            settings.pooling = mode if mode in ("cls", "mean") else None
        elif kind.endswith("Transformer"):
            limit = _json(folder / module.get("path", "") / "sentence_bert_config.json").get("max_seq_length")
            settings.max_seq_length = int(limit) if limit else None
    card = _json(folder / "config_sentence_transformers.json")
    prompts = card.get("prompts") or {}
    settings.query_prefix = prompts.get("query", "") or ""
    settings.passage_prefix = next((prompts[k] for k in DOCUMENT_PROMPTS if prompts.get(k)), "")
    settings.similarity = card.get("similarity_fn_name")
    if settings.similarity == "cosine":
        settings.normalize = True  # scored by cosine: the vectors the score compares are normalised ones
    return settings


def default_max_length(tokenizer, config, cap: int = 512) -> int:
    """What sentence-transformers takes for a plain Hugging Face model: the tokenizer's and the position table's
    limit (capped, since some tokenizers declare a huge model_max_length)."""
    limits = [cap, getattr(tokenizer, "model_max_length", cap) or cap]
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        limits.append(positions)
    return int(min(limits))
