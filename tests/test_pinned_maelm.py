"""MAE-LM (retromae/objectives/maelm.py, methods.md §1.10): rules the mutation run found unpinned. The config's
bounds; the encoder side on a family whose attention reads positions from the order of the sequence (MPNet: removed
tokens hidden, not dropped) and on one whose position ids start after the padding index (RoBERTa); the decoder's
rotary positions on a rotary encoder; padding hidden from the decoder; the removed words being whole words."""

from __future__ import annotations

import pytest
import torch

from test_more_objectives import batch_of, make
from retromae.config import ConfigError
from retromae.objectives import build_objective_config
from retromae.objectives.maelm import encode_kept
from retromae.tiny import make_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, docstrings):
    """Tiny random models (1 layer of 32) of the families the BERT fixture cannot stand for: MPNet (relative position
    bias: not packable), RoBERTa (position ids from padding_idx + 1) and EuroBERT (rotary, no position table)."""
    texts = [d["text"] for d in docstrings[:200]]
    root = tmp_path_factory.mktemp("maelm_families")
    return {family: make_tiny_model(root / family, texts, vocab_size=300, hidden=32, layers=1, heads=2,
                                    max_positions=64, family=family)
            for family in ("mpnet", "roberta", "eurobert")}


def texts(docstrings, n):
    return [d["text"] for d in docstrings[:n]]


def padded_texts(docstrings):
    """Two long texts and a short one (its first five words): rows cut at max_len, and a row with padding."""
    return [docstrings[0]["text"], docstrings[2]["text"], " ".join(docstrings[6]["text"].split()[:5])]


# ----- the config -----------------------------------------------------------------------------------------------


def test_maelm_config_refuses_a_ratio_of_0_or_1_and_zero_decoder_layers():
    """mask_ratio is in the open interval (0, 1): 0 removes nothing, 1 leaves the encoder nothing; a decoder of one
    layer is the smallest."""
    config = build_objective_config({"name": "maelm", "mask_ratio": 0.01, "decoder_layers": 1})
    assert (config.mask_ratio, config.decoder_layers) == (0.01, 1)
    assert build_objective_config({"name": "maelm", "mask_ratio": 0.99}).mask_ratio == 0.99
    for ratio in (0.0, 1.0):
        with pytest.raises(ConfigError, match=r"mask_ratio=.* must be in \(0, 1\)"):
            build_objective_config({"name": "maelm", "mask_ratio": ratio})
    with pytest.raises(ConfigError, match="decoder_layers must be >= 1"):
        build_objective_config({"name": "maelm", "decoder_layers": 0})


# ----- the encoder side ------------------------------------------------------------------------------------------


