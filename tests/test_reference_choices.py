"""Where our default differs from the authors' code, the authors' behaviour is a named option: CoT-MAE's
`span_cut: reference`, coCondenser's `span_source: document_spans`, SEED's `decoder_positions: own` and
`decoder_projection: tied`. Each is checked here on a tiny input against what the authors' code does, computed by
hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_more_objectives import batch_of, document_batch, make
from retromae.config import ConfigError
from retromae.rng import example_seeds


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


# ----- SEED-Encoder: the decoder's own positions and a plain tied projection ---------------------------------


def test_seed_reference_decoder_has_its_own_positions_and_a_plain_tied_projection(tiny_model, docstrings):
    """Decoder input = word embedding of each token + row t of a position table of the decoder's own (not the
    encoder's embedding layer: no encoder positions, no embedding norm); decoder loss = sum of CE(states @ W_e^T)
    over the next tokens: no MLM transform, no bias (the head's bias is set non-zero here so that using it shows)."""
    objective, tokenizer = make(tiny_model, "seed", decoder_positions="own", decoder_projection="tied")
    bert = objective.encoder
    with torch.no_grad():
        bert.cls.predictions.bias.normal_()  # the MLM head's bias, zero at initialisation
        bert.bert.embeddings.position_embeddings.weight.normal_()  # the encoder's positions: must not reach the decoder
    table = objective.position_table
    assert table is not None and table.weight.shape == (bert.config.max_position_embeddings, bert.config.hidden_size)
    assert all(table.weight is not p for p in bert.parameters()), "a table of the decoder's own"
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:3]], max_len=20))
    seen = []
    hook = objective.decoder.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        h = bert.bert(input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        decoded = objective.decode(h[:, 0], batch)
        losses = objective(batch)
    hook.remove()
    shifted = batch["input_ids"][:, :-1]
    words = bert.bert.embeddings.word_embeddings.weight
    expected_input = words[shifted] + table.weight[: shifted.shape[1]][None]
    torch.testing.assert_close(seen[0], expected_input)
    targets = batch["decoder_targets"]
    logits = decoded[targets].double() @ words.double().T
    expected = F.cross_entropy(logits, batch["input_ids"][:, 1:][targets], reduction="sum").item()
    assert losses["decoder"].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="decoder_projection='plain' is not one of"):
        make(tiny_model, "seed", decoder_projection="plain")


# ----- CoT-MAE: the authors' span cut, crop and overlapping partner -------------------------------------------


def span_tokens_of(batch, tokenizer, row):
    """A span row's ordinary tokens (its [CLS] and [SEP] checked and dropped)."""
    spans = batch["spans"]
    ids = spans["input_ids"][row][spans["attention_mask"][row].bool()].tolist()
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    return ids[1:-1]


