"""RetroMAE's rules pinned where earlier tests left them loose: the config's boundaries, PMI scores and corpus
statistics by hand, the rotary pre-norm decoder (a tiny ModernBERT) written out by hand for enhanced and basic
decoding, in one block of rows and in several, the activation checkpointing of several blocks, and the per-row
masks of a block of rows."""

import math

import pytest
import torch
import torch.nn.functional as F

from retromae.config import ConfigError
from retromae.objectives import build_objective_config
from retromae.objectives import retromae as module
from retromae.objectives.retromae import RetroMAE, pmi_word_scores
from retromae.rng import example_seeds

pytestmark = pytest.mark.usefixtures("one_thread")

THETA = 160000.0  # ModernBERT's global layers rotate with theta = 160,000 (its config); the decoder takes that one
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Return the sum of a and b.", "Short."]


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory, docstrings):
    from retromae.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("pinned_modernbert"), [d["text"] for d in docstrings[:80]],
                           vocab_size=300, hidden=16, layers=1, heads=2, max_positions=64, family="modernbert")


def build(model_dir, **settings):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    config = build_objective_config({"name": "retromae", **settings})
    return RetroMAE(AutoModelForMaskedLM.from_pretrained(model_dir), tokenizer, config).eval(), tokenizer


def raw_batch(tokenizer, texts=TEXTS, max_len=16):
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "seeds": example_seeds(3, 0, torch.arange(len(texts)))}


# ----- config boundaries -----------------------------------------------------------------------------------------


def test_config_boundaries():
    def config(**settings):
        return build_objective_config({"name": "retromae", **settings})

    assert config(decoder_mask_ratio=0.0).decoder_mask_ratio == 0.0  # [0, 1): 0 is allowed
    for bad in (1.0, 1.5):
        with pytest.raises(ConfigError, match="decoder_mask_ratio"):
            config(decoder_mask_ratio=bad)
    with pytest.raises(ConfigError, match="pmi_floor"):
        config(pmi_floor=0.0)
    assert config(pmi_floor=1e-6).pmi_floor == 1e-6
    assert config(removal_decoder_layers=1).removal_decoder_layers == 1
    with pytest.raises(ConfigError, match="removal_decoder_layers"):
        config(removal_decoder_layers=0)
    # DupMAE pools over every position with bow_positions=all: removed words have no encoder state to pool
    with pytest.raises(ConfigError, match="bow_positions=unmasked"):
        build_objective_config({"name": "dupmae", "encoder_masking": "remove", "bow_positions": "all"})
    kept = build_objective_config({"name": "dupmae", "encoder_masking": "remove", "bow_positions": "unmasked"})
    assert kept.encoder_masking == "remove"


# ----- PMI by hand -----------------------------------------------------------------------------------------------


def test_pmi_scores_count_each_text_on_its_own_and_a_one_token_text_by_hand():
    """tf / |d| is counted per text: a text with one ordinary token has |d| = 1 (not the batch's token count)."""
    ids = torch.tensor([[0, 5, 1, 4, 4], [0, 6, 7, 6, 1]])  # 0 [CLS], 1 [SEP], 4 [PAD]
    words = torch.tensor([[-1, 0, -1, -1, -1], [-1, 0, 1, 2, -1]])
    log_share = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.01, 0.1, 0.001]))
    scores = pmi_word_scores(ids, words, log_share, floor=0.1)
    a = math.log(1 / 1) - math.log(0.01)  # text 0: token 5 once in 1 token
    six, seven = math.log(2 / 3) - math.log(0.1), math.log(1 / 3) - math.log(0.001)  # text 1: 6 twice, 7 once in 3
    assert scores[0].tolist() == pytest.approx([a, 0.1, 0.1, 0.1, 0.1], rel=1e-5)
    assert scores[1].tolist() == pytest.approx([six, seven, six, 0.1, 0.1], rel=1e-5)


