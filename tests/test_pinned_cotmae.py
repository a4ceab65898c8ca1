"""CoT-MAE's rules that its mutation run found unpinned (docs/mutation.md): max_span_tokens against the model's
positions; the two losses and their item counts (by hand from the span inputs); the decoder's padding mask and rotary
positions; the reference cut's per-span targets at the ends of their draw, an empty document, the random crop's
offsets and the overlapping span's k; every tensor made on the input's device. Expected values by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retromae.objectives.cotmae as cotmae
from test_more_objectives import document_batch
from retromae.config import ConfigError
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import build_objective_config, objective_class
from retromae.rng import example_seeds, uniform

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


def make(model_dir, name="cotmae", **settings):
    cfg = ModelConfig(name_or_path=str(model_dir), dropout=0.0)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    objective = objective_class(name)(load_masked_lm(cfg), tokenizer, build_objective_config({"name": name, **settings}))
    return objective.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_roberta(tiny_family):
    """Positions after the padding index: a table of 130 rows holds 128 positions."""
    return tiny_family("roberta")


def test_spans_must_fit_the_positions_the_model_reads(tiny_model, tiny_roberta):
    """max_span_tokens + [CLS] + [SEP] <= 128 positions in both tiny models: 126 accepted, 127 refused. RoBERTa's
    table has 130 rows, but its positions start after the padding index (2): 128 positions, as BERT's."""
    for model in (tiny_model, tiny_roberta):
        make(model, max_span_tokens=126)
        with pytest.raises(ConfigError, match="max_span_tokens=127 plus 2 special tokens exceeds the model's 128"):
            make(model, max_span_tokens=127)
    objective, _ = make(tiny_roberta, max_span_tokens=126)
    assert objective.encoder.config.max_position_embeddings == 130


@pytest.fixture(scope="module")
def tiny_modernbert(tiny_family):
    """A rotary, pre-norm encoder: the CoT-MAE decoder built to its shape has rotary attention."""
    return tiny_family("modernbert")


def seeds(n, seed=0):
    return example_seeds(seed, 0, torch.arange(n))


def ce_sum(logits, targets):
    return F.cross_entropy(logits.double(), targets, reduction="sum").item()


def spans_of(objective, layout, seed=1):
    """prepare() on documents whose sentences have these lengths: the span inputs (rows b and b + B)."""
    return objective.prepare({**document_batch(layout), "seeds": seeds(len(layout), seed)})["spans"]


# ----- the two losses and what they average over ---------------------------------------------------------------


def test_losses_and_item_counts_by_hand(tiny_model):
    """mlm = sum of CE(BERT's MLM head on the encoder's states of the corrupted span) at the encoder-masked tokens;
    decoder = sum of CE(the head on the decoder's states) at the decoder targets, the decoder reading the OTHER span's
    final [CLS] state (position 0, not 1); each loss averages over its own count of tokens. Document 2 makes a single
    span (5 tokens <= 8): it has MLM tokens but no decoder targets."""
    objective, _ = make(tiny_model, max_span_tokens=8, short_span_prob=0.0)
    spans = spans_of(objective, [[3, 4, 2, 5], [4, 4, 4], [2, 3]])
    read, decode = [], objective.decode
    objective.decode = lambda h, batch: (read.append(h), decode(h, batch))[1]  # what forward hands the decoder
    with torch.no_grad():
        losses = objective({"spans": spans})
        bert = objective.encoder
        hidden = bert.bert(input_ids=spans["encoder_input_ids"], attention_mask=spans["attention_mask"]).last_hidden_state
        decoded = objective.decode(hidden[:, 0], spans)
    torch.testing.assert_close(read[0], hidden[:, 0], rtol=0, atol=1e-6)  # the loss barely moves with h at init
    encoder, targets = spans["encoder_mask"], spans["decoder_targets"]
    assert set(losses) == {"mlm", "decoder"}
    assert losses["mlm"].item() == pytest.approx(ce_sum(bert.cls(hidden[encoder]), spans["input_ids"][encoder]), rel=1e-5)
    expected = ce_sum(bert.cls(decoded[targets]), spans["input_ids"][targets])
    assert losses["decoder"].item() == pytest.approx(expected, rel=1e-5)
    counts = objective.num_items({"spans": spans})
    assert set(counts) == {"mlm", "decoder"}
    assert counts["mlm"].item() == encoder.sum().item() > 0 and counts["decoder"].item() == targets.sum().item() > 0
    assert encoder[[2, 5]].any() and not targets[[2, 5]].any(), "the single-span document: MLM only"
    assert objective.loss_weights == {"decoder": 1.0}


