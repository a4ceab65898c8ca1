"""The defining rule of each objective, against an independent computation: the Hugging Face model run directly
(its own body, its own MLM head) on inputs built here by hand, and attention written out in plain tensor algebra
where the objective has its own decoder. A test here fails when an objective quietly becomes another method
(the encoder fed the clean text, a loss read from the wrong states, a decoder given the wrong vector ...)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_more_objectives import batch_of, document_batch, make, ordinary_ids
from retromae.rng import example_seeds


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


def texts(docstrings, n):
    return [d["text"] for d in docstrings[:n]]


def ce_sum(logits, targets):
    return F.cross_entropy(logits.double(), targets, reduction="sum").item()


def test_tsdae_encodes_the_noisy_text_and_decodes_the_clean_text(tiny_model, docstrings):
    """The pooled vector is BERT's final [CLS] state of the text with its deleted words removed (built here from the
    deletion mask); the decoder reads the clean text (a token changed at a deleted position moves its rows)."""
    objective, tokenizer = make(tiny_model, "tsdae")
    batch = objective.prepare(batch_of(tokenizer, texts(docstrings, 3), max_len=32))
    body = objective.encoder.bert
    with torch.no_grad():
        pooled = objective.pooled(batch)
        for b in range(3):
            kept = batch["input_ids"][b][batch["attention_mask"][b].bool() & ~batch["deleted"][b]]
            assert kept.numel() < batch["attention_mask"][b].sum(), "words were deleted"
            expected = body(input_ids=kept[None]).last_hidden_state[0, 0]
            torch.testing.assert_close(pooled[b], expected, atol=1e-5, rtol=1e-5)
        base = objective.decode(pooled, batch)
        j = int(batch["deleted"][0].nonzero()[0])  # a deleted position of text 0: absent from the noisy text
        clean = dict(batch, input_ids=batch["input_ids"].clone())
        clean["input_ids"][0, j] = (clean["input_ids"][0, j] + 5) % len(tokenizer)
        moved = (objective.decode(pooled, clean)[0] - base[0]).abs().amax(-1) > 1e-6
        assert moved[j:].all() and not moved[:j].any(), "the decoder reads the clean text, causally"
    assert objective.num_items(batch)["decoder"] == batch["attention_mask"][:, 1:].sum()


@pytest.mark.parametrize("name, settings", [("maelm", {}), ("retromae", {"encoder_masking": "remove"})])
def test_reinsertion_decoder_reads_mask_embeddings_at_removed_positions(tiny_model, docstrings, name, settings):
    """MAE-LM's decoder input: BERT's embedding of [MASK] at its position where a token was removed, the encoder's
    state where it was kept; its loss is on the removed tokens only."""
    objective, tokenizer = make(tiny_model, name, **settings)
    batch = objective.prepare(batch_of(tokenizer, texts(docstrings, 4), max_len=32))
    removed = batch["removed"] if name == "maelm" else batch["encoder_mask"]
    decoder = objective.decoder if name == "maelm" else objective.removal_decoder
    seen = []
    hook = decoder.stack.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        states = objective.encode(batch)
        objective(batch)
    hook.remove()
    mask_ids = torch.full_like(batch["input_ids"], tokenizer.mask_token_id)
    with torch.no_grad():
        mask_embeddings = objective.encoder.bert.embeddings(input_ids=mask_ids)
    torch.testing.assert_close(seen[0][removed], mask_embeddings[removed])
    kept = batch["attention_mask"].bool() & ~removed
    torch.testing.assert_close(seen[0][kept], states[kept])
    assert objective.num_items(batch)["mlm"] == removed.sum()


def test_condenser_backbone_reads_the_last_layer_and_the_head_its_own_states(tiny_model, docstrings):
    """mlm = CE of BERT's own head on the last layer at the masked positions; head = CE of the same head on the
    Condenser head's output over [last layer's CLS ; layer skip_from's tokens]; both over the encoder's mask."""
    objective, tokenizer = make(tiny_model, "condenser", skip_from=1)
    batch = objective.prepare(batch_of(tokenizer, texts(docstrings, 4), max_len=32))
    model, masked = objective.encoder, batch["encoder_mask"]
    with torch.no_grad():
        out = model.bert(input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True)
        last, skip = out.last_hidden_state, out.hidden_states[1]
        head_input = torch.cat([last[:, :1], skip[:, 1:]], dim=1)
        head_out = objective.head(head_input, batch["attention_mask"].bool()[:, None, :])
        losses = objective(batch)
    targets = batch["input_ids"][masked]
    assert losses["mlm"].item() == pytest.approx(ce_sum(model.cls(last[masked]), targets), rel=1e-5)
    assert losses["head"].item() == pytest.approx(ce_sum(model.cls(head_out[masked]), targets), rel=1e-5)


def test_seed_decodes_from_the_final_cls_state(tiny_model, docstrings):
    """The decoder's only view of the text is h, BERT's final [CLS] state of the masked input; its loss is the
    next-token cross-entropy of the shifted text."""
    objective, tokenizer = make(tiny_model, "seed")
    batch = objective.prepare(batch_of(tokenizer, texts(docstrings, 3), max_len=24))
    with torch.no_grad():
        h = objective.encoder.bert(input_ids=batch["encoder_input_ids"],
                                   attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
        decoded = objective.decode(h, batch)
        losses = objective(batch)
    targets = batch["decoder_targets"]
    expected = ce_sum(objective.encoder.cls(decoded[targets]), batch["input_ids"][:, 1:][targets])
    assert losses["decoder"].item() == pytest.approx(expected, rel=1e-5)


def test_cotmae_masks_the_encoder_at_030_and_the_decoder_at_045(tiny_model):
    """Encoder input: 30% of each span's ordinary tokens masked (whole words); decoder input: 45% (its own draw)."""
    objective, tokenizer = make(tiny_model, "cotmae", max_span_tokens=24, short_span_prob=0.0)
    documents = document_batch([[6, 7, 5, 6, 8, 4, 6, 7]] * 24)
    words = torch.tensor(ordinary_ids(tokenizer, 500))  # one-piece words: a token share is a word share
    documents["input_ids"] = torch.where(documents["attention_mask"].bool(), words[documents["input_ids"] % len(words)], 0)
    batch = objective.prepare({**documents, "seeds": example_seeds(3, 0, torch.arange(24))})
    spans = batch["spans"]
    ordinary = spans["words"] >= 0
    encoder_share = spans["encoder_mask"].sum() / ordinary.sum()
    decoder_share = spans["decoder_targets"].sum() / ordinary.sum()
    assert encoder_share.item() == pytest.approx(0.30, abs=0.03)
    assert decoder_share.item() == pytest.approx(0.45, abs=0.03)