def hidden_run(objective, batch, keep, position_ids=None):
    """The Hugging Face body run on the whole rows (original ids; the given position ids, else its defaults: the
    original ones) with only the kept tokens visible to attention, zeroed where not kept: what every kept token must
    see."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    states = objective.arch.body(input_ids=batch["input_ids"], attention_mask=keep.long(), **extra).last_hidden_state
    return states * keep.unsqueeze(-1)


def test_encode_kept_hides_removed_tokens_on_relative_attention(family_models, docstrings):
    """MPNet's relative bias reads positions from the order of the sequence, so the removed tokens cannot be dropped:
    each kept token sees exactly the kept tokens at their original distances. Its states equal MPNet run on the
    whole rows with the removed tokens and padding hidden by the attention mask (position ids: MPNet's own, counted
    over the original text); zero at removed and padding positions; whatever sits at a removed position ([MASK], or
    another token), the states are the same."""
    objective, tokenizer = make(family_models["mpnet"], "maelm")
    assert not objective.arch.packable
    batch = objective.prepare(batch_of(tokenizer, padded_texts(docstrings), max_len=24))
    removed, attention = batch["removed"], batch["attention_mask"]
    assert removed.any() and not attention.all(), "removed tokens and padding both present"
    assert batch["input_ids"].shape[1] not in (1, objective.arch.hidden_size)  # L != D: a (B, 1, L) mask would not broadcast
    keep = attention.bool() & ~removed
    # MPNet numbers positions from padding_idx + 1 (its padding_idx is 1, the pad id of its checkpoints)
    padding_idx = objective.encoder.mpnet.embeddings.padding_idx
    original_positions = (padding_idx + 1 + torch.arange(attention.shape[1]))[None].expand_as(attention)
    with torch.no_grad():
        expected = hidden_run(objective, batch, keep, original_positions)
        states = objective.encode(batch)
        torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-5)
        assert not states[~keep].any()
        for replacement in (tokenizer.mask_token_id, 77):
            other = dict(batch, input_ids=batch["input_ids"].masked_fill(removed, replacement))
            torch.testing.assert_close(objective.encode(other), states, atol=1e-6, rtol=1e-6)
        # with MPNet's own pad id (the tiny tokenizer pads with 0): MPNet's default position ids would skip the
        # removed tokens, so the original positions must be given; the kept tokens see the same as above
        same = encode_kept(objective.arch, batch["input_ids"], attention, removed, pad_id=padding_idx)
        torch.testing.assert_close(same, expected, atol=1e-5, rtol=1e-5)


def test_encode_kept_packs_with_the_original_positions_after_the_padding_offset(family_models, docstrings):
    """RoBERTa is packable: the kept tokens are packed to the left, each with its original position id, which in
    RoBERTa counts from padding_idx + 1. Same states as RoBERTa run on the whole rows (its default position ids)
    with the removed tokens hidden: packing changes nothing a kept token sees."""
    objective, tokenizer = make(family_models["roberta"], "maelm")
    assert objective.arch.packable and objective.arch.position_offset() > 0
    batch = objective.prepare(batch_of(tokenizer, padded_texts(docstrings), max_len=24))
    keep = batch["attention_mask"].bool() & ~batch["removed"]
    assert batch["removed"].any()
    with torch.no_grad():
        states = objective.encode(batch)
        torch.testing.assert_close(states, hidden_run(objective, batch, keep), atol=1e-5, rtol=1e-5)


# ----- the decoder -----------------------------------------------------------------------------------------------


def test_reinsertion_decoder_on_a_rotary_encoder_rotates_by_the_original_positions(family_models, docstrings):
    """EuroBERT has no position table: the decoder's attention is rotary, with position ids 0 .. L-1 of the
    full-length sequence. Its output equals the stack run here on (encoder state where kept, the [MASK] embedding
    where removed) with those positions and the real tokens visible, and differs from the stack without positions.
    One decoder layer (the decoder must not read a second one)."""
    objective, tokenizer = make(family_models["eurobert"], "maelm", decoder_layers=1)
    stack = objective.decoder.stack
    assert len(stack.layers) == 1 and stack.layers[0].attention.rotary is not None
    batch = objective.prepare(batch_of(tokenizer, texts(docstrings, 2), max_len=20))
    removed, attention = batch["removed"], batch["attention_mask"]
    length = attention.shape[1]
    assert removed.any() and length != objective.arch.hidden_size
    with torch.no_grad():
        states = objective.encode(batch)
        decoded = objective.decoder(objective.arch, states, removed, attention, tokenizer.mask_token_id)
        mask_vector = objective.encoder.get_input_embeddings().weight[tokenizer.mask_token_id]  # EuroBERT: no positions, no norm
        x = torch.where(removed.unsqueeze(-1), mask_vector, states)
        visible = attention.bool()[:, None, :]
        rotated = stack(x, visible, torch.arange(length))
        unrotated = stack(x, visible, None)
    torch.testing.assert_close(decoded, rotated)
    assert (decoded - unrotated).abs().max() > 1e-4


def test_reinsertion_decoder_output_of_a_text_is_the_same_alone_and_in_a_padded_batch(tiny_model, docstrings):
    """Padding never reaches the decoder: a short text's decoder states, in a batch padded to a longer text's length,
    equal its states decoded alone (no padding), at its real positions."""
    objective, tokenizer = make(tiny_model, "maelm")
    batch = objective.prepare(batch_of(tokenizer, padded_texts(docstrings), max_len=32))
    lengths = batch["attention_mask"].sum(-1)
    short = int(lengths.argmin())
    n = int(lengths[short])
    assert n < batch["attention_mask"].shape[1], "the shortest text is padded"
    mask_id = tokenizer.mask_token_id
    with torch.no_grad():
        states = objective.encode(batch)
        together = objective.decoder(objective.arch, states, batch["removed"], batch["attention_mask"], mask_id)
        alone = objective.decoder(objective.arch, states[short:short + 1, :n], batch["removed"][short:short + 1, :n],
                                  batch["attention_mask"][short:short + 1, :n], mask_id)
    torch.testing.assert_close(together[short, :n], alone[0], atol=1e-5, rtol=1e-5)


# ----- prepare: the removed tokens are whole words ------------------------------------------------------------------


def test_maelm_prepare_groups_word_pieces_into_words_and_removes_whole_words(tiny_model, docstrings):
    """The prepared batch's `words` numbers each row's words (0, 1, ...) over its ordinary tokens, -1 elsewhere
    ([CLS], [SEP], padding); a WordPiece token starting with ## continues the word before it. Checked against that
    grouping done here from the token strings; a word is removed whole or not at all."""
    objective, tokenizer = make(tiny_model, "maelm", mask_ratio=0.5)
    batch = objective.prepare(batch_of(tokenizer, texts(docstrings, 4), max_len=32))
    special = set(tokenizer.all_special_ids)
    pieces = 0
    for b in range(4):
        expected, word = [], -1
        for i, token_id in enumerate(batch["input_ids"][b].tolist()):
            if token_id in special or not batch["attention_mask"][b, i]:
                expected.append(-1)
                continue
            token = tokenizer.convert_ids_to_tokens(token_id)
            continues = token.startswith("##") and expected and expected[-1] >= 0
            pieces += bool(continues)
            word = word if continues else word + 1
            expected.append(word)
        assert batch["words"][b].tolist() == expected
        words = torch.tensor(expected)
        for w in range(word + 1):
            flags = batch["removed"][b][words == w]
            assert flags.all() or not flags.any(), (b, w)
        assert not batch["removed"][b][words < 0].any()
    assert pieces > 0, "some words have several pieces"


def test_reinsertion_decoder_positions_are_made_on_the_batchs_device(family_models, docstrings):
    """The rotary position ids are made where the decoder's inputs live (ids made on the CPU for a batch on a GPU
    would fail there): the objective and the batch on PyTorch's `meta` device (no data), the decoder runs there."""
    objective, tokenizer = make(family_models["eurobert"], "maelm", decoder_layers=1)
    batch = objective.prepare(batch_of(tokenizer, texts(docstrings, 2), max_len=12))
    objective.to("meta")
    removed, attention = batch["removed"].to("meta"), batch["attention_mask"].to("meta")
    states = torch.zeros(*attention.shape, objective.arch.hidden_size, device="meta")
    decoded = objective.decoder(objective.arch, states, removed, attention, tokenizer.mask_token_id)
    assert decoded.device.type == "meta" and decoded.shape == states.shape