# ----- the decoder: padding and rotary positions -----------------------------------------------------------------


def test_decoder_ignores_padded_positions(tiny_model):
    """The decoder attends to the span's real tokens only: ids changed at padded positions of the decoder input do
    not move a real token's state. Spans of 7 tokens in rows 10 wide: 1 padded position each."""
    objective, _ = make(tiny_model, max_span_tokens=8, short_span_prob=0.0)
    spans = spans_of(objective, [[3, 4, 2, 5], [3, 4, 3, 4]])
    real = spans["attention_mask"].bool()
    assert (~real).any(-1).all(), "every row has padding"
    h = torch.randn(4, objective.encoder.config.hidden_size)
    with torch.no_grad():
        base = objective.decode(h, spans)
        changed = {**spans, "decoder_input_ids": torch.where(real, spans["decoder_input_ids"], 7)}
        moved = objective.decode(h, changed)
    torch.testing.assert_close(moved[real], base[real], rtol=0, atol=1e-6)


def test_rotary_decoder_reads_positions_0_to_L(tiny_modernbert):
    """On a rotary encoder (ModernBERT) the decoder's attention rotates queries and keys by the positions 0 .. L-1
    of [other span's h ; its own masked tokens]; a single decoder layer is enough (layer 0 is the one there is)."""
    objective, _ = make(tiny_modernbert, max_span_tokens=8, short_span_prob=0.0, decoder_layers=1)
    assert len(objective.decoder.layers) == 1 and objective.decoder.layers[0].attention.rotary is not None
    spans = spans_of(objective, [[3, 4, 2, 5], [4, 4, 4]])
    objective.decoder.double()  # float64: the rotation's effect at initialisation is small, but not zero
    h = torch.randn(4, objective.encoder.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        got = objective.decode(h, spans)
        other = torch.cat([h[2:], h[:2]])[:, None]
        x = torch.cat([other, objective.arch.embed(spans["decoder_input_ids"])[:, 1:].double()], dim=1)
        length = x.shape[1]
        assert length != x.shape[2]
        visible = spans["attention_mask"].bool()[:, None, :]
        expected = objective.decoder(x, visible, torch.arange(length))
        unrotated = objective.decoder(x, visible, None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (got - unrotated).abs().max() > 1e-6


# ----- the reference cut: each span's target at the ends of its draw, an empty document ----------------------


def constant_draws(value):
    """A stand-in for retromae.rng.uniform that returns `value` for every draw (shape as uniform's)."""
    def draw(seeds, stream, counters):
        shape = torch.broadcast_shapes((seeds.shape[0],) + (1,) * (counters.dim() - 1), counters.shape)
        return torch.full(shape, value, dtype=torch.float32, device=seeds.device)
    return draw


LARGEST_DRAW = 1.0 - 2.0 ** -24  # uniform's largest value: 24 random bits / 2^24


@pytest.mark.parametrize("draw, short_prob, target", [
    (LARGEST_DRAW, 1.0, 5),  # short target min + floor(u * (5 - 2 + 1)) = 2 + 3 = 5: the largest is max_span_tokens
    (0.0, 1.0, 2),  # the smallest is min_span_tokens
    (0.0, 0.0, 5),  # probability 0: never short, even at a draw of 0
])
def test_reference_targets_span_min_to_max_tokens(monkeypatch, draw, short_prob, target):
    """20 one-token sentences, min_span_tokens 2, max_span_tokens 5: a span takes sentences until it EXCEEDS its
    target, so it has target + 1 sentences (the last one what is left): starts 0, t+1, 2(t+1) ..."""
    monkeypatch.setattr(cotmae, "uniform", constant_draws(draw))
    cfg = build_objective_config({"name": "cotmae", "max_span_tokens": 5, "min_span_tokens": 2,
                                  "short_span_prob": short_prob, "span_cut": "reference"})
    cut = cotmae.reference_cut(torch.zeros(1, 20, dtype=torch.long) + torch.arange(20), seeds(1), cfg)
    starts = list(range(0, 20, target + 1))
    assert cut["is_start"][0].nonzero().flatten().tolist() == starts
    assert cut["spans"].tolist() == [len(starts)]
    assert cut["ends"][0, 0].item() == target + 1


def test_an_empty_document_has_no_span():
    """A document without tokens (all padding, sentence id -1) has 0 sentences and makes 0 spans, beside a document
    of two 2-token sentences (T = 8: one span)."""
    cfg = build_objective_config({"name": "cotmae", "max_span_tokens": 8, "short_span_prob": 0.0,
                                  "span_cut": "reference"})
    sentence_ids = torch.tensor([[0, 0, 1, 1], [-1, -1, -1, -1]])
    cut = cotmae.reference_cut(sentence_ids, seeds(2), cfg)
    assert cut["sentences"].tolist() == [2, 0]
    assert cut["spans"].tolist() == [1, 0]
    cut = cotmae.whole_sentence_cut(sentence_ids, torch.tensor([8, 8]))  # our cut: the same
    assert cut["sentences"].tolist() == [2, 0]
    assert cut["spans"].tolist() == [1, 0]


# ----- the reference crop and overlap ----------------------------------------------------------------------------


def test_random_crop_offsets_are_uniform_draws_of_stream_crop():
    """Row r < B (anchor) crops at floor(u * (room + 1)), u = uniform(seed_r, CROP, counter 0), room = size - most;
    row B + r (partner) the same with counter 1. Spans of at most `most` tokens are left whole (offset 0)."""
    b, most = 16, 8
    sizes = torch.tensor([1000] * b + [1000] * (b - 4) + [8, 3, 9, 1])
    start = torch.arange(2 * b) * 10
    new_start, new_size = cotmae.random_crop(start, sizes, most, seeds(b))
    for r in range(2 * b):
        room = max(0, sizes[r].item() - most)
        u = uniform(seeds(b)[r % b : r % b + 1], cotmae.CROP, torch.tensor([int(r >= b)])).item()
        assert new_start[r].item() == start[r].item() + int(u * (room + 1)), r
        assert new_size[r].item() == min(most, sizes[r].item())
    many = cotmae.random_crop(torch.zeros(400, dtype=torch.long), torch.full((400,), 11), most, seeds(200))[0]
    assert sorted(set(many.tolist())) == [0, 1, 2, 3], "room 3: every offset 0 .. 3 occurs"


def test_reference_overlap_takes_k_of_1_to_half_the_anchors_sentences():
    """Ten one-token sentences, `most` 6, anchor [0, 4) (n = 4, k uniform in [1, 2]): k = 1 + floor(u * 2).
    Forward, u = 0.99: k = 2, sentences 2, 3 and then 4 more to reach 6 tokens: [2, 8); u = 0: k = 1, [3, 9).
    The last span [6, 10), backward, u = 0.99: k = 2, sentences 6, 7 and 4 before them: [2, 8); u = 0: k = 1,
    sentence 6 and 5 before it: [1, 7)."""
    cut = {"lengths": torch.ones(1, 10, dtype=torch.long), "sentences": torch.tensor([10])}
    for anchor, is_last, u, expected in (((0, 4), False, 0.99, (2, 8)), ((0, 4), False, 0.0, (3, 9)),
                                         ((6, 10), True, 0.99, (2, 8)), ((6, 10), True, 0.0, (1, 7))):
        got = cotmae.reference_overlap(torch.tensor([anchor]), torch.tensor([is_last]), cut, 6, torch.tensor([u]))
        assert tuple(got[0].tolist()) == expected, (anchor, is_last, u)


def test_reference_overlap_reaches_most_tokens_by_one_sentence_and_k_never_exceeds_n():
    """`most` 2, u = 0 (k = 1): forward from anchor [0, 4), sentence 3 and one more to reach 2 tokens: [3, 5);
    backward from [6, 10), sentence 6 and the one before it: [5, 7). An anchor of no sentence ([3, 3)) has k = 0:
    forward it takes 6 tokens from sentence 3 on: [3, 9)."""
    cut = {"lengths": torch.ones(1, 10, dtype=torch.long), "sentences": torch.tensor([10])}
    for anchor, is_last, most, expected in (((0, 4), False, 2, (3, 5)), ((6, 10), True, 2, (5, 7)),
                                            ((3, 3), False, 6, (3, 9))):
        got = cotmae.reference_overlap(torch.tensor([anchor]), torch.tensor([is_last]), cut, most, torch.tensor([0.0]))
        assert tuple(got[0].tolist()) == expected, (anchor, is_last, most)


# ----- our cut: the document's target, windows that fit, the overlapping window ---------------------------------


@pytest.mark.parametrize("draw, short_prob, target", [
    (LARGEST_DRAW, 1.0, 5),  # min + floor(u * (5 - 2 + 1)) = 2 + 3: the largest short target is max_span_tokens
    (0.5, 1.0, 4),  # 2 + floor(0.5 * 4)
    (0.0, 1.0, 2),  # the smallest is min_span_tokens
    (0.0, 0.0, 5),  # probability 0: never short, even at a draw of 0
])
def test_document_target_spans_min_to_max_tokens(monkeypatch, draw, short_prob, target):
    monkeypatch.setattr(cotmae, "uniform", constant_draws(draw))
    cfg = build_objective_config({"name": "cotmae", "max_span_tokens": 5, "min_span_tokens": 2,
                                  "short_span_prob": short_prob})
    assert cotmae.span_budget(seeds(3), cfg).tolist() == [target] * 3


def test_window_starts_take_a_window_of_exactly_the_budget():
    """Sentences of 2 tokens, budget 4: the earliest start of a window ending before sentence e = 0 .. 4 is
    0, 0, 0 ([0, 2) has exactly 4 tokens: it fits), 1, 2."""
    starts = cotmae.window_starts(torch.tensor([[2, 2, 2, 2]]), torch.tensor([4]))
    assert starts[0].tolist() == [0, 0, 0, 1, 2]


def test_pick_true_ranks_the_trues_and_stays_inside_the_row():
    """rank = floor(u * count) among the Trues: u = 0.99 over 3 Trues picks the third, u = 0 the first; a lone
    True in the last column is found there; a row without any gives a valid column and says it has none."""
    candidates = torch.tensor([[True, False, True, True], [True, False, True, True], [False, False, False, True],
                               [False, False, False, False]])
    index, has = cotmae.pick_true(candidates, torch.tensor([0.99, 0.0, 0.5, 0.5]))
    assert index[:3].tolist() == [3, 0, 3] and has.tolist() == [True, True, True, False]
    assert 0 <= index[3].item() <= 3


def test_overlapping_window_shares_at_most_half_of_its_sentences():
    """8 one-token sentences, budget 4: windows [s, min(s + 4, 8)) and [max(e - 4, 0), e). Anchor [0, 4):
    forward windows [2, 6) (shares 2 of 4: exactly half) and [3, 7) (1 of 4); [1, 5) shares 3; backward windows
    end inside and start at 0: all theirs shared. Anchor [4, 8): backward windows [1, 5) (1 of 4) and [2, 6)
    (2 of 4). u = 0 picks the first candidate, u = 0.99 the last."""
    ends = torch.tensor([[4, 5, 6, 7, 8, 8, 8, 8]])
    starts = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 3, 4]])
    for anchor, u, expected in (((0, 4), 0.0, (2, 6)), ((0, 4), 0.99, (3, 7)), ((4, 8), 0.0, (1, 5)),
                                ((4, 8), 0.99, (2, 6))):
        window, exists = cotmae.overlapping_window(torch.tensor([anchor]), ends, starts, torch.tensor([u]))
        assert tuple(window[0].tolist()) == expected and exists.item(), (anchor, u)


