"""`retromae pretrain CONFIG.yaml [key=value ...]`: the config, the data, the objective, the loop, the export."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from retromae.config import ConfigError, apply_overrides, build, load_yaml, to_dict
from retromae.data.batches import StoreBatches
from retromae.data.corpus import check_sources, sample_texts
from retromae.data.examples import DataConfig
from retromae.data.store import cache_folder, corpus_statistics, prepare_store
from retromae.data.stream import StreamBatches
from retromae.export import export_model, load_heads_if_present
from retromae.inputs import SAMPLE_TEXTS, check_lengths, check_tokenizer_files, model_position_limit, warn_if_unreadable
from retromae.masking import TokenTables
from retromae.modeling import (
    ModelConfig,
    check_model_source,
    load_masked_lm,
    load_tokenizer,
    resolve_model_path,
)
from retromae.objectives import ObjectiveConfig, build_objective_config, objective_class
from retromae.objectives.base import check_accumulation
from retromae.runs import claim_output_dir
from retromae.sentence_config import default_max_length, read_settings
from retromae.trainer import TrainConfig, Trainer, make_accelerator

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the encoder to pretrain
    data: DataConfig = field(default_factory=DataConfig)  # the corpus and how it is cut into examples
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # objective name and its settings
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, precision, checkpoints, logging
    export: bool = True  # write the encoder (Hugging Face + sentence-transformers) and heads at the end

    _dynamic = {"objective": build_objective_config}


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> PretrainConfig:
    data, lines = load_yaml(path) if path else ({}, {})
    if base:
        data = {**base, **data}
    apply_overrides(data, list(overrides), lines)
    return build(PretrainConfig, data, source=str(path or "<overrides>"), lines=lines)


def build_objective(cfg: PretrainConfig, tokenizer=None):
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    encoder = load_masked_lm(cfg.model)
    objective = objective_class(cfg.objective.name)(encoder, tokenizer, cfg.objective)
    path = resolve_model_path(cfg.model.name_or_path)
    if Path(path).is_dir():
        load_heads_if_present(objective, path)
    return objective, tokenizer


def build_batches(cfg: PretrainConfig, tokenizer, accelerator):
    """Streamed batches, or batches from the example cache, which every process helps to build when it is missing
    (its share of the shards; a process that is done waits by watching the cache folder, not in a barrier)."""
    common = dict(
        batch_size=cfg.train.per_device_batch_size,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        seed=cfg.train.seed,
        pad_id=tokenizer.pad_token_id,
        pad_to_multiple_of=cfg.data.pad_to_multiple_of,
        num_workers=cfg.data.num_workers,
    )
    if cfg.data.streaming:
        return StreamBatches(cfg.data, tokenizer, **common)
    store = prepare_store(cfg.data, tokenizer, rank=accelerator.process_index, world=accelerator.num_processes)
    return StoreBatches(store, **common)


def attach_statistics(objective, cfg: PretrainConfig, tokenizer) -> None:
    """Objectives that weigh words by corpus statistics (e.g. PMI decoder masking) get the cache's token counts."""
    attach = getattr(objective, "attach_corpus_statistics", None)
    if attach is None:
        return
    if cfg.data.streaming:
        raise ConfigError(f"objective {cfg.objective.name!r} needs corpus statistics, which come with the example "
                          "cache: set data.streaming=false (and run `retromae prepare` first for a large corpus)")
    import torch

    counts, total = corpus_statistics(cfg.data, tokenizer)
    attach(torch.as_tensor(counts), total)


def prepare(cfg: PretrainConfig) -> dict:
    """`retromae prepare`: build the example cache with data.num_proc processes; returns its summary."""
    preflight(cfg)
    tokenizer = load_tokenizer(cfg.model)
    check_corpus_is_readable(cfg.data, tokenizer)
    store = prepare_store(cfg.data, tokenizer, num_proc=cfg.data.num_proc)
    folder = cache_folder(cfg.data, tokenizer)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return {"examples": len(store), "mean_length": meta["tokens"] / max(1, len(store)), "folder": str(folder),
            "seconds": meta.get("seconds")}


