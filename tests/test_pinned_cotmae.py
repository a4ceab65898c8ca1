"""CoT-MAE's rules that its mutation run found unpinned (docs/mutation.md)."""

from __future__ import annotations

import pytest
import torch

from retromae.config import ConfigError
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import build_objective_config, objective_class

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


def make(model_dir, name="cotmae", **settings):
    cfg = ModelConfig(name_or_path=str(model_dir), dropout=0.0)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    objective = objective_class(name)(load_masked_lm(cfg), tokenizer, build_objective_config({"name": name, **settings}))
    return objective.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory, docstrings):
    """Positions after the padding index: a table of 130 rows holds 128 positions."""
    from retromae.matrix import tiny_family_model

    return tiny_family_model(tmp_path_factory.mktemp("cotmae_roberta"), "roberta", [d["text"] for d in docstrings[:160]])


def test_spans_must_fit_the_positions_the_model_reads(tiny_model, tiny_roberta):
    """max_span_tokens + [CLS] + [SEP] <= 128 positions in both tiny models: 126 accepted, 127 refused. RoBERTa's
    table has 130 rows, but its positions start after the padding index (2): 128 positions, as BERT's."""
    for model in (tiny_model, tiny_roberta):
        make(model, max_span_tokens=126)
        with pytest.raises(ConfigError, match="max_span_tokens=127 plus 2 special tokens exceeds the model's 128"):
            make(model, max_span_tokens=127)
    objective, _ = make(tiny_roberta, max_span_tokens=126)
    assert objective.encoder.config.max_position_embeddings == 130