# ----- every tensor on the input's device ------------------------------------------------------------------------


def test_tensors_are_made_on_the_inputs_device(monkeypatch, tiny_modernbert):
    """Users train on GPUs: every tensor these functions make must be on their input's device. The meta device
    stands in for a GPU here: mixing a CPU tensor into a meta computation raises. (The cut reads a sentence count
    off the tensor, which meta cannot give: the tokens per sentence are computed on the CPU and handed over.)"""
    meta = torch.device("meta")
    objective, _ = make(tiny_modernbert, max_span_tokens=8, short_span_prob=0.0)
    spans = spans_of(objective, [[3, 4, 2, 5], [4, 4, 4]])
    objective.to(meta)
    with torch.no_grad():
        out = objective.decode(torch.zeros(4, objective.encoder.config.hidden_size, device=meta),
                               {k: v.to(meta) for k, v in spans.items()})
    assert out.device == meta and out.shape[:2] == spans["input_ids"].shape

    start, size = cotmae.random_crop(torch.zeros(4, dtype=torch.long, device=meta), torch.full((4,), 12, device=meta),
                                     8, seeds(2).to(meta))
    assert start.device == size.device == meta
    sentence_ids = torch.tensor([[0, 0, 1, 1, 2, 2]])
    lengths = cotmae.sentence_lengths(sentence_ids)
    monkeypatch.setattr(cotmae, "sentence_lengths", lambda ids: lengths.to(meta))
    cfg = build_objective_config({"name": "cotmae", "max_span_tokens": 3, "span_cut": "reference"})
    cut = cotmae.reference_cut(sentence_ids.to(meta), seeds(1).to(meta), cfg)
    assert {v.device for v in cut.values()} == {meta}
    cfg = build_objective_config({"name": "cotmae", "max_span_tokens": 5, "min_span_tokens": 2})
    assert cotmae.span_budget(seeds(2).to(meta), cfg).device == meta
    window, exists = cotmae.overlapping_window(torch.tensor([[0, 4]], device=meta),
                                               torch.tensor([[4, 5, 6, 7, 8, 8, 8, 8]], device=meta),
                                               torch.tensor([[0, 0, 0, 0, 0, 1, 2, 3, 4]], device=meta),
                                               torch.tensor([0.5], device=meta))
    assert window.device == exists.device == meta


