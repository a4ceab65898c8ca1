"""LexMAE rules pinned from the mutation run's survivors (docs/mutation.md; methods.md §1.13): the config bounds, the
decoder's re-masking (strictly fresh draws below (0.5 - 0.3) / 0.7), the replacement probabilities of both inputs,
whole-word masking, the loss weight, the decoder's head and loss computed by hand, the decoder's padding mask and
rotary positions, the bottleneck in half precision, and every tensor made on the input's device."""

from __future__ import annotations

import math

import pytest
import torch

from test_more_objectives import batch_of, make
from retromae.config import ConfigError
from retromae.objectives import build_objective_config
from retromae.objectives.lexmae import decoder_remask, exact_count_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models

TEXTS = ["open the file and read all of its lines into a list", "close the stream",
         "return the number of items in the queue, waiting if it is empty"]


@pytest.fixture(scope="module")
def tiny_modernbert(tmp_path_factory, docstrings):
    """A rotary, pre-norm encoder: LexMAE's decoder, shaped like it, has rotary attention."""
    from retromae.matrix import tiny_family_model

    return tiny_family_model(tmp_path_factory.mktemp("lexmae_modernbert"), "modernbert",
                             [d["text"] for d in docstrings[:160]])


def decoder_output(objective, batch):
    """The decoder's output states, caught on their way out during forward()."""
    seen = {}
    hook = objective.decoder.register_forward_hook(lambda module, args, out: seen.update(out=out.detach()))
    try:
        with torch.no_grad():
            losses = objective(batch)
    finally:
        hook.remove()
    return seen["out"], losses


# ----- configuration bounds and the loss weight -----------------------------------------------------------------


def test_config_bounds_decoder_ratio_in_mask_ratio_to_1_and_one_decoder_layer():
    """mask_ratio <= decoder_mask_ratio < 1 (equal accepted: the decoder re-masks nothing fresh; 1 and beyond
    refused); decoder_layers >= 1 (1 accepted, 0 refused)."""
    build_objective_config({"name": "lexmae", "mask_ratio": 0.3, "decoder_mask_ratio": 0.3})
    build_objective_config({"name": "lexmae", "decoder_mask_ratio": 0.99})
    for bad in (1.0, 1.5, 0.2):  # 0.2 < mask_ratio 0.3
        with pytest.raises(ConfigError, match="decoder_mask_ratio"):
            build_objective_config({"name": "lexmae", "decoder_mask_ratio": bad})
    assert build_objective_config({"name": "lexmae", "decoder_layers": 1}).decoder_layers == 1
    with pytest.raises(ConfigError, match="decoder_layers must be >= 1"):
        build_objective_config({"name": "lexmae", "decoder_layers": 0})


def test_loss_weights_are_the_configured_ones_by_loss_name(tiny_model):
    """L = mlm + decoder_weight * decoder: the trainer reads loss_weights.get(name, 1.0) with forward()'s names."""
    objective, _ = make(tiny_model, "lexmae", decoder_weight=0.5)
    assert {n: objective.loss_weights.get(n, 1.0) for n in ("mlm", "decoder")} == {"mlm": 1.0, "decoder": 0.5}


# ----- masks ----------------------------------------------------------------------------------------------------


def test_equal_ratios_add_no_fresh_position_even_where_the_draw_is_0():
    """Fresh positions are taken with probability p = (d - e) / (1 - e): u < p for u uniform on [0, 1). With d = e,
    p = 0 and nothing is added, even at a position whose draw u is exactly 0 (u <= p would take it). Seed 529796,
    position 54 of the DECODER_MASK stream draws 0.0 (found by a search over seeds with retromae.rng.uniform)."""
    from retromae.masking import DECODER_MASK
    from retromae.rng import uniform

    seeds = torch.tensor([529796])
    assert uniform(seeds, DECODER_MASK, torch.arange(64)[None])[0, 54].item() == 0.0
    maskable = torch.ones(1, 64, dtype=torch.bool)
    encoder = torch.zeros(1, 64, dtype=torch.bool)
    encoder[0, :3] = True
    assert torch.equal(decoder_remask(encoder, maskable, 0.3, 0.3, seeds), encoder)


