"""`retromae finetune CONFIG.yaml [key=value ...]`: contrastive fine-tuning of a bi-encoder on the shared loop.

With a dev set (`dev.dataset`), the model is scored every `dev.every_steps` steps and at the end, and the
best-scoring weights are the ones exported (choose on dev, report on test).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retromae.config import ConfigError, apply_overrides, build, load_yaml, to_dict
from retromae.data.batches import StoreBatches
from retromae.finetune.data import FORMATS, GroupBatch, check_teacher_coverage, load_training_data, read_teacher_scores
from retromae.finetune.model import BiEncoder, LossConfig
from retromae.modeling import ModelConfig, resolve_model_path
from retromae.runs import claim_output_dir
from retromae.trainer import TrainConfig, Trainer, make_accelerator

logger = logging.getLogger(__name__)


@dataclass
class FinetuneDataConfig:
    train: str = ""  # training data: BEIR / MS MARCO folder, Tevatron or mined JSON lines, or a HF dataset
    format: str = "auto"  # auto | beir | msmarco | tevatron | mined | hf
    split: str = "train"  # qrels split (BEIR) or dataset split (hf)
    corpus: str | None = None  # passages of a mined file (BEIR folder, corpus.jsonl or collection.tsv)
    negatives: str | None = None  # hard negatives: a mined file (BEIR), qidpidtriples or train_negs (MS MARCO)
    negatives_per_query: int = 30  # qidpidtriples: negatives kept per query (a uniform sample, read in a stream)
    teacher_scores: str | None = None  # qid<TAB>pid<TAB>score of a cross-encoder, for distillation
    group_size: int = 8  # passages per query in a batch: 1 positive + group_size - 1 negatives
    query_max_len: int = 32  # tokens per query
    passage_max_len: int = 128  # tokens per passage
    query_prefix: str = ""  # put before every query (and at evaluation: dev.encode)
    passage_prefix: str = ""  # put before every passage
    title_separator: str = " "  # between title and text (" [SEP] " for MS MARCO recipes)
    num_workers: int = 0  # DataLoader workers that tokenize batches

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r} is not one of {', '.join(FORMATS)}")
        if self.group_size < 1:
            raise ConfigError("data.group_size must be >= 1", key="group_size")
        if self.negatives_per_query < 1:
            raise ConfigError("data.negatives_per_query must be >= 1", key="negatives_per_query")


@dataclass
class DevConfig:
    dataset: str | None = None  # BEIR folder used to choose the best weights (null: keep the last)
    split: str = "dev"  # its qrels split
    metric: str = "ndcg@10"  # the metric that chooses
    every_steps: int = 0  # score every N steps (0: only at the end)
    batch_size: int = 128  # encoding batch size


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the encoder to fine-tune (pretrained export, HF model)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)  # training groups and their shape
    loss: LossConfig = field(default_factory=LossConfig)  # similarity, temperature, negatives, GradCache, distillation
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5, warmup_ratio=0.1))  # the shared loop
    dev: DevConfig = field(default_factory=DevConfig)  # model selection on a dev set
    export: bool = True  # write the bi-encoder (Hugging Face + sentence-transformers) at the end


def load_finetune_config(path: str | None, overrides: list[str] = ()) -> FinetuneConfig:
    data, lines = load_yaml(path) if path else ({}, {})
    apply_overrides(data, list(overrides), lines)
    return build(FinetuneConfig, data, source=str(path or "<overrides>"), lines=lines)


def load_encoder(cfg: ModelConfig):
    """The encoder body (no pooler: retrieval reads the last hidden states), fp32 weights, and its tokenizer."""
    from transformers import AutoModel

    from retromae.modeling import load_pretrained, load_tokenizer

    model = load_pretrained(AutoModel, cfg)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused by CLS / mean pooling; left in, DDP would report unused parameters
    return model, load_tokenizer(cfg)


def build_bi_encoder(cfg: FinetuneConfig):
    if cfg.loss.representation == "splade":  # the whole masked-LM model: SPLADE reads its head's logits
        from retromae.modeling import load_masked_lm, load_tokenizer
        from retromae.retrieval.sparse import SpladeRepresentation

        rep = SpladeRepresentation(load_masked_lm(cfg.model))
        _load_pretraining_head(rep, cfg.model)
        return BiEncoder(rep, cfg.loss), load_tokenizer(cfg.model)
    if cfg.loss.representation == "dupmae":
        from retromae.modeling import load_masked_lm, load_tokenizer
        from retromae.objectives.dupmae import DupMAERepresentation, DupMAERepresentationConfig

        rep = DupMAERepresentation(load_masked_lm(cfg.model), DupMAERepresentationConfig(
            cfg.loss.dupmae_dense_dim, cfg.loss.dupmae_topk))
        _load_pretraining_head(rep, cfg.model)
        query_model = None if cfg.loss.shared_encoder else copy.deepcopy(rep)
        return BiEncoder(rep, cfg.loss, query_model), load_tokenizer(cfg.model)
    model, tokenizer = load_encoder(cfg.model)
    query_model = None if cfg.loss.shared_encoder else copy.deepcopy(model)
    return BiEncoder(model, cfg.loss, query_model), tokenizer


def _load_pretraining_head(rep, cfg: ModelConfig) -> None:
    """Start DupMAE or SPLADE fine-tuning from the MLM head that pretraining saved beside the export, when there is
    one."""
    import safetensors.torch

    from retromae.modeling import heads_path
    from retromae.objectives.dupmae import load_head_state

    path = Path(heads_path(resolve_model_path(cfg.name_or_path)))
    if not path.is_file():
        logger.warning("no pretraining heads at %s: the MLM head that makes mu starts as the checkpoint has it", path)
        return
    load_head_state(rep.mlm, safetensors.torch.load_file(str(path)), "encoder.")


def build_batches(cfg: FinetuneConfig, tokenizer, accelerator):
    d = cfg.data
    if not d.train:
        raise ConfigError("data.train is empty: give the training data (a folder or a file)")
    data = load_training_data(d.train, d.format, d.split, d.corpus, d.negatives, d.title_separator,
                              d.negatives_per_query, cfg.train.seed)
    if not len(data):
        raise ConfigError(f"{d.train}: no training query with a positive passage")
    teacher = None
    if d.teacher_scores:
        teacher = read_teacher_scores(d.teacher_scores)
        check_teacher_coverage(data, teacher, d.teacher_scores)
    make_batch = GroupBatch(data, tokenizer, d.group_size, d.query_max_len, d.passage_max_len, cfg.train.seed,
                            d.query_prefix, d.passage_prefix, teacher, d.title_separator)
    if accelerator.is_main_process:
        logger.info("%d training queries (%d with hard negatives) from %s", len(data), data.with_negatives(),
                    data.source)
    return StoreBatches(data, cfg.train.per_device_batch_size, accelerator.num_processes,
                        accelerator.process_index, cfg.train.seed, num_workers=d.num_workers, make_batch=make_batch)


class DevSelector:
    """Scores the model on the dev set every `every_steps` steps and at the end; keeps the best weights."""

    def __init__(self, cfg: FinetuneConfig, tokenizer):
        from retromae.retrieval.data import load_dataset
        from retromae.retrieval.encoder import EncodeConfig

        self.cfg, self.tokenizer = cfg, tokenizer
        self.data = load_dataset(cfg.dev.dataset, cfg.dev.split, cfg.data.title_separator)
        # Exactly what `retromae evaluate` will do with the export under its defaults (export_settings): the
        # passage length for queries too, as SentenceTransformer.encode_query truncates at max_seq_length.
        self.encode = EncodeConfig(**export_settings(cfg), batch_size=cfg.dev.batch_size,
                                   precision=cfg.train.mixed_precision)
        self.best_score, self.best_step, self.best_state, self.history = float("-inf"), None, None, []

    def __call__(self, trainer) -> None:
        every = self.cfg.dev.every_steps
        if not ((every > 0 and trainer.step % every == 0) or trainer.finished):
            return
        score = self.score(trainer.objective, trainer.accelerator.device)
        self.history.append({"step": trainer.step, self.cfg.dev.metric: score})
        if trainer.accelerator.is_main_process:
            logger.info("dev %s at step %d: %.4f", self.cfg.dev.metric, trainer.step, score)
        if score > self.best_score:
            self.best_score, self.best_step = score, trainer.step
            self.best_state = {k: v.detach().cpu().clone() for k, v in trainer.objective.state_dict().items()}

    def score(self, bi_encoder: BiEncoder, device) -> float:
        from retromae.retrieval.encoder import TextEncoder
        from retromae.retrieval.evaluate import SearchConfig, evaluate_model

        bi_encoder.eval()
        try:
            loss = self.cfg.loss
            search = SearchConfig(metrics=[self.cfg.dev.metric], title_separator=self.cfg.data.title_separator,
                                  work_dir=self.cfg.train.output_dir)  # scratch shards under the run's folder
            if loss.representation == "dupmae":
                result = self._score_dupmae(bi_encoder, device, search)
            elif loss.representation == "splade":
                from retromae.retrieval.sparse import SparseTextEncoder

                search.representation = "splade"
                encoder = SparseTextEncoder(bi_encoder.encoder, self.encode, device, tokenizer=self.tokenizer)
                result = evaluate_model("(training)", self.data, self.cfg.dev.split, self.encode, search,
                                        encoder=encoder)
            else:
                encoder = TextEncoder(bi_encoder.encoder, self.encode, device=device, tokenizer=self.tokenizer,
                                      pooling=loss.pooling, normalize=loss.similarity == "cosine",
                                      query_model=bi_encoder.query_encoder)
                result = evaluate_model("(training)", self.data, self.cfg.dev.split, self.encode, search,
                                        encoder=encoder)
            import torch.distributed as dist

            value = torch.tensor([result[self.cfg.dev.metric] if result else 0.0], device=device)
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(value, src=0)
            return float(value.item())
        finally:
            bi_encoder.train()

    def _score_dupmae(self, bi_encoder: BiEncoder, device, search) -> dict | None:
        from retromae.retrieval.evaluate import evaluate_model
        from retromae.retrieval.hybrid import HybridEncoder

        encoder = HybridEncoder(None, self.encode, device, representation=bi_encoder.encoder, tokenizer=self.tokenizer)
        search.representation = "dupmae"
        return evaluate_model("(training)", self.data, self.cfg.dev.split, self.encode, search, encoder=encoder)


def count_steps(trainer) -> None:
    """The bi-encoder's record of optimizer steps done (the FLOPS warm-up reads it; saved with checkpoints)."""
    trainer.objective.steps_done.fill_(trainer.step)