def test_corpus_statistics_take_unseen_tokens_as_seen_once_and_stay_out_of_checkpoints(tiny_model):
    objective, tokenizer = build(tiny_model, decoder_masking="pmi")
    keys = set(objective.state_dict())
    objective.attach_corpus_statistics(torch.tensor([0, 1, 5]), 1)
    share = objective._log_collection_share
    assert share.shape == (len(tokenizer),)
    # log(cf / |C|) with |C| = 1: counts 0 and 1 -> log 1, 5 -> log 5, ids past the counts -> log 1
    assert share[:3].tolist() == pytest.approx([0.0, 0.0, math.log(5)], abs=1e-6)
    assert share[3:].abs().max().item() == 0.0
    objective.attach_corpus_statistics(torch.tensor([2, 1]), 0)  # |C| = 0 is taken as 1
    assert objective._log_collection_share[:2].tolist() == pytest.approx([math.log(2), 0.0], abs=1e-6)
    assert set(objective.state_dict()) == keys, "the statistics are not saved with the weights"


def test_pmi_chance_is_computed_once_in_prepare_and_is_what_rows_hide_by(tiny_model):
    objective, tokenizer = build(tiny_model, decoder_masking="pmi")
    objective.attach_corpus_statistics(torch.arange(len(tokenizer)) + 1, 10 * len(tokenizer))
    batch = objective.prepare(raw_batch(tokenizer))
    words = batch["words"]
    ordinary = words >= 0
    lengths = torch.stack([(words == w).sum(-1) for w in range(words.shape[1])], -1)  # tokens of each word
    # the expected hidden share is the decoder ratio: sum_w chance_w * |w| = 0.5 x the text's ordinary tokens
    expected = [0.5 * n for n in ordinary.sum(-1).tolist()]
    assert (batch["word_chance"] * lengths).sum(-1).tolist() == pytest.approx(expected, rel=1e-5)
    rows = torch.arange(2, 6)
    without = {k: v for k, v in batch.items() if k != "word_chance"}
    assert torch.equal(objective.visibility(without, rows), objective.visibility(batch)[:, rows])
    eye = torch.eye(words.shape[1], dtype=torch.bool)
    real = batch["attention_mask"].bool()[:, None, :]
    # a chance of 1 hides every word from every row; 0 hides none (only the own column and padding)
    visible = objective.visibility({**batch, "word_chance": torch.ones_like(batch["word_chance"])})
    assert not (visible & ordinary[:, None, :]).any()
    visible = objective.visibility({**batch, "word_chance": torch.zeros_like(batch["word_chance"])})
    expected_visible = real & ~eye
    expected_visible[:, 1:, 0] = True
    expected_visible[:, 0, 0] = ~expected_visible[:, 0, 1:].any(-1)  # row 0 sees column 0 only when nothing else
    assert torch.equal(visible, expected_visible)


@pytest.mark.parametrize("masking", ["uniform", "pmi"])
def test_a_block_of_rows_has_its_rows_of_the_whole_mask(tiny_model, masking):
    objective, tokenizer = build(tiny_model, decoder_masking=masking)
    if masking == "pmi":
        objective.attach_corpus_statistics(torch.arange(len(tokenizer)) + 1, 10 * len(tokenizer))
    batch = objective.prepare(raw_batch(tokenizer))
    whole = objective.visibility(batch)
    for rows in (torch.arange(3, 8), torch.tensor([4])):
        assert torch.equal(objective.visibility(batch, rows), whole[:, rows])
        assert torch.equal(objective.rows_hidden(batch, rows), objective.rows_hidden(batch)[:, rows])


# ----- the rotary pre-norm decoder written out -------------------------------------------------------------------


