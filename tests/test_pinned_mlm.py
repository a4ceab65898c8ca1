"""MLM's rules that its mutation run found unpinned (docs/mutation.md): the bounds of its settings and the split of
the masked tokens into [MASK] / random / kept by the two probabilities the config names."""

from __future__ import annotations

import pytest
import torch

from retromae.config import ConfigError
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import build_objective_config, objective_class
from retromae.rng import example_seeds

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


@pytest.mark.parametrize("settings, accepted", [
    ({"mask_ratio": 0.0}, False), ({"mask_ratio": 1.0}, False), ({"mask_ratio": 1.5}, False),
    ({"mask_ratio": 0.01}, True), ({"mask_ratio": 0.99}, True),
    ({"mask_token_prob": 0.0, "random_token_prob": 0.0}, True),  # every masked token kept: legal (a pure-noise check)
    ({"mask_token_prob": 1.0, "random_token_prob": 0.0}, True),
    ({"mask_token_prob": 0.0, "random_token_prob": 1.0}, True),
    ({"mask_token_prob": 0.6, "random_token_prob": 0.4}, True),  # sums to exactly 1
    ({"mask_token_prob": 0.7, "random_token_prob": 0.4}, False),  # 1.1
    ({"mask_token_prob": 1.2, "random_token_prob": 0.0}, False),
    ({"mask_token_prob": -0.1, "random_token_prob": 0.5}, False),
    ({"mask_token_prob": 0.5, "random_token_prob": -0.1}, False),
    ({"mask_token_prob": 1.5, "random_token_prob": -0.5}, False),  # sums to 1, but each must be a probability
])
def test_the_settings_are_probabilities(settings, accepted):
    if accepted:
        config = build_objective_config({"name": "mlm", **settings})
        assert all(getattr(config, k) == v for k, v in settings.items())
    else:
        with pytest.raises(ConfigError):
            build_objective_config({"name": "mlm", **settings})


@pytest.mark.parametrize("mask_prob, random_prob", [(0.5, 0.5), (0.2, 0.3)])
def test_masked_tokens_split_by_the_configured_probabilities(tiny_model, docstrings, mask_prob, random_prob):
    """Over ~thousands of masked tokens: the share turned into [MASK] is mask_token_prob, the share left as it was is
    1 - mask_token_prob - random_token_prob (a random replacement equal to the original is ~1/vocab, negligible)."""
    cfg = ModelConfig(name_or_path=str(tiny_model), dropout=0.0)
    tokenizer = load_tokenizer(cfg)
    settings = build_objective_config({"name": "mlm", "mask_token_prob": mask_prob, "random_token_prob": random_prob})
    objective = objective_class("mlm")(load_masked_lm(cfg), tokenizer, settings)
    enc = tokenizer([d["text"] for d in docstrings[:64]], truncation=True, max_length=128, padding=True,
                    return_tensors="pt")
    batch = objective.prepare({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                               "seeds": example_seeds(3, 0, torch.arange(64))})
    masked = batch["encoder_mask"]
    corrupted, original = batch["encoder_input_ids"][masked], batch["input_ids"][masked]
    assert masked.sum() > 1500
    assert (corrupted == tokenizer.mask_token_id).float().mean().item() == pytest.approx(mask_prob, abs=0.04)
    assert (corrupted == original).float().mean().item() == pytest.approx(1 - mask_prob - random_prob, abs=0.04)
    assert torch.equal(batch["encoder_input_ids"][~masked], batch["input_ids"][~masked]), "the rest untouched"