def export_settings(cfg: FinetuneConfig) -> dict:
    """How the export declares it encodes (retromae.sentence_config): the passage length as its max_seq_length
    (queries included, as SentenceTransformer.encode_query truncates), the prefixes it was trained with as its
    prompts."""
    d = cfg.data
    return {"query_max_len": d.passage_max_len, "passage_max_len": d.passage_max_len,
            "query_prefix": d.query_prefix, "passage_prefix": d.passage_prefix}


def preflight(cfg: FinetuneConfig) -> None:
    """What can be checked before anything is loaded or written: the model, the data files and the dev set exist."""
    from retromae.data.corpus import CorpusError, not_found
    from retromae.modeling import check_model_source

    from retromae.inputs import check_lengths, check_tokenizer_files, model_position_limit

    check_model_source(cfg.model.name_or_path)
    check_tokenizer_files(cfg.model.tokenizer or cfg.model.name_or_path,
                          "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    d = cfg.data
    limit = model_position_limit(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    check_lengths({"data.query_max_len": d.query_max_len, "data.passage_max_len": d.passage_max_len}, limit,
                  cfg.model.name_or_path)
    if not d.train:
        raise ConfigError("data.train is empty: give the training data (a folder or a file)")
    if d.format != "hf" and not Path(d.train).exists():
        hint = ""
        if d.train.endswith((".jsonl", ".jsonl.gz")):
            hint = ("; a mined training file is made by `retromae mine --model MODEL --data FOLDER --output "
                    f"{d.train}` (the recipe's comments give the command)")
        raise CorpusError(not_found(d.train, "training data") + hint)
    for key in ("corpus", "negatives", "teacher_scores"):
        path = getattr(d, key)
        if path and not Path(path).exists():
            raise CorpusError(f"data.{key}: " + not_found(path))
    if cfg.dev.dataset and not Path(cfg.dev.dataset).is_dir():
        raise CorpusError("dev.dataset: " + not_found(cfg.dev.dataset, "folder"))


def run(cfg: FinetuneConfig) -> dict:
    from accelerate.utils import set_seed

    from retromae.export import export_bi_encoder

    accelerator = make_accelerator(cfg.train)
    preflight(cfg)
    with claim_output_dir(cfg.train, to_dict(cfg), accelerator):
        set_seed(cfg.train.seed)
        bi_encoder, tokenizer = build_bi_encoder(cfg)
        batches = build_batches(cfg, tokenizer, accelerator)
        selector = DevSelector(cfg, tokenizer) if cfg.dev.dataset else None
        callbacks = [count_steps] + ([selector] if selector else [])
        trainer = Trainer(bi_encoder, batches, cfg.train, accelerator, run_config=to_dict(cfg),
                          callbacks=callbacks, log_name="finetune")
        history = trainer.train()
        out = Path(cfg.train.output_dir) / "model"
        exported = cfg.export and trainer.finished
        if exported and accelerator.is_main_process:
            model = trainer.objective
            if selector is not None and selector.best_state is not None:
                model.load_state_dict(selector.best_state)
                logger.info("exporting the weights of step %d, the best on dev (%s %.4f)", selector.best_step,
                            cfg.dev.metric, selector.best_score)
            settings = export_settings(cfg)
            export_bi_encoder(model, tokenizer, out, run_config=to_dict(cfg), max_seq_length=settings["passage_max_len"],
                              query_prefix=settings["query_prefix"], passage_prefix=settings["passage_prefix"])
        accelerator.wait_for_everyone()
    return {
        "history": history,
        "model_dir": str(out) if exported else None,
        "steps": trainer.step,
        "dev": None if selector is None else {"best_step": selector.best_step, "best": selector.best_score,
                                              "history": selector.history},
    }