def test_cocondenser_contrasts_the_spans_cls_states_and_spares_their_document(tiny_model, docstrings):
    """contrast = InfoNCE over unnormalised dot products of the spans' last-layer [CLS] states (BERT run on the
    span inputs built by prepare), each span's sibling its positive, spans of other examples of the same document
    left out, computed by hand here from the batch's `doc` ids."""
    objective, tokenizer = make(tiny_model, "cocondenser", skip_from=1, span_tokens=6)
    batch = objective.prepare(batch_of(tokenizer, texts(docstrings, 4), max_len=40))
    batch["doc"] = torch.tensor([0, 1, 1, 2])
    spans = batch["spans"]
    with torch.no_grad():
        reps = objective.encoder.bert(input_ids=spans["encoder_input_ids"],
                                      attention_mask=spans["attention_mask"]).last_hidden_state[:, 0].double()
        losses = objective(batch)
    logits, docs, expected = reps @ reps.T, batch["doc"], 0.0
    for i in range(8):
        example, sibling = i % 4, (i + 4) % 8
        allowed = [j for j in range(8) if j != i and (docs[j % 4] != docs[example] or j % 4 == example)]
        expected -= (logits[i, sibling] - torch.logsumexp(logits[i, allowed], 0)).item()
    assert losses["contrast"].item() == pytest.approx(expected, rel=1e-5)


