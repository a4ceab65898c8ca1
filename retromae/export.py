"""Export a trained encoder: a Hugging Face model folder that is also a sentence-transformers folder, with the
pretraining heads beside it so that pretraining can be continued from it."""

from __future__ import annotations

import logging
from pathlib import Path

import safetensors.torch

from retromae.config import dump_yaml
from retromae.io import atomic_directory
from retromae.modeling import heads_path, quiet_loading

logger = logging.getLogger(__name__)


def write_encoder(body, tokenizer, folder: Path, max_seq_length: int, pooling: str = "cls",
                  normalize: bool = False, query_prefix: str = "", passage_prefix: str = "") -> None:
    """Write an encoder body into `folder` as a Hugging Face model (config.json, model.safetensors, tokenizer)
    that is also a sentence-transformers model (modules.json, 1_Pooling/ [, 2_Normalize/]) declaring how it
    encodes: its token limit, its query / document prompts, and its similarity (cosine when normalised, else dot),
    which `retromae evaluate` reads back (retromae.sentence_config)."""
    from sentence_transformers import SentenceTransformer, models

    with quiet_loading():
        body.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        transformer = models.Transformer(str(folder), max_seq_length=max_seq_length)
        dimension = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
        modules = [transformer, models.Pooling(dimension(), pooling_mode=pooling)]
        if normalize:
            modules.append(models.Normalize())
        model = SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="cosine" if normalize else "dot",
                                    prompts={"query": query_prefix, "document": passage_prefix})
        model.save(str(folder))


def write_sparse_encoder(mlm, tokenizer, folder: Path, max_seq_length: int, query_prefix: str = "",
                         passage_prefix: str = "") -> None:
    """A SPLADE model in `folder`, loadable by `SparseEncoder(folder)` of sentence-transformers (methods.md §4): the
    masked-LM model with its head (config.json, model.safetensors), the tokenizer (model_max_length = the token
    limit), modules.json naming MLMTransformer + SpladePooling (max pooling of log(1 + ReLU) over attended positions,
    [CLS] / [SEP] included, as our SPLADE), its sentence_bert_config.json, and config_sentence_transformers.json with
    the query / document prompts and dot similarity.

    Written as JSON by hand in the v5 layout (sentence_transformers.sparse_encoder.models.*), which 5.x and 6.2 both
    load, where SparseEncoder.save would write 6.2's module paths only."""
    import json

    import sentence_transformers

    def write(path: Path, data) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    with quiet_loading():
        mlm.save_pretrained(folder, safe_serialization=True)
        tokenizer.model_max_length = max_seq_length
        tokenizer.save_pretrained(folder)
    vocabulary = mlm.get_output_embeddings().out_features if mlm.get_output_embeddings() is not None else \
        mlm.config.vocab_size
    write(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.sparse_encoder.models.MLMTransformer"},
        {"idx": 1, "name": "1", "path": "1_SpladePooling",
         "type": "sentence_transformers.sparse_encoder.models.SpladePooling"}])
    write(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    write(folder / "1_SpladePooling" / "config.json", {"pooling_strategy": "max", "activation_function": "relu",
                                                       "word_embedding_dimension": vocabulary})
    write(folder / "config_sentence_transformers.json", {
        "model_type": "SparseEncoder", "__version__": {"sentence_transformers": sentence_transformers.__version__},
        "prompts": {"query": query_prefix, "document": passage_prefix}, "default_prompt_name": None,
        "similarity_fn_name": "dot"})


def export_model(objective, tokenizer, out_dir: str | Path, run_config=None, max_seq_length: int = 512,
                 pooling: str = "cls") -> Path:
    """Write a pretrained encoder to `out_dir` atomically:
    - config.json, model.safetensors, tokenizer files: the encoder body (`AutoModel.from_pretrained(out_dir)`);
    - modules.json, 1_Pooling/ ...: the same weights as a sentence-transformers model (`SentenceTransformer(out_dir)`);
    - pretraining/heads.safetensors and pretraining/config.yaml: the MLM head and the objective's own heads,
      loaded again when `model.name_or_path` points at this folder.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_encoder(objective.arch.body, tokenizer, tmp, max_seq_length, pooling)
        heads = Path(heads_path(str(tmp)))
        heads.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(objective.heads_state_dict(), str(heads), metadata={"objective": objective.name})
        if run_config is not None:
            dump_yaml(run_config, heads.parent / "config.yaml")
    logger.info("exported the encoder to %s", out_dir)
    return out_dir


def export_bi_encoder(bi_encoder, tokenizer, out_dir: str | Path, run_config=None, max_seq_length: int = 512,
                      query_prefix: str = "", passage_prefix: str = "") -> Path:
    """Write a fine-tuned bi-encoder atomically: the (passage) encoder at `out_dir` as a Hugging Face and
    sentence-transformers model with the pooling, normalisation, passage length and prefixes it was trained
    with; with separate encoders, the query encoder likewise in `out_dir/query_encoder` (which `retromae
    evaluate` and `retromae mine` use for the queries)."""
    out_dir = Path(out_dir)
    cfg = bi_encoder.cfg
    normalize = cfg.similarity == "cosine"
    prompts = {"query_prefix": query_prefix, "passage_prefix": passage_prefix}
    with atomic_directory(out_dir) as tmp:
        if cfg.representation == "splade":  # the masked-LM model as a sentence-transformers SparseEncoder
            write_sparse_encoder(bi_encoder.encoder.mlm, tokenizer, tmp, max_seq_length, **prompts)
            if run_config is not None:
                dump_yaml(run_config, tmp / "finetune_config.yaml")
            return out_dir
        if cfg.representation == "dupmae":  # the body, plus dupmae/ (MLM head, W) for `--representation dupmae`
            write_encoder(bi_encoder.encoder.arch.body, tokenizer, tmp, max_seq_length, "cls", False, **prompts)
            bi_encoder.encoder.save(tmp / "dupmae")
            if run_config is not None:
                dump_yaml(run_config, tmp / "finetune_config.yaml")
            return out_dir
        write_encoder(bi_encoder.encoder, tokenizer, tmp, max_seq_length, cfg.pooling, normalize, **prompts)
        if bi_encoder.query_encoder is not None:
            (tmp / "query_encoder").mkdir()
            write_encoder(bi_encoder.query_encoder, tokenizer, tmp / "query_encoder", max_seq_length, cfg.pooling,
                          normalize, **prompts)
        if run_config is not None:
            dump_yaml(run_config, tmp / "finetune_config.yaml")
    logger.info("exported the bi-encoder to %s", out_dir)
    return out_dir


def load_heads_if_present(objective, model_dir: str) -> bool:
    """Continue pretraining from an export: load its saved heads into `objective` (matching names only)."""
    path = Path(heads_path(model_dir))
    if not path.is_file():
        return False
    with safetensors.safe_open(str(path), framework="pt") as f:
        saved_by = (f.metadata() or {}).get("objective", "?")
        state = {k: f.get_tensor(k) for k in f.keys()}
    missing, unexpected = objective.load_heads(state)
    logger.info("loaded pretraining heads from %s (saved by objective %r)", path, saved_by)
    if missing:
        logger.warning("heads not in %s, freshly initialised: %s", path, ", ".join(missing))
    if unexpected:
        logger.warning("heads in %s that objective %r does not use: %s", path, objective.name, ", ".join(unexpected))
    return True