def test_cotmae_reference_cut_closes_after_the_crossing_sentence_crops_and_always_overlaps(tiny_model):
    """At T = 8 (no short targets) the authors' loop adds sentences until the span EXCEEDS 8 tokens, that sentence
    included; a span longer than 8 is cropped to 8 consecutive tokens at a random offset; the overlapping partner is
    the anchor's last k sentences (k uniform in [1, max(1, n // 2)]) and then the following sentences until 8 tokens
    are reached (the last span: its first k and the preceding ones), so it exists for every anchor. All by hand."""
    from retromae.objectives.cotmae import NEIGHBOUR, OVERLAPPING, RANDOM, UNPAIRED

    objective, tokenizer = make(tiny_model, "cotmae", max_span_tokens=8, short_span_prob=0.0, span_cut="reference")
    layout = [[3, 4, 2, 5, 1, 6, 2], [12], [1] * 12, [20, 1, 1]]
    cut = {0: [(0, 3), (3, 6), (6, 7)], 1: [(0, 1)], 2: [(0, 9), (9, 12)], 3: [(0, 1), (1, 3)]}
    overlap = {(0, 0, 3): {(2, 5)}, (0, 3, 6): {(5, 7)}, (0, 6, 7): {(5, 7)},
               (2, 0, 9): {(8, 12), (7, 12), (6, 12), (5, 12)}, (2, 9, 12): {(2, 10)},
               (3, 0, 1): {(0, 1)}, (3, 1, 3): {(0, 2)}}  # (document, anchor) -> the overlapping spans possible
    base = document_batch(layout)
    kinds, offsets, overlaps_of_doc2 = {RANDOM: 0, NEIGHBOUR: 0, OVERLAPPING: 0}, set(), set()
    for trial in range(30):
        batch = objective.prepare({**base, "seeds": example_seeds(trial, 0, torch.arange(len(layout)))})
        n = len(layout)
        for b, lengths in enumerate(layout):
            starts = [sum(lengths[:s]) for s in range(len(lengths) + 1)]
            anchor, partner = tuple(batch["anchor"][b].tolist()), tuple(batch["partner"][b].tolist())
            kind = batch["partner_type"][b].item()
            assert anchor in cut[b]
            for row, (s0, s1) in ((b, anchor), (b + n, partner)):
                whole = base["input_ids"][b, starts[s0] : starts[s1]].tolist()
                got = span_tokens_of(batch, tokenizer, row)
                assert len(got) == min(8, len(whole)), "cropped to T tokens"
                at = next(i for i in range(len(whole) - len(got) + 1) if whole[i : i + len(got)] == got)
                if b == 1 and row == b:
                    offsets.add(at)
            if len(cut[b]) < 2:
                assert kind == UNPAIRED
                continue
            kinds[kind] += 1
            if kind == OVERLAPPING:
                assert partner in overlap[(b, *anchor)], (b, anchor, partner)
                if b == 2 and anchor == (0, 9):
                    overlaps_of_doc2.add(partner)
            elif kind == RANDOM:
                assert partner in cut[b] and partner != anchor
            else:
                assert abs(cut[b].index(partner) - cut[b].index(anchor)) == 1
    assert len(offsets) >= 3, "the 12-token sentence is cropped at random offsets (0 .. 4)"
    assert len(overlaps_of_doc2) >= 2, "k is drawn: the overlap starts at different sentences"
    assert all(v > 0 for v in kinds.values()), kinds


def test_cotmae_reference_cut_redraws_the_short_target_for_every_span(tiny_model):
    """Every target short (short_span_prob 1, uniform in [2, 8]): on a document of one-token sentences each span
    but the last has target + 1 sentences, 3 .. 9. Drawn per span (the authors' loop), two spans of one document
    differ in size; drawn once per document (our whole-sentence cut), they never do."""
    from retromae.objectives.cotmae import OVERLAPPING

    layout = [[1] * 40] * 4
    base = document_batch(layout)
    sizes = {}
    for cut in ("reference", "whole_sentences"):
        objective, _ = make(tiny_model, "cotmae", max_span_tokens=8, short_span_prob=1.0, min_span_tokens=2,
                            span_cut=cut)
        differ = 0
        for trial in range(6):
            batch = objective.prepare({**base, "seeds": example_seeds(trial, 0, torch.arange(len(layout)))})
            for b in range(len(layout)):
                if batch["partner_type"][b].item() == OVERLAPPING:
                    continue
                (a0, a1), (p0, p1) = batch["anchor"][b].tolist(), batch["partner"][b].tolist()
                if a1 == 40 or p1 == 40:  # the last span takes what is left
                    continue
                low, high = (3, 9) if cut == "reference" else (2, 8)
                assert low <= a1 - a0 <= high and low <= p1 - p0 <= high, (cut, a0, a1, p0, p1)
                differ += (a1 - a0) != (p1 - p0)
        sizes[cut] = differ
    assert sizes["reference"] > 0 and sizes["whole_sentences"] == 0, sizes


