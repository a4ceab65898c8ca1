"""TSDAE's rules that its mutation run found unpinned (docs/mutation.md): the deletion ratio's bounds, the decoder as
the encoder's own layers under a causal mask on a rotary, pre-norm, sliding-window family (ModernBERT), the
recomputation of its layers in the backward pass, and the name its loss is counted under."""

from __future__ import annotations

import pytest
import torch

from retromae.config import ConfigError
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import build_objective_config, objective_class
from retromae.rng import example_seeds

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


@pytest.fixture(scope="module")
def modernbert_model(docstrings, tmp_path_factory):
    """A tiny ModernBERT: rotary positions, pre-norm layers, every third layer global, the others a 16-token window."""
    from retromae.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tsdae_modernbert"), [d["text"] for d in docstrings],
                           family="modernbert")


def make(model_dir, **settings):
    cfg = ModelConfig(name_or_path=str(model_dir), dropout=0.0)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    objective = objective_class("tsdae")(load_masked_lm(cfg), tokenizer,
                                         build_objective_config({"name": "tsdae", **settings}))
    return objective.eval(), tokenizer


def prepared(objective, tokenizer, texts, max_len):
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    return objective.prepare({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "seeds": example_seeds(5, 0, torch.arange(len(texts)))})


@pytest.mark.parametrize("ratio, accepted", [(0.0, True), (0.99, True), (1.0, False), (1.5, False), (-0.1, False)])
def test_the_deletion_ratio_is_a_probability_below_one(ratio, accepted):
    """0 (no noise) is allowed; 1 would delete every word (TSDAE keeps at least one, so the ratio would lie)."""
    settings = {"name": "tsdae", "deletion_ratio": ratio}
    if accepted:
        assert build_objective_config(settings).deletion_ratio == ratio
    else:
        with pytest.raises(ConfigError, match="deletion_ratio"):
            build_objective_config(settings)


def test_on_modernbert_the_decoder_is_the_encoders_own_layers_under_a_causal_mask(modernbert_model, docstrings):
    """With the new cross-attention blocks silenced (pre-norm: x + 0), decoder position i must be what the
    unchanged ModernBERT computes at the last position of the prefix ids[:i+1] run alone: the same rotary angles,
    the same sliding windows (the text is longer than the 16-token window) and its final norm."""
    objective, tokenizer = make(modernbert_model)
    with torch.no_grad():
        for cross in objective.cross_attention:
            for parameter in cross.attention.output.parameters():
                parameter.zero_()
    batch = prepared(objective, tokenizer, [docstrings[0]["text"]], max_len=48)
    ids = batch["input_ids"][:, :-1]
    assert batch["attention_mask"].all() and ids.shape[1] > 2 * objective.encoder.config.sliding_window
    body = objective.encoder.model
    with torch.no_grad():
        decoded = objective.decode(torch.randn(1, objective.arch.hidden_size), batch)[0]
        for i in range(ids.shape[1]):
            expected = body(input_ids=ids[:, : i + 1]).last_hidden_state[0, -1]
            torch.testing.assert_close(decoded[i], expected, rtol=1e-4, atol=1e-4, msg=f"position {i}")


@pytest.mark.parametrize("recompute, calls_per_layer", [(False, 1), (True, 2)])
def test_decoder_checkpointing_runs_each_layer_again_in_the_backward_pass(tiny_model, docstrings, recompute,
                                                                          calls_per_layer):
    objective, tokenizer = make(tiny_model, decoder_checkpointing=recompute)
    calls = []
    layer_function = objective.decoder_layer
    objective.decoder_layer = lambda *args: calls.append(1) or layer_function(*args)
    batch = prepared(objective, tokenizer, [d["text"] for d in docstrings[:2]], max_len=24)
    objective(batch)["decoder"].backward()
    assert len(calls) == calls_per_layer * objective.arch.num_layers


def test_the_loss_is_named_as_its_items_are_counted(tiny_model, docstrings):
    """The trainer divides each named loss by the count of the same name: one name, `decoder`, on both sides."""
    objective, tokenizer = make(tiny_model)
    batch = prepared(objective, tokenizer, [d["text"] for d in docstrings[:2]], max_len=24)
    with torch.no_grad():
        losses = objective(batch)
    assert set(losses) == set(objective.num_items(batch)) == {"decoder"}
    # the count: every real position after the first is a target (hand count from the attention mask)
    assert objective.num_items(batch)["decoder"].item() == int(batch["attention_mask"][:, 1:].sum())


def test_the_causal_visibility_is_made_on_the_device_of_its_mask():
    """Row i sees columns j <= i that are real (by hand for one row of 4 with 1 pad); made where the mask lives: the
    meta device stands in for a GPU here (a tensor left on the CPU cannot be combined with it)."""
    from retromae.objectives.tsdae import causal_visibility

    visible = causal_visibility(torch.tensor([[1, 1, 1, 0]]))
    assert visible[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    on_meta = causal_visibility(torch.ones(2, 5, dtype=torch.long, device="meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 5, 5)