def test_decoder_mask_ratio_must_lie_strictly_between_0_and_1():
    build_objective_config({"name": "cotmae", "decoder_mask_ratio": 0.01})
    build_objective_config({"name": "cotmae", "decoder_mask_ratio": 0.99})
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match="decoder_mask_ratio"):
            build_objective_config({"name": "cotmae", "decoder_mask_ratio": bad})


def test_span_and_decoder_bounds_accept_their_edges():
    """min_span_tokens 1 and min == max accepted, 0 and min > max refused; short_span_prob 0 and 1 accepted, 1.5
    refused; decoder_layers 1 accepted, 0 refused (each checked alone)."""
    for good in ({"min_span_tokens": 1}, {"min_span_tokens": 128}, {"short_span_prob": 0.0}, {"short_span_prob": 1.0},
                 {"decoder_layers": 1}):
        build_objective_config({"name": "cotmae", **good})
    for bad, message in (({"min_span_tokens": 0}, "min_span_tokens"), ({"min_span_tokens": 129}, "min_span_tokens"),
                         ({"short_span_prob": 1.5}, "short_span_prob"), ({"decoder_layers": 0}, "decoder_layers")):
        with pytest.raises(ConfigError, match=message):
            build_objective_config({"name": "cotmae", **bad})


# ----- the anchor and its partner: which span each draw picks ----------------------------------------------------