# ----- coCondenser: two different pre-cut spans of one document ----------------------------------------------


def test_cocondenser_document_spans_are_two_different_spans_of_the_documents_cut(tiny_model):
    """span_source=document_spans: each document is cut into spans of whole sentences of <= 8 tokens (by hand
    below); rows b and b + B are two DIFFERENT spans of document b (the same one when it has one span), drawn from
    the example's seed alone: the same example in another row of another batch gets the same two spans."""
    objective, tokenizer = make(tiny_model, "cocondenser", skip_from=1, span_tokens=8, span_source="document_spans")
    layout = [[3, 4, 2, 5, 1, 6, 2], [10], [2, 2, 2, 2], [1] * 10]
    cut = {0: [(0, 2), (2, 5), (5, 7)], 1: [(0, 1)], 2: [(0, 4)], 3: [(0, 8), (8, 10)]}
    base = document_batch(layout)
    n, pairs_of_doc0 = len(layout), set()
    for trial in range(20):
        batch = objective.prepare({**base, "seeds": example_seeds(trial, 0, torch.arange(n))})
        for b, lengths in enumerate(layout):
            starts = [sum(lengths[:s]) for s in range(len(lengths) + 1)]
            doc = base["input_ids"][b]
            pieces = {(s0, s1): doc[starts[s0] : starts[s0] + min(8, starts[s1] - starts[s0])].tolist()
                      for s0, s1 in cut[b]}
            got = [span_tokens_of(batch, tokenizer, row) for row in (b, b + n)]
            chosen = [next(r for r, piece in pieces.items() if piece == g) for g in got]  # StopIteration: no span
            if len(cut[b]) > 1:
                assert chosen[0] != chosen[1], "two different spans of the document"
            else:
                assert chosen[0] == chosen[1]
            if b == 0:
                pairs_of_doc0.add(frozenset(chosen))
        for order in ([0, 1, 3, 2], [2, 0]):  # the same examples (same seeds) in other rows of other batches
            moved = objective.prepare({k: base[k][order] for k in ("input_ids", "attention_mask", "doc",
                                                                    "sentence_ids")} | {"seeds": batch["seeds"][order]})
            for b, example in enumerate(order):
                for row, original in ((b, example), (b + len(order), example + n)):
                    assert span_tokens_of(moved, tokenizer, row) == span_tokens_of(batch, tokenizer, original)
    assert len(pairs_of_doc0) == 3, "every pair of the three spans is drawn"
    losses = objective(batch)
    assert set(losses) == {"mlm", "head", "contrast"}
    with pytest.raises(ConfigError, match="data.cut=document"):
        objective.prepare(batch_of(tokenizer, ["a short text"]))


def test_cocondenser_document_spans_asks_for_whole_documents_before_anything_loads(tiny_model, tmp_path):
    """The kind of example follows the option: whole documents (data.cut=document) for document_spans, passages or
    blocks for the default windows; the export declares the span length (span_tokens + [CLS] and [SEP])."""
    from retromae.modeling import load_tokenizer
    from retromae.pretrain import export_length, load_config, preflight

    corpus = tmp_path / "c.txt"
    corpus.write_text("a text. another one.\n")

    def config(source, cut):
        return load_config(None, [f"model.name_or_path={tiny_model}", f"data.corpus=[{corpus}]", f"data.cut={cut}",
                                  "objective.name=cocondenser", f"objective.span_source={source}",
                                  "objective.span_tokens=20"])

    with pytest.raises(ConfigError, match="whole documents .*: set data.cut=document"):
        preflight(config("document_spans", "passage"))
    with pytest.raises(ConfigError, match="not data.cut=document"):
        preflight(config("windows", "document"))
    cfg = config("document_spans", "document")
    preflight(cfg)
    tokenizer = load_tokenizer(cfg.model)
    assert export_length(cfg, tokenizer, None) == 22
