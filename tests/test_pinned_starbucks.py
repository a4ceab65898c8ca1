"""Starbucks SMAE (methods.md §1.11), rules pinned by hand on tiny inputs: the config's bounds, the replacement
probabilities of both inputs, the padded batch read through its attention mask, each pair recomputed in the backward
pass, the decoder sharing the model's config, and the head of a family without a transform (EuroBERT: the [CLS]
padded with zeros, the projection's weight sliced)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retromae.config import ConfigError
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import build_objective_config, objective_class
from retromae.objectives.starbucks import SlicedProjection, first_linear
from retromae.rng import example_seeds


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


def make(model_dir, **settings):
    cfg = ModelConfig(name_or_path=str(model_dir), dropout=0.0)
    torch.manual_seed(0)
    objective = objective_class("starbucks")(load_masked_lm(cfg), load_tokenizer(cfg),
                                             build_objective_config({"name": "starbucks", **settings}))
    return objective.eval(), load_tokenizer(cfg)


def batch_of(tokenizer, texts, max_len=48):
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "seeds": example_seeds(5, 0, torch.arange(len(texts)))}


# ----- the config's bounds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"mask_ratio": 0.3, "decoder_mask_ratio": 0.3},  # the decoder's mask may equal the encoder's: [mask_ratio, 1)
    {"decoder_mask_ratio": 0.99},
    {"pairs": [[1, 1]]},  # the smallest positive pair
])
def test_config_accepts_the_bounds(settings):
    build_objective_config({"name": "starbucks", **settings})


@pytest.mark.parametrize("settings, key", [
    ({"decoder_mask_ratio": 1.0}, "decoder_mask_ratio"),  # 1 is outside [mask_ratio, 1)
    ({"decoder_mask_ratio": 1.5}, "decoder_mask_ratio"),
    ({"mask_ratio": 0.3, "decoder_mask_ratio": 0.29}, "decoder_mask_ratio"),  # the encoder's mask must nest inside
    ({"pairs": []}, "pairs"),
    ({"pairs": [[0, 16]]}, "pairs"),  # a layer that is not positive
    ({"pairs": [[1, 0]]}, "pairs"),  # a dimension that is not positive
    ({"pairs": [[1, 16, 2]]}, "pairs"),  # three numbers, all positive: still not a [layer, dim] pair
    ({"pairs": [[16]]}, "pairs"),
    ({"pairs": [[1, 16], [1, 16]]}, "pairs"),
])
def test_config_refuses_out_of_bounds(settings, key):
    with pytest.raises(ConfigError, match=key):
        build_objective_config({"name": "starbucks", **settings})


# ----- both inputs are corrupted with the configured replacement probabilities -------------------------------


@pytest.mark.parametrize("mask_prob, random_prob", [(1.0, 0.0), (0.0, 1.0)])
def test_both_inputs_use_the_configured_replacement_probabilities(tiny_model, docstrings, mask_prob, random_prob):
    """mask_token_prob 1: every masked position of each input reads [MASK]; random_token_prob 1: none does, each
    reads a random ordinary token (the original back only by the odd chance of drawing it, ~1/vocabulary);
    unmasked positions are the text itself."""
    objective, tokenizer = make(tiny_model, pairs=[[1, 16]], mask_token_prob=mask_prob,
                                random_token_prob=random_prob)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:8]]))
    ids, mask_id = batch["input_ids"], tokenizer.mask_token_id
    for side in ("encoder", "decoder"):
        mask, corrupted = batch[f"{side}_mask"], batch[f"{side}_input_ids"]
        assert mask.sum() >= 20, side
        assert torch.equal(corrupted[~mask], ids[~mask]), side
        if mask_prob == 1.0:
            assert (corrupted[mask] == mask_id).all(), side
        else:
            assert not (corrupted[mask] == mask_id).any(), side
            changed = (corrupted[mask] != ids[mask]).float().mean().item()
            assert changed > 0.9, (side, changed)  # kept originals would be 1 - random_prob = 0


# ----- a padded batch: the encoder reads the attention mask -------------------------------------------------


def test_a_padded_batch_is_read_under_the_attention_mask(tiny_model):
    """Texts of different lengths (padding in the short rows): what the pair's heads read is BERT's layer-1 states
    under the attention mask, cut to the first 16 coordinates (at the encoder-masked tokens for the MLM, at [CLS]
    for the decoder's input), and the MLM by hand from them with the dense weight cut to its first 16 columns."""
    objective, tokenizer = make(tiny_model, pairs=[[1, 16]])
    texts = ["return the list of lines read from the file and close the stream when the reader is done with it"
             " so that the file handle is released",
             "open a file for reading and writing",
             "close the socket and flush its buffer"]
    batch = objective.prepare(batch_of(tokenizer, texts))
    attention, enc = batch["attention_mask"], batch["encoder_mask"]
    assert (attention[1:] == 0).any() and enc[1:].any(), "the short rows are padded and have masked tokens"
    assert enc.sum() != len(texts)
    model = objective.encoder
    predictions = model.cls.predictions
    read = []  # what the head's transform reads: MLM (masked tokens, 16), [CLS] (3, 16), decoder output (.., 32)
    hook = predictions.transform.register_forward_pre_hook(lambda module, args: read.append(args[0].clone()))
    with torch.no_grad():
        losses = objective(batch)
        hook.remove()
        states = model.bert(input_ids=batch["encoder_input_ids"], attention_mask=attention,
                            output_hidden_states=True).hidden_states
        x = states[1][enc][:, :16]
        t = predictions.transform
        logits = predictions.decoder(t.LayerNorm(F.gelu(x @ t.dense.weight[:, :16].T + t.dense.bias)))
        expected = F.cross_entropy(logits, batch["input_ids"][enc], reduction="sum")
    (mlm_input,) = [r for r in read if r.shape == x.shape]
    (cls_input,) = [r for r in read if r.shape == (len(texts), 16)]
    torch.testing.assert_close(mlm_input, x)  # padding attended to moves the padded rows' states by ~1e-2
    torch.testing.assert_close(cls_input, states[1][:, 0, :16])
    assert losses["mlm_1x16"].item() == pytest.approx(expected.item(), rel=1e-5)


# ----- each pair recomputed in the backward pass ----------------------------------------------------------------


@pytest.mark.parametrize("settings, runs", [({}, 2), ({"pair_checkpointing": False}, 1)])
def test_each_pair_is_recomputed_in_the_backward_pass(tiny_model, docstrings, settings, runs):
    """pair_checkpointing (on by default) keeps only a pair's inputs and runs the pair again in the backward pass:
    two runs of each pair's heads and decoder per step (forward + backward), one without it."""
    objective, tokenizer = make(tiny_model, pairs=[[1, 16], [2, 32]], **settings)
    objective.train()
    calls = []
    original = objective.pair_losses
    objective.pair_losses = lambda *args: calls.append(args[1]) or original(*args)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=16))
    sum(objective(batch).values()).backward()
    assert sorted(calls) == [16] * runs + [32] * runs