def stream_draws(values):
    """A stand-in for retromae.rng.uniform that returns values[stream] for every draw (0 for other streams)."""
    def draw(seeds, stream, counters):
        shape = torch.broadcast_shapes((seeds.shape[0],) + (1,) * (counters.dim() - 1), counters.shape)
        return torch.full(shape, values.get(stream, 0.0), dtype=torch.float32, device=seeds.device)
    return draw


THREE_SPANS = torch.tensor([[0, 0, 1, 1, 2, 2]])  # three 2-token sentences; T = 2: spans [0, 1), [1, 2), [2, 3)


@pytest.mark.parametrize("u, anchor", [(0.99, (2, 3)), (0.5, (1, 2)), (0.0, (0, 1))])
def test_anchor_is_span_floor_u_times_spans(monkeypatch, u, anchor):
    """Three spans: the anchor is span floor(u * 3): u = 0.99 -> 2 (the last span is reachable), 0.5 -> 1, 0 -> 0."""
    monkeypatch.setattr(cotmae, "uniform", stream_draws({cotmae.ANCHOR: u}))
    cfg = build_objective_config({"name": "cotmae", "max_span_tokens": 2, "short_span_prob": 0.0})
    pairs = cotmae.sample_pairs(THREE_SPANS, seeds(1), cfg)
    assert tuple(pairs["anchor"][0].tolist()) == anchor


