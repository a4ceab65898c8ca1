"""Shared fixtures: a tiny random BERT with a WordPiece tokenizer trained here, and corpora built here.

Nothing is downloaded and no shipped data is needed: the texts are standard-library docstrings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BEIR = SHARED / "data" / "beir"


@pytest.fixture(scope="session")
def docstrings() -> list[dict]:
    from retromae.demo import docstring_corpus

    return docstring_corpus(limit=800)


def make_tiny_model(path: Path, texts: list[str], vocab_size: int = 700, hidden: int = 32, layers: int = 2) -> Path:
    """A WordPiece tokenizer trained on `texts` and a randomly initialised BertForMaskedLM, saved to `path`."""
    import transformers
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.processors import BertProcessing
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1)
    backend = wordpiece._tokenizer
    backend.post_processor = BertProcessing(
        ("[SEP]", backend.token_to_id("[SEP]")), ("[CLS]", backend.token_to_id("[CLS]"))
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
        model_max_length=128,
    )
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=hidden * 2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )
    transformers.set_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, docstrings) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"), [d["text"] for d in docstrings])


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, docstrings) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docstrings[:300]))
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each test starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


def tiny_config(model_dir, corpus, output_dir, **sections):
    """A PretrainConfig for fast CPU runs on the tiny model; `sections` override by section."""
    from retromae.pretrain import load_config

    overrides = {
        "model.name_or_path": str(model_dir),
        "data.corpus": [str(corpus)],
        "data.max_len": 64,
        "data.cache_dir": str(Path(output_dir) / "cache"),
        "train.output_dir": str(output_dir),
        "train.per_device_batch_size": 8,
        "train.max_steps": 4,
        "train.mixed_precision": "no",
        "train.report_to": "none",
        "train.logging_steps": 1,
        "train.cpu": True,
    }
    for section, values in sections.items():
        for k, v in values.items():
            overrides[f"{section}.{k}"] = v
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