def export_length(cfg: PretrainConfig, tokenizer, config) -> int:
    """The token limit the export declares: the length it was pretrained at (data.max_len; for objectives that cut
    their own spans from documents, the longest span with its special tokens), never more than the starting model
    declares (its sentence-transformers config, else its tokenizer and position table). A model pretrained at 128
    tokens that declared the starting model's 256 would be evaluated on lengths it never saw."""
    path = resolve_model_path(cfg.model.name_or_path)
    declared = read_settings(path).max_seq_length if Path(path).is_dir() else None
    start = declared or default_max_length(tokenizer, config)
    trained = cfg.data.max_len
    if cfg.data.cut == "document":
        span = getattr(cfg.objective, "max_span_tokens", None) or getattr(cfg.objective, "span_tokens", None)
        trained = span + 2 if span else start
    return min(start, trained)


def preflight(cfg: PretrainConfig) -> None:
    """What can be checked before anything is loaded or written: the model and the corpus files exist, the
    objective accepts the accumulation and the kind of examples asked for."""
    check_accumulation(cfg.objective, cfg.train.gradient_accumulation_steps)
    wanted = getattr(cfg.objective, "example_format", None)  # a config's choice (coCondenser's span_source)
    wanted = wanted or getattr(objective_class(cfg.objective.name), "example_format", "block")
    if (wanted == "document") != (cfg.data.cut == "document"):
        raise ConfigError(f"objective {cfg.objective.name!r} takes "
                          + ("whole documents (it cuts its own spans): set data.cut=document" if wanted == "document"
                             else f"passages or packed blocks, not data.cut={cfg.data.cut}"), key="cut")
    check_model_source(cfg.model.name_or_path)
    if cfg.model.tokenizer:
        check_model_source(cfg.model.tokenizer, "model.tokenizer")
    check_family(cfg)
    check_tokenizer_files(cfg.model.tokenizer or cfg.model.name_or_path,
                          "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    check_sources(list(cfg.data.corpus), cfg.data.format, cfg.data.text_fields(), cfg.data.hf_config,
                  cfg.data.hf_split)
    if cfg.data.cut != "document":  # whole documents are cut into spans by the objective, which checks those
        limit = model_position_limit(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
        check_lengths({"data.max_len": cfg.data.max_len}, limit, cfg.model.name_or_path)


def check_corpus_is_readable(data: DataConfig, tokenizer) -> None:
    """Warn when the tokenizer turns much of the corpus into [UNK] (a sample of each source's first texts)."""
    per_source = max(1, SAMPLE_TEXTS // max(1, len(data.corpus)))
    for source, texts in sample_texts(list(data.corpus), data.format, data.text_fields(), per_source, data.hf_config,
                                      data.hf_split):
        warn_if_unreadable(tokenizer, texts, source)


def check_family(cfg: PretrainConfig) -> None:
    """The model's family is one this toolkit knows and the attention implementation asked for exists for it: read
    off the model's config alone, before any weight loads."""
    from transformers import AutoConfig

    from retromae.architectures import attention_for, family_of
    from retromae.modeling import from_pretrained

    config = from_pretrained(AutoConfig, cfg.model.name_or_path, revision=cfg.model.revision,
                             trust_remote_code=cfg.model.trust_remote_code)
    family_of(config)
    attention_for(config, cfg.model.attn_implementation)


def run(cfg: PretrainConfig) -> dict:
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg.train)
    preflight(cfg)
    with claim_output_dir(cfg.train, to_dict(cfg), accelerator):
        set_seed(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model)
        TokenTables.from_tokenizer(tokenizer)  # a tokenizer masking cannot use is refused before the data is prepared
        if accelerator.is_main_process:
            check_corpus_is_readable(cfg.data, tokenizer)
        batches = build_batches(cfg, tokenizer, accelerator)
        objective, tokenizer = build_objective(cfg, tokenizer)
        attach_statistics(objective, cfg, tokenizer)
        if accelerator.is_main_process:
            n = getattr(batches, "batches_per_epoch", None)
            logger.info("objective %s, %s global batches per epoch", cfg.objective.name, n if n else "streamed")
        trainer = Trainer(objective, batches, cfg.train, accelerator, run_config=to_dict(cfg), log_name="pretrain")
        history = trainer.train()
        out = Path(cfg.train.output_dir) / "model"
        exported = cfg.export and trainer.finished
        if exported:
            if accelerator.is_main_process:
                export_model(trainer.objective, tokenizer, out, run_config=to_dict(cfg),
                             max_seq_length=export_length(cfg, tokenizer, trainer.objective.encoder.config))
            accelerator.wait_for_everyone()
    return {"history": history, "model_dir": str(out) if exported else None, "steps": trainer.step}