def test_masks_are_made_on_the_input_device():
    """Users train on GPUs: the positions drawn must be on the input's device. The meta device stands in for a GPU
    here: mixing a CPU tensor into a meta computation raises."""
    meta = torch.device("meta")
    maskable = torch.ones(2, 12, dtype=torch.bool, device=meta)
    seeds = torch.arange(2, device=meta)
    mask = exact_count_mask(maskable, 0.3, seeds, 1)
    assert mask.device == meta and mask.shape == (2, 12)
    remasked = decoder_remask(mask, maskable, 0.3, 0.5, seeds)
    assert remasked.device == meta and remasked.shape == (2, 12)


@pytest.mark.parametrize("mask_prob, random_prob", [(1.0, 0.0), (0.0, 1.0)])
def test_replacement_probabilities_of_both_inputs(tiny_model, mask_prob, random_prob):
    """mask_token_prob / random_token_prob apply to the encoder's and the decoder's input alike: at (1, 0) every
    masked position is [MASK]; at (0, 1) none is, and nearly all hold another token (a random ordinary token equals
    the original with probability 1 / (ordinary vocabulary), under 1%)."""
    objective, tokenizer = make(tiny_model, "lexmae", mask_token_prob=mask_prob, random_token_prob=random_prob)
    batch = objective.prepare(batch_of(tokenizer, TEXTS * 4))
    ids = batch["input_ids"]
    for inputs, mask in (("encoder_input_ids", "encoder_mask"), ("decoder_input_ids", "decoder_mask")):
        got, where = batch[inputs], batch[mask]
        assert where.sum() > 40
        is_mask = got[where] == tokenizer.mask_token_id
        if mask_prob == 1.0:
            assert is_mask.all(), inputs
        else:
            assert not is_mask.any(), inputs
            changed = (got[where] != ids[where]).float().mean().item()
            assert changed > 0.9, (inputs, changed)
        assert torch.equal(got[~where], ids[~where]), inputs


def test_whole_word_masks_whole_words_at_the_ratio(tiny_model, tiny_tokenizer):
    """whole_word: true masks whole words (every piece of a word or none) for round(0.3 n) tokens or slightly more
    (the last word taken may overshoot by its length - 1); the decoder's mask still contains the encoder's."""
    objective, tokenizer = make(tiny_model, "lexmae", whole_word=True)
    texts = ["tokenization of unbelievably long identifiers", "serialization deserialization roundtrip"] + TEXTS
    batch = objective.prepare(batch_of(tokenizer, texts))
    ids, mask = batch["input_ids"], batch["encoder_mask"]
    specials = set(tokenizer.all_special_ids)
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("##") for i in ids.flatten().tolist())
    for b in range(ids.shape[0]):
        tokens = tokenizer.convert_ids_to_tokens(ids[b].tolist())
        words, n = [], 0  # by hand: a word is a token not starting with ## plus its ## pieces
        for i, (t, t_id) in enumerate(zip(tokens, ids[b].tolist())):
            if t_id in specials:
                continue
            n += 1
            if t.startswith("##") and words:
                words[-1].append(i)
            else:
                words.append([i])
        masked = {i for i in range(ids.shape[1]) if mask[b, i]}
        for word in words:
            assert set(word) <= masked or not set(word) & masked, (b, word)
        target = max(1, round(0.3 * n))
        longest = max(len(w) for w in words)
        assert target <= len(masked) <= target + longest - 1, (b, len(masked), n)
    assert not (mask & ~batch["decoder_mask"]).any()
    assert torch.equal(batch["words"].ge(0), batch["lexicon_positions"])


# ----- the decoder ----------------------------------------------------------------------------------------------


def test_decoder_head_and_loss_by_hand(tiny_model):
    """One decoder layer (the smallest allowed). Its head: logits = LayerNorm(gelu(x W^T + c)) W_e^T + bias, the
    LayerNorm with the encoder's eps (1e-12 for BERT), W_e the word embeddings; L_dec = sum over the decoder-masked
    positions of -log softmax(logits)[original token]."""
    objective, tokenizer = make(tiny_model, "lexmae", decoder_layers=1)
    assert len(objective.decoder.layers) == 1
    batch = objective.prepare(batch_of(tokenizer, TEXTS))
    with torch.no_grad():
        # dense weights 20x smaller: the LayerNorm's input variance (~1e-5) is near eps 1e-5, so the eps shows
        objective.decoder_transform[0].weight.mul_(0.05)
        objective.decoder_bias.normal_(std=0.1)
    x, losses = decoder_output(objective, batch)
    dense, norm = objective.decoder_transform[0], objective.decoder_transform[2]
    assert objective.encoder.config.hidden_act == "gelu" and objective.encoder.config.layer_norm_eps == 1e-12
    with torch.no_grad():
        h = x @ dense.weight.T + dense.bias
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # gelu (erf form)
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-12) * norm.weight + norm.bias
        logits = h @ objective.arch.word_embeddings.weight.T + objective.decoder_bias
        log_probs = logits - torch.logsumexp(logits, -1, keepdim=True)
        expected = 0.0
        for b, i in batch["decoder_mask"].nonzero().tolist():
            expected -= log_probs[b, i, batch["input_ids"][b, i]].item()
    assert losses["decoder"].item() == pytest.approx(expected, rel=1e-6)