def test_starbucks_decoder_reads_the_truncated_cls_and_is_scored_on_the_decoder_mask(tiny_model, docstrings):
    """A pair's MAE: the decoder (a copy of layer 0, BERT's own layer class) reads [transform of the first `dim`
    coordinates of layer `layer`'s CLS (dense weight cut to `dim` columns) ; embeddings of the decoder-masked text],
    and the cross-entropy of BERT's head is summed over the decoder mask."""
    objective, tokenizer = make(tiny_model, "starbucks", pairs=[[1, 16], [2, 32]])
    batch = objective.prepare(batch_of(tokenizer, texts(docstrings, 4), max_len=32))
    model = objective.encoder
    transform = model.cls.predictions.transform
    inputs = []  # what the decoder reads, pair by pair (a changed [CLS] barely moves a loss at initialisation)
    hook = objective.decoder.attention.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(
        (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
    with torch.no_grad():
        losses = objective(batch)
    hook.remove()
    with torch.no_grad():
        states = model.bert(input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True).hidden_states
        embedded = model.bert.embeddings(input_ids=batch["decoder_input_ids"])
        visible = batch["attention_mask"].bool()[:, None, None, :].expand(-1, 1, embedded.shape[1], -1)
        for layer, dim in ((1, 16), (2, 32)):
            cls = states[layer][:, 0, :dim] @ transform.dense.weight[:, :dim].T + transform.dense.bias
            cls = transform.LayerNorm(F.gelu(cls))
            torch.testing.assert_close(inputs.pop(0), torch.cat([cls[:, None], embedded[:, 1:]], 1))
            decoded = objective.decoder(torch.cat([cls[:, None], embedded[:, 1:]], 1), attention_mask=visible)
            decoded = decoded[0] if isinstance(decoded, tuple) else decoded
            where = batch["decoder_mask"]
            expected = ce_sum(model.cls(decoded[where]), batch["input_ids"][where])
            assert losses[f"mae_{layer}x{dim}"].item() == pytest.approx(expected, rel=1e-5), (layer, dim)


def test_retromae_enhanced_decoding_written_out(tiny_model, docstrings):
    """RetroMAE's decoder by hand: queries h + p_i (BERT's position table), keys and values from [h ; embeddings of
    the unmasked text], scaled dot-product attention under the visibility, then BERT's post-LN residual blocks with
    the decoder's weights, BERT's head, cross-entropy over every ordinary token."""
    objective, tokenizer = make(tiny_model, "retromae")
    batch = objective.prepare(batch_of(tokenizer, texts(docstrings, 3), max_len=24))
    model, layer = objective.encoder, objective.decoder
    with torch.no_grad():
        h = model.bert(input_ids=batch["encoder_input_ids"],
                       attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
        losses = objective(batch)
        ids = batch["input_ids"]
        batch_size, length = ids.shape
        query = h[:, None] + model.bert.embeddings.position_embeddings.weight[:length][None]
        context = torch.cat([h[:, None], model.bert.embeddings(input_ids=ids)[:, 1:]], dim=1)
        heads = layer.attention.heads
        width = h.shape[-1] // heads

        def split(x):
            return x.view(batch_size, length, heads, width).transpose(1, 2)

        att = layer.attention
        scores = split(att.query(query)) @ split(att.key(context)).transpose(-1, -2) / math.sqrt(width)
        scores = scores.masked_fill(~objective.visibility(batch)[:, None], float("-inf"))
        attended = (scores.softmax(-1) @ split(att.value(context))).transpose(1, 2).reshape(query.shape)
        x = layer.attention_norm(query + att.output(attended))
        x = layer.ffn_norm(x + layer.ffn.output(F.gelu(layer.ffn.intermediate(x))))
        torch.testing.assert_close(objective.decode(h, batch), x)  # states, not only the loss: a wrong key barely moves it
    targets = batch["decoder_targets"]
    assert torch.equal(targets, batch["words"] >= 0), "every ordinary token is predicted"
    assert losses["decoder"].item() == pytest.approx(ce_sum(model.cls(x[targets]), ids[targets]), rel=1e-5)