def rotate(x, positions):
    """RoPE in the rotate-half layout: x (B, heads, L, d) at `positions` (L,), angle p / theta^(2k / d)."""
    d = x.shape[-1]
    inv_freq = 1.0 / THETA ** (torch.arange(0, d, 2).float() / d)
    angles = positions.float()[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def prenorm_layer_by_hand(layer, final_norm, query, context, visible):
    """ModernBERT's form: x = q + Attn(N(q), N(ctx)) with rotary queries and keys, x + GLU-FFN(N(x)), final norm."""
    batch_size, length, hidden = query.shape
    heads = layer.attention.heads
    width = hidden // heads
    att = layer.attention

    def split(x):
        return x.view(batch_size, x.shape[1], heads, width).transpose(1, 2)

    positions = torch.arange(length)
    q = rotate(split(att.query(layer.attention_norm(query))), positions)
    k = rotate(split(att.key(layer.attention_norm(context))), positions)
    v = split(att.value(layer.attention_norm(context)))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(width)).masked_fill(~visible[:, None], float("-inf"))
    x = query + att.output((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch_size, length, hidden))
    gate, up = layer.ffn.intermediate(layer.ffn_norm(x)).chunk(2, -1)
    x = x + layer.ffn.output(F.gelu(gate) * up)
    return final_norm(x)


def sharpen_attention(objective):
    """Queries and keys of a size that makes attention far from uniform (at initialisation, std 0.02, every row
    averages its columns almost evenly, and a wrong rotation or mask moves the loss by less than its rounding)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for linear in (objective.decoder.attention.query, objective.decoder.attention.key):
            linear.weight.normal_(std=0.5)


def loss_by_hand(model, states, ids, targets):
    logits = model.decoder(model.head(states[targets]))
    return F.cross_entropy(logits.double(), ids[targets], reduction="sum").item()


@pytest.mark.parametrize("rows_per_block", [None, 3])
def test_rotary_prenorm_enhanced_decoding_written_out(modernbert, monkeypatch, rows_per_block):
    """Queries h at every position (no position table: rotary), keys and values from [h ; embeddings of the text],
    both rotated by their positions, pre-norm attention and GLU feed-forward, then the decoder's final norm and the
    encoder's head; in one block of rows and in blocks of 3."""
    objective, tokenizer = build(modernbert)
    sharpen_attention(objective)
    batch = objective.prepare(raw_batch(tokenizer))
    ids = batch["input_ids"]
    batch_size, length = ids.shape
    if rows_per_block:
        monkeypatch.setattr(module, "ATTENTION_BUDGET", rows_per_block * batch_size * length * 2)  # 2 heads
        assert len(objective.row_blocks(batch)) == math.ceil(length / rows_per_block) > 1
    model = objective.encoder
    torch.manual_seed(1)
    h = torch.randn(batch_size, model.config.hidden_size)
    with torch.no_grad():
        context = torch.cat([h[:, None], model.model.embeddings(input_ids=ids)[:, 1:]], 1)
        query = h[:, None].expand(-1, length, -1)
        expected = prenorm_layer_by_hand(objective.decoder, objective.decoder_norm, query, context,
                                         objective.visibility(batch))
        torch.testing.assert_close(objective.decode(h, batch), expected, rtol=1e-5, atol=1e-5)
        targets = batch["decoder_targets"]
        assert objective.decode_loss(h, batch).item() == pytest.approx(loss_by_hand(model, expected, ids, targets),
                                                                       rel=1e-5)


def test_rotary_prenorm_basic_decoding_written_out(modernbert):
    """Basic decoding: [h ; embeddings of the decoder-masked text] through the same layer with plain self-attention
    over the real tokens, rotary positions 0 .. L-1, the final norm; the loss over the decoder-masked tokens."""
    objective, tokenizer = build(modernbert, decoding="basic")
    sharpen_attention(objective)
    batch = objective.prepare(raw_batch(tokenizer))
    ids, targets = batch["input_ids"], batch["decoder_targets"]
    assert targets.any()
    batch_size, length = ids.shape
    model = objective.encoder
    torch.manual_seed(2)
    h = torch.randn(batch_size, model.config.hidden_size)
    with torch.no_grad():
        context = torch.cat([h[:, None], model.model.embeddings(input_ids=batch["decoder_input_ids"])[:, 1:]], 1)
        visible = batch["attention_mask"].bool()[:, None, :].expand(-1, length, -1)
        expected = prenorm_layer_by_hand(objective.decoder, objective.decoder_norm, context, context, visible)
        torch.testing.assert_close(objective.decode(h, batch), expected, rtol=1e-5, atol=1e-5)
        assert objective.decode_loss(h, batch).item() == pytest.approx(loss_by_hand(model, expected, ids, targets),
                                                                       rel=1e-5)