# ----- the decoder: a copy of layer 0 that shares the model's config ------------------------------------------


def test_decoder_copy_shares_the_model_config(tiny_model):
    """The decoder's weights are copied, its config is the model's own object (the attention implementation set
    on the model reaches the decoder)."""
    objective, _ = make(tiny_model, pairs=[[1, 16]])
    holders = [m for m in objective.decoder.modules() if hasattr(m, "config")]
    assert holders and all(m.config is objective.encoder.config for m in holders)
    layer0 = objective.arch.layers[0]
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(objective.decoder.parameters(), layer0.parameters()))


# ----- heads without a transform: the projection read sliced, the [CLS] padded ----------------------------------


def test_sliced_projection_reads_the_first_columns_of_the_same_weight():
    """W = [[1, 2, 3], [4, 5, 6]], b = [10, 20], dim 2, x = [1, 1]: x W[:, :2]^T + b = [1+2+10, 4+5+20] = [13, 29];
    the gradient reaches the first two columns of W (x) and b (1), never the third column."""
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        linear.bias.copy_(torch.tensor([10.0, 20.0]))
    sliced = SlicedProjection(linear, 2)
    assert sliced.out_features == 2 and sliced.bias is linear.bias
    out = sliced(torch.tensor([[1.0, 1.0]]))
    assert out.tolist() == [[13.0, 29.0]]
    out.sum().backward()
    assert linear.weight.grad.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    assert linear.bias.grad.tolist() == [1.0, 1.0]


def test_first_linear_names_the_first_linear_layer_or_none():
    assert first_linear(nn.Sequential(nn.GELU(), nn.Linear(2, 2), nn.Linear(2, 2))) == "1"
    assert first_linear(nn.Identity()) is None
    assert first_linear(nn.Sequential(nn.GELU(), nn.LayerNorm(2))) is None


@pytest.fixture(scope="module")
def eurobert(tmp_path_factory, docstrings):
    from retromae.matrix import tiny_family_model

    return tiny_family_model(tmp_path_factory.mktemp("eurobert"), "eurobert", [d["text"] for d in docstrings[:200]])


def test_head_without_transform_slices_the_projection_and_pads_the_cls(eurobert):
    """EuroBERT's head is its projection alone (32 -> vocabulary, no bias): a pair's MLM head reads x W[:, :dim]^T,
    and its truncated [CLS] is brought to the full width with zeros (slicing an identity)."""
    objective, _ = make(eurobert, pairs=[[1, 16]])
    projection = objective.arch.head.projection
    assert first_linear(objective.arch.head.transform) is None and projection.bias is None
    dim = 3
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 2.0]])
    w = projection.weight.detach()
    expected = torch.stack([sum(x[i, j] * w[:, j] for j in range(dim)) for i in range(2)])  # x W[:, :3]^T
    head = objective.truncated_head(dim)
    logits = head(x)
    torch.testing.assert_close(logits, expected)
    logits.sum().backward()
    assert projection.weight.grad[:, dim:].abs().max() == 0 and projection.weight.grad[:, :dim].abs().max() > 0
    padded = objective.truncated_cls(x, dim)
    assert padded.shape == (2, 32)
    assert padded[:, :dim].tolist() == x.tolist() and padded[:, dim:].abs().max() == 0