def test_decoder_reads_only_real_tokens(tiny_model):
    """Plain self-attention over the real tokens: a short text's decoder states are the same padded in a batch
    with a longer one as alone (its seed the same)."""
    objective, tokenizer = make(tiny_model, "lexmae")
    both = batch_of(tokenizer, [TEXTS[0], TEXTS[1]])
    alone = batch_of(tokenizer, [TEXTS[1]], first_index=1)
    n = int(alone["attention_mask"].sum())
    assert int(both["attention_mask"][1].sum()) == n < both["input_ids"].shape[1]
    padded, _ = decoder_output(objective, objective.prepare(both))
    single, _ = decoder_output(objective, objective.prepare(alone))
    torch.testing.assert_close(padded[1, :n], single[0, :n], rtol=1e-5, atol=1e-5)


def test_rotary_decoder_reads_positions_0_to_L(tiny_modernbert):
    """On a rotary encoder the decoder's attention rotates queries and keys by the positions 0 .. L-1; without
    positions its output would differ. The positions are made on the input's device (meta stands in for a GPU)."""
    objective, tokenizer = make(tiny_modernbert, "lexmae", decoder_layers=1)
    assert objective.decoder.layers[0].attention.rotary is not None
    batch = objective.prepare(batch_of(tokenizer, TEXTS[:2], max_len=20))
    mask = batch["attention_mask"]
    objective.decoder.double()  # float64: the rotation's effect at initialisation is small, but not zero
    x = torch.randn(2, mask.shape[1], objective.arch.hidden_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    assert x.shape[1] != x.shape[2]
    with torch.no_grad():
        got = objective.decode(x, batch)
        expected = objective.decoder(x, mask.bool()[:, None, :], torch.arange(x.shape[1]))
        unrotated = objective.decoder(x, mask.bool()[:, None, :], None)
        hidden_padding = objective.decoder(x, None, torch.arange(x.shape[1]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (got - unrotated).abs().max() > 1e-6
    assert (got[1] - hidden_padding[1]).abs().max() > 1e-6, "text 1 is padded"
    objective.decoder.to("meta")
    on_meta = objective.decode(x.to("meta"), {"attention_mask": mask.to("meta")})
    assert on_meta.device.type == "meta" and on_meta.shape == x.shape


# ----- dtypes ---------------------------------------------------------------------------------------------------


def test_bottleneck_of_a_half_precision_model(tiny_model):
    """bf16 weights: the lexicon distribution a is computed in fp32 (full precision), and b = a W_e in the
    embeddings' dtype, equal to the fp32 product of the same a and W_e up to bf16 rounding."""
    objective, tokenizer = make(tiny_model, "lexmae")
    objective.to(torch.bfloat16)
    batch = objective.prepare(batch_of(tokenizer, TEXTS))
    with torch.no_grad():
        hidden = objective.encode(batch)
        b = objective.bottleneck(hidden, batch)
        logits = objective.arch.head(hidden).float()
        logits = logits.masked_fill(~batch["lexicon_positions"][..., None], float("-inf")).amax(1)
        a = logits.softmax(-1)
        expected = a @ objective.arch.word_embeddings.weight.float()
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), expected, rtol=2e-2, atol=2e-3)


def test_decoder_inputs_take_the_embedding_layers_dtype(tiny_model):
    """Position 0 holds b cast to the dtype of the embedding layer's output (the decoder's weights'), whatever b's
    own dtype: a float64 b on a float32 model gives float32 inputs, position 0 = b rounded to float32."""
    objective, tokenizer = make(tiny_model, "lexmae")
    batch = objective.prepare(batch_of(tokenizer, TEXTS))
    b = torch.randn(3, objective.arch.word_embeddings.embedding_dim, dtype=torch.float64)
    with torch.no_grad():
        x = objective.decoder_inputs(b, batch)
    assert x.dtype == torch.float32
    assert torch.equal(x[:, 0], b.float())