@pytest.mark.parametrize("u, partner", [(0.99, (1, 2)), (0.4, (0, 1))])
def test_random_partner_is_uniform_among_the_other_spans(monkeypatch, u, partner):
    """Three spans, anchor span 2 (u = 0.99), kind RANDOM (u = 0 -> floor(0 * 3) = 0): the partner is the k-th of the
    2 other spans, k = floor(u * (3 - 1)): u = 0.99 -> k = 1 (span 1), u = 0.4 -> floor(0.8) = 0 (span 0)."""
    monkeypatch.setattr(cotmae, "uniform", stream_draws({cotmae.ANCHOR: 0.99, cotmae.PARTNER_TYPE: 0.0,
                                                         cotmae.OTHER_SPAN: u}))
    cfg = build_objective_config({"name": "cotmae", "max_span_tokens": 2, "short_span_prob": 0.0})
    pairs = cotmae.sample_pairs(THREE_SPANS, seeds(1), cfg)
    assert pairs["partner_type"].tolist() == [cotmae.RANDOM]
    assert tuple(pairs["anchor"][0].tolist()) == (2, 3) and tuple(pairs["partner"][0].tolist()) == partner


def test_pairs_and_partner_kinds_are_made_on_the_inputs_device(monkeypatch):
    """As test_tensors_are_made_on_the_inputs_device: the pair sampler (both cuts) and the partner kind on meta."""
    meta = torch.device("meta")
    lengths = cotmae.sentence_lengths(THREE_SPANS)
    monkeypatch.setattr(cotmae, "sentence_lengths", lambda ids: lengths.to(meta))
    for cut in ("whole_sentences", "reference"):
        cfg = build_objective_config({"name": "cotmae", "max_span_tokens": 2, "span_cut": cut})
        pairs = cotmae.sample_pairs(THREE_SPANS.to(meta), seeds(1).to(meta), cfg)
        assert {v.device for v in pairs.values()} == {meta}, cut
    kind = cotmae.partner_kind(seeds(2).to(meta), torch.tensor([3, 1], device=meta),
                               torch.tensor([True, False], device=meta))
    assert kind.device == meta


@pytest.mark.parametrize("anchor_u, side_u, partner", [
    (0.5, 0.9, (0, 1)),  # anchor span 1 has both neighbours: a draw >= 0.5 takes the one before
    (0.5, 0.5, (0, 1)),  # exactly 0.5 too: 2^23 of the 2^24 draws go each way
    (0.5, 0.49, (2, 3)),  # a draw < 0.5 takes the one after
    (0.0, 0.9, (1, 2)),  # anchor span 0: only the one after exists, whatever the draw
    (0.99, 0.0, (1, 2)),  # anchor span 2 (the last): only the one before exists
])
def test_neighbour_partner_is_a_fair_side_among_those_that_exist(monkeypatch, anchor_u, side_u, partner):
    """Three spans, kind NEIGHBOUR (u = 0.5 -> floor(0.5 * 3) = 1): the partner is the span before or after the
    anchor, uniform among those that exist (methods.md §1.7: "the neighbouring span")."""
    monkeypatch.setattr(cotmae, "uniform", stream_draws({cotmae.ANCHOR: anchor_u, cotmae.PARTNER_TYPE: 0.5,
                                                         cotmae.NEIGHBOUR_SIDE: side_u}))
    cfg = build_objective_config({"name": "cotmae", "max_span_tokens": 2, "short_span_prob": 0.0})
    pairs = cotmae.sample_pairs(THREE_SPANS, seeds(1), cfg)
    assert pairs["partner_type"].tolist() == [cotmae.NEIGHBOUR]
    assert tuple(pairs["partner"][0].tolist()) == partner


# ----- prepare: the decoder's input corruption, the unpaired document's rows -------------------------------------