@pytest.mark.parametrize("mask_prob, random_prob", [(1.0, 0.0), (0.0, 1.0)])
def test_basic_decoding_corrupts_its_masked_tokens_by_the_configured_shares(tiny_model, mask_prob, random_prob):
    objective, tokenizer = build(tiny_model, decoding="basic", mask_token_prob=mask_prob,
                                 random_token_prob=random_prob)
    batch = objective.prepare(raw_batch(tokenizer, TEXTS * 3, max_len=32))
    targets, decoder_ids = batch["decoder_targets"], batch["decoder_input_ids"]
    assert targets.sum() > 20
    assert torch.equal(decoder_ids[~targets], batch["input_ids"][~targets])
    is_mask = decoder_ids[targets] == tokenizer.mask_token_id
    if mask_prob == 1.0:
        assert is_mask.all()
    else:  # every one a random ordinary token (equal to the original only by chance, 1 in ~700)
        assert not is_mask.any()
        assert (decoder_ids[targets] != batch["input_ids"][targets]).float().mean() > 0.9


def test_the_query_stream_keeps_the_precision_of_h(tiny_model):
    """h + p_i in h's dtype (bf16 under mixed precision), the fp32 position table cast to it."""
    objective, tokenizer = build(tiny_model)
    batch = objective.prepare(raw_batch(tokenizer))
    length = batch["input_ids"].shape[1]
    h = torch.randn(len(TEXTS), objective.encoder.config.hidden_size).bfloat16()
    with torch.no_grad():
        query = objective.streams(h, batch)[0]
    table = objective.encoder.bert.embeddings.position_embeddings.weight[:length]
    assert query.dtype == torch.bfloat16
    assert torch.equal(query, h[:, None] + table.bfloat16()[None])


# ----- blocks of rows ---------------------------------------------------------------------------------------------


def test_row_blocks_by_hand(tiny_model, monkeypatch):
    objective, tokenizer = build(tiny_model)
    batch = objective.prepare(raw_batch(tokenizer))
    batch_size, length = batch["input_ids"].shape
    scores_per_row = batch_size * length * 2  # texts x columns x 2 heads
    for budget, rows in ((3 * scores_per_row, 3), (3 * scores_per_row + 1, 3), (scores_per_row - 1, 1), (0, 1)):
        monkeypatch.setattr(module, "ATTENTION_BUDGET", budget)
        blocks = objective.row_blocks(batch)
        assert [b.tolist() for b in blocks] == [list(range(s, min(s + rows, length))) for s in range(0, length, rows)]


@pytest.mark.parametrize("blocks", [1, 2])
def test_several_blocks_are_recomputed_in_the_backward_pass_and_one_is_not(tiny_model, monkeypatch, blocks):
    """Activation checkpointing keeps one block's activations at a time: the decoder runs again in the backward pass
    when there are several blocks, and only then (one block: nothing to gain)."""
    objective, tokenizer = build(tiny_model)
    batch = objective.prepare(raw_batch(tokenizer))
    batch_size, length = batch["input_ids"].shape
    monkeypatch.setattr(module, "ATTENTION_BUDGET", math.ceil(length / blocks) * batch_size * length * 2)
    assert len(objective.row_blocks(batch)) == blocks
    calls = []
    hook = objective.decoder.ffn.register_forward_hook(lambda *_: calls.append(1))
    try:
        h = torch.randn(batch_size, objective.encoder.config.hidden_size, requires_grad=True)
        loss = objective.decode_loss(h, batch)
        assert len(calls) == blocks
        loss.backward()
        assert len(calls) == (blocks if blocks == 1 else 2 * blocks)
        assert h.grad.abs().sum() > 0
    finally:
        hook.remove()