@pytest.mark.parametrize("mask_prob, random_prob", [(1.0, 0.0), (0.0, 1.0)])
def test_decoder_input_is_corrupted_at_the_configured_probabilities(tiny_model, mask_prob, random_prob):
    """The decoder's masked tokens take the objective's mask_token_prob / random_token_prob (not BERT's 0.8 / 0.1):
    at (1, 0) every one is [MASK]; at (0, 1) every one is the random ordinary token of stream DECODER_RANDOM_IDS,
    replacement_ids[floor(u * n)], the row's seed that of its document (anchor, rows b) or the derived partner seed
    (rows b + B). Document 1 (4 sentences, 14 tokens, T = 8) makes two spans; documents 0 and 2 (5 tokens) one
    each: their partner rows (3 and 5) are stand-ins without MLM tokens, and none of their rows has decoder
    targets; their anchor rows (0 and 2) keep their MLM tokens."""
    objective, tokenizer = make(tiny_model, max_span_tokens=8, short_span_prob=0.0, mask_token_prob=mask_prob,
                                random_token_prob=random_prob)
    batch = {**document_batch([[2, 3], [3, 4, 2, 5], [2, 3]]), "seeds": seeds(3, 3)}
    spans = objective.prepare(batch)["spans"]
    ids, decoder_ids, targets = spans["input_ids"], spans["decoder_input_ids"], spans["decoder_targets"]
    assert targets[[1, 4]].all(-1).logical_not().all() and targets[[1, 4]].any(-1).all()
    assert not targets[[0, 2, 3, 5]].any(), "a single-span document decodes nothing"
    assert spans["encoder_mask"][[0, 1, 2, 4]].any(-1).all() and not spans["encoder_mask"][[3, 5]].any()
    paired = targets[[1, 4]]
    if mask_prob == 1.0:
        expected = torch.where(paired, tokenizer.mask_token_id, ids[[1, 4]])
    else:
        row_seeds = torch.cat([batch["seeds"], cotmae.derived_seeds(batch["seeds"], cotmae.PARTNER_SEEDS)])[[1, 4]]
        table = objective.tables.replacement_ids
        u = uniform(row_seeds, cotmae.DECODER_RANDOM_IDS, torch.arange(ids.shape[1])[None])
        expected = torch.where(paired, table[(u * table.numel()).long()], ids[[1, 4]])
        assert not (decoder_ids == tokenizer.mask_token_id).any()
    assert torch.equal(decoder_ids[[1, 4]], expected)


# ----- the cut's building blocks, by hand --------------------------------------------------------------------------


def test_sentence_lengths_count_each_sentences_tokens():
    """Row 0: sentence 0 has 2 tokens, sentence 1 has 3 (one padding); row 1: 1 token, and no sentence 1 (0).
    A batch of empty documents still has one (empty) sentence column."""
    got = cotmae.sentence_lengths(torch.tensor([[0, 0, 1, 1, 1, -1], [0, -1, -1, -1, -1, -1]]))
    assert got.tolist() == [[2, 3], [1, 0]]
    assert cotmae.sentence_lengths(torch.tensor([[-1, -1]])).tolist() == [[0]]


def test_wrap_spans_puts_each_span_between_the_special_tokens():
    """ids 11 .. 20; row 0 the 3 tokens from 2 (13 14 15), row 1 the 9 from 0: width 1 + 16 (9 rounded up to 8s) + 1
    = 18, [CLS]=101 span [SEP]=102 then padding 0; the attention mask covers [CLS] .. [SEP]."""
    ids = torch.arange(11, 21)[None].repeat(2, 1)
    out, mask = cotmae.wrap_spans(ids, torch.tensor([2, 0]), torch.tensor([3, 9]), torch.tensor([101]),
                                  torch.tensor([102]), 0)
    assert out.shape == mask.shape == (2, 18)
    assert out[0].tolist() == [101, 13, 14, 15, 102] + [0] * 13
    assert out[1].tolist() == [101, *range(11, 20), 102] + [0] * 7
    assert mask.sum(-1).tolist() == [5, 11] and mask[0, :5].all() and mask[1, :11].all()
    bare, bare_mask = cotmae.wrap_spans(ids[:1], torch.tensor([9]), torch.tensor([1]), torch.tensor([], dtype=torch.long),
                                        torch.tensor([], dtype=torch.long), 0)
    assert bare.tolist() == [[20] + [0] * 7] and bare_mask.tolist() == [[1] + [0] * 7], "no special tokens: 8 wide"


def test_range_tokens_start_at_the_first_sentence_and_take_clipped_tokens():
    """Sentences of 3, 20 and 2 tokens, clipped to 3, 8, 2: range [1, 2) starts at token 3 and takes 8; [0, 3) starts
    at 0 and takes 3 + 8 + 2 = 13; [2, 2) (empty) starts at 3 + 20 = 23 and takes 0."""
    lengths, clipped = torch.tensor([[3, 20, 2]]).repeat(3, 1), torch.tensor([[3, 8, 2]]).repeat(3, 1)
    first, size = cotmae.range_tokens(lengths, clipped, torch.tensor([[1, 2], [0, 3], [2, 2]]))
    assert first.tolist() == [3, 0, 23] and size.tolist() == [8, 13, 0]


def test_span_range_finds_the_kth_span():
    """Spans start at sentences 0, 2, 3 and run to ends[s]: span 0 = [0, 2), 1 = [2, 3), 2 = [3, 5); a k past the last
    span stays inside the row (first sentence clamped to 4)."""
    is_start = torch.tensor([[True, False, True, True, False]]).repeat(4, 1)
    ends = torch.tensor([[2, 2, 3, 5, 5]]).repeat(4, 1)
    got = cotmae.span_range(is_start, ends, torch.tensor([0, 1, 2, 3]))
    assert got.tolist() == [[0, 2], [2, 3], [3, 5], [4, 5]]


def test_greedy_span_starts_follow_the_chain_from_sentence_0():
    """next 0 -> 2 -> 3 -> 5 (the end): starts 0, 2, 3. Eight one-sentence spans need the chain's full 7 steps
    (log2 rounds of pointer jumping: every sentence a start). A document of 3 sentences in a row of 5: a next start
    at or past 3 ends the chain. No sentence: no start; a single sentence: one start."""
    got = cotmae.greedy_span_starts(torch.tensor([[2, 2, 3, 5, 5]]), torch.tensor([5]))
    assert got.tolist() == [[True, False, True, True, False]]
    chain = cotmae.greedy_span_starts(torch.arange(1, 9)[None], torch.tensor([8]))
    assert chain.tolist() == [[True] * 8]
    short = cotmae.greedy_span_starts(torch.tensor([[1, 4, 4, 4, 4], [1, 2, 3, 4, 5], [5] * 5]), torch.tensor([3, 0, 1]))
    assert short.tolist() == [[True, True, False, False, False], [False] * 5, [True] + [False] * 4]


def test_special_token_buffers_are_not_saved(tiny_model):
    """[CLS] and [SEP] are buffers (they follow the model to its device) but not state: a checkpoint holds the
    model's weights only, so one saved without them still loads strictly."""
    objective, tokenizer = make(tiny_model, max_span_tokens=8)
    assert objective._prefix.tolist() == [tokenizer.cls_token_id] and objective._suffix.tolist() == [tokenizer.sep_token_id]
    assert not [k for k in objective.state_dict() if k.endswith(("_prefix", "_suffix"))]


def test_reference_span_inputs_are_cropped_to_max_span_tokens(monkeypatch, tiny_model):
    """span_cut reference, T = 4, one document of three 3-token sentences (ids 10 .. 18): span 0 takes sentences 0
    and 1 (3 + 3 = 6 > 4: the crossing sentence included), span 1 sentence 2. Anchor span 0 (u = 0), partner RANDOM
    (u = 0): span 1. The anchor is cropped to 4 tokens at offset floor(0.99 * (6 - 4 + 1)) = 2: ids 12 .. 15; the
    partner (3 tokens) is whole: 16 17 18."""
    monkeypatch.setattr(cotmae, "uniform", stream_draws({cotmae.CROP: 0.99}))
    objective, tokenizer = make(tiny_model, max_span_tokens=4, short_span_prob=0.0, span_cut="reference")
    spans = objective.prepare({**document_batch([[3, 3, 3]]), "seeds": seeds(1)})["spans"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = [spans["input_ids"][r][spans["attention_mask"][r].bool()].tolist() for r in (0, 1)]
    assert rows == [[cls, 12, 13, 14, 15, sep], [cls, 16, 17, 18, sep]]


def test_span_wrapping_and_sentence_lengths_are_made_on_the_inputs_device(monkeypatch):
    """Users train on GPUs: the meta device stands in for one (mixing a CPU tensor into a meta computation raises).
    The one value read off the tensors (the longest span, the most sentences) meta cannot give: it is handed over."""
    meta = torch.device("meta")
    monkeypatch.setattr(cotmae, "int", lambda value: 3, raising=False)
    ids, start, size = (torch.zeros(2, 12, dtype=torch.long, device=meta), torch.ones(2, dtype=torch.long, device=meta),
                        torch.full((2,), 3, dtype=torch.long, device=meta))
    prefix, suffix = torch.tensor([101], device=meta), torch.tensor([102], device=meta)
    tokens, mask = cotmae.wrap_spans(ids, start, size, prefix, suffix, 0)
    assert (tokens.device, mask.device, tuple(tokens.shape)) == (meta, meta, (2, 10))  # width 1 + 8 + 1
    lengths = cotmae.sentence_lengths(torch.zeros(2, 5, dtype=torch.long, device=meta))
    assert (lengths.device, tuple(lengths.shape)) == (meta, (2, 4))  # most sentences: 3 + 1
