"""COSTA's rules pinned from the mutation run's survivors (methods.md §1.4): the config defaults and bounds, the span
sampler's formula, each span as its own padded input, the group-wise loss (global text ids, a text without spans),
the forward pass by hand (projector on [CLS], mean-pooled spans, the loss over the global batch on one process of
several), the checkpointed chunks and the item counts. Expected values by hand on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import retromae.objectives.costa as costa
from test_more_objectives import batch_of, make, ordinary_ids
from retromae.config import ConfigError
from retromae.objectives import build_objective_config
from retromae.objectives.costa import group_contrastive_loss_sum, sample_spans
from retromae.rng import example_seeds

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


# ----- the config -------------------------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    """methods.md §1.4: word 1-3, phrase 4-16, sentence 16-64, paragraph 64-128 tokens, 5 spans per granularity,
    cosine similarity with tau = 0.1, L = MLM + L_span; the span loss is batch-wide (its negatives: the batch)."""
    cfg = build_objective_config({"name": "costa"})
    assert type(cfg).__name__ == "COSTAConfig" and cfg.name == "costa"
    assert cfg.span_lengths == [[1, 3], [4, 16], [16, 64], [64, 128]]
    assert cfg.spans_per_granularity == 5 and cfg.temperature == 0.1 and cfg.span_weight == 1.0
    assert cfg.own_spans_in_denominator is True and cfg.cross_process is True
    assert cfg.span_checkpointing is True and cfg.span_chunk == 0.25
    assert cfg.batch_wide_losses() == ["span"]


@pytest.mark.parametrize("settings", [
    {"span_lengths": [[1, 1]]}, {"span_lengths": [[2, 2], [1, 5]]}, {"span_chunk": 1e-9},
    {"spans_per_granularity": 1}, {"temperature": 1e-9}])
def test_config_bounds_accept_their_edges(settings):
    cfg = build_objective_config({"name": "costa", **settings})
    for key, value in settings.items():
        assert getattr(cfg, key) == value


@pytest.mark.parametrize("settings", [
    {"span_lengths": [[0, 1]]}, {"span_lengths": [[3, 2]]}, {"span_lengths": [[1, 3], [1]]},
    {"span_lengths": [[1, 2, 3]]}, {"span_chunk": 0.0}, {"span_chunk": -0.5},
    {"spans_per_granularity": 0}, {"temperature": 0.0}, {"temperature": -0.1}])
def test_config_bounds_refuse_past_their_edges(settings):
    with pytest.raises(ConfigError):
        build_objective_config({"name": "costa", **settings})


# ----- the span sampler -------------------------------------------------------------------------------------------


def fake_draws(monkeypatch, table):
    """costa.uniform answering table[stream] (B, slots), after checking that each slot has its own counter."""
    def uniform(seeds, stream, counters):
        assert counters.tolist() == [list(range(table[stream].shape[1]))]
        return table[stream]
    monkeypatch.setattr(costa, "uniform", uniform)


def test_span_length_and_start_formula_by_hand(monkeypatch):
    """ranges [[2, 5], [1, 1]], 2 spans each: slots lo = 2, 2, 1, 1 and hi = 5, 5, 1, 1 (granularity-major).
    size = lo + floor(u_len (hi - lo + 1)), at most hi, clipped to the text (at least 1); start = floor(u_start room),
    room = n - size + 1 (at least 1). Lengths from stream 31, starts from stream 32."""
    lengths = torch.tensor([10, 3, 0])
    u_len = torch.tensor([[0.0, 0.99, 0.5, 0.99], [0.99, 0.5, 0.0, 0.3], [0.5, 0.5, 0.5, 0.5]])
    u_start = torch.tensor([[0.99, 0.5, 0.0, 0.99], [0.99, 0.99, 0.5, 0.7], [0.9, 0.9, 0.9, 0.9]])
    fake_draws(monkeypatch, {31: u_len, 32: u_start})
    start, size = sample_spans(lengths, torch.zeros(3, dtype=torch.int32), [[2, 5], [1, 1]], 2)
    # text 0 (n = 10): 2 + 0 = 2, room 9, floor(8.91) = 8 | 2 + floor(3.96) = 5, room 6, floor(3) = 3
    #                  1 + 0 = 1, room 10, 0 | 1 + floor(0.99) = 1, room 10, floor(9.9) = 9
    # text 1 (n = 3):  2 + 3 = 5 -> 3, room 1, 0 | 2 + 2 = 4 -> 3, room 1, 0 | 1, room 3, floor(1.5) = 1
    #                  1, room 3, floor(2.1) = 2
    # text 2 (n = 0, no ordinary token): 1 token, room max(0 - 1 + 1, 1) = 1, start 0
    assert size.tolist() == [[2, 5, 1, 1], [3, 3, 1, 1], [1, 1, 1, 1]]
    assert start.tolist() == [[8, 3, 0, 9], [0, 0, 1, 2], [0, 0, 0, 0]]


def test_a_draw_of_one_stays_inside_the_range_and_the_text(monkeypatch):
    """At the top of the draws (u = 1): size = lo + (hi - lo + 1) is held at hi, start = room at room - 1."""
    fake_draws(monkeypatch, {31: torch.ones(1, 2), 32: torch.ones(1, 2)})
    start, size = sample_spans(torch.tensor([10]), torch.zeros(1, dtype=torch.int32), [[2, 5]], 2)
    assert size.tolist() == [[5, 5]] and start.tolist() == [[5, 5]]  # room 10 - 5 + 1 = 6: start 5, end 10


def test_span_lengths_take_the_whole_range_from_the_draw(monkeypatch):
    """Range [2, 5]: size = 2 + floor(u (5 - 2 + 1)) = 2 + floor(4 u): u = 0.3 -> 2 + 1 = 3, u = 0.6 -> 2 + 2 = 4
    (both under the clamp at 5 - 2 = 3), on a text of 10 tokens; starts at u = 0."""
    fake_draws(monkeypatch, {31: torch.tensor([[0.3, 0.6]]), 32: torch.zeros(1, 2)})
    start, size = sample_spans(torch.tensor([10]), torch.zeros(1, dtype=torch.int32), [[2, 5]], 2)
    assert size.tolist() == [[3, 4]] and start.tolist() == [[0, 0]]


def test_span_draws_are_made_on_the_inputs_device():
    meta = torch.device("meta")
    start, size = sample_spans(torch.full((2,), 10, device=meta), torch.zeros(2, dtype=torch.int32, device=meta),
                               [[1, 3], [4, 6]], 2)
    assert start.device == size.device == meta and start.shape == size.shape == (2, 4)


# ----- each span as its own input ---------------------------------------------------------------------------------


def test_span_inputs_by_hand(tiny_model):
    """[CLS] span [SEP] then padding, to a width of 1 + (longest span rounded up to 8) + 1; attention on the
    wrapped span, token_mask on the span's own tokens; rows text-major ((text, span) -> text * spans + span)."""
    objective, tokenizer = make(tiny_model, "costa")
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    w = ordinary_ids(tokenizer, 20)
    ids = torch.tensor([[cls] + w[:10] + [sep], [cls] + w[10:20] + [sep]])  # 12 tokens a row
    start, size = torch.tensor([[1, 9], [3, 1]]), torch.tensor([[2, 3], [1, 8]])
    out = objective._span_inputs(ids, start, size)
    width = 1 + 8 + 1  # longest span 8 tokens: 8 (a multiple of 8 already)
    rows = [[cls] + w[0:2] + [sep], [cls] + w[8:10] + [sep] + [sep],  # text 0: tokens 1-2; 9-11 (ends at its [SEP])
            [cls] + w[12:13] + [sep], [cls] + w[10:18] + [sep]]  # text 1: token 3; tokens 1-8
    expected = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    assert torch.equal(out["input_ids"], expected)
    assert out["attention_mask"].tolist() == [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    sizes = [2, 3, 1, 8]
    assert out["token_mask"].tolist() == [[False] + [True] * s + [False] * (width - 1 - s) for s in sizes]
    # 9 tokens: rounded up to 16, width 18; 1 token: 8, width 10
    assert objective._span_inputs(ids, torch.tensor([[1]]).expand(2, 1), torch.tensor([[9], [1]]))[
        "input_ids"].shape == (2, 18)
    assert objective._span_inputs(ids, torch.tensor([[1], [2]]), torch.tensor([[1], [1]]))["input_ids"].shape == (2, 10)


def test_span_inputs_reach_the_last_token_of_the_longest_row(tiny_model):
    """A span that ends at the last column of the batch: its padding reads past the row, which must stay inside."""
    objective, tokenizer = make(tiny_model, "costa")
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    w = ordinary_ids(tokenizer, 4)
    out = objective._span_inputs(torch.tensor([[cls] + w + [sep]]), torch.tensor([[4]]), torch.tensor([[2]]))
    assert out["input_ids"].tolist() == [[cls, w[3], sep, sep] + [pad] * 6]


def test_span_inputs_from_a_rows_first_token_with_a_two_token_wrapping(tiny_model):
    """A wrapping of two tokens each side (a = 7, b = 8 before; c = 9, d = 10 after), rows of 4 ids 21 .. 24 and
    31 .. 34. Row 0's span starts at its very first token (column 0): 2 tokens, 21 22; row 1's: 1 token from 2, 33.
    Width 2 + 8 + 2 = 12: [a b 21 22 c d pad...] and [a b 33 c d pad...]; the suffix right after each span."""
    objective, tokenizer = make(tiny_model, "costa")
    objective._prefix, objective._suffix = torch.tensor([7, 8]), torch.tensor([9, 10])
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[21, 22, 23, 24], [31, 32, 33, 34]])
    out = objective._span_inputs(ids, torch.tensor([[0], [2]]), torch.tensor([[2], [1]]))
    assert out["input_ids"].tolist() == [[7, 8, 21, 22, 9, 10] + [pad] * 6, [7, 8, 33, 9, 10] + [pad] * 7]
    assert out["attention_mask"].tolist() == [[1] * 6 + [0] * 6, [1] * 5 + [0] * 7]
    assert out["token_mask"].tolist() == [[False] * 2 + [True] * 2 + [False] * 8, [False] * 2 + [True] + [False] * 9]


def test_span_inputs_are_made_on_the_inputs_device(tiny_model, monkeypatch):
    """Users train on GPUs: the meta device stands in for one (mixing a CPU tensor into a meta computation raises).
    The one value read off the spans, the longest span's length, meta cannot give: it is handed over (3 tokens)."""
    objective, _ = make(tiny_model, "costa")
    meta = torch.device("meta")
    objective.to(meta)
    monkeypatch.setattr(costa, "int", lambda value: 3, raising=False)
    out = objective._span_inputs(torch.zeros(2, 12, dtype=torch.long, device=meta),
                                 torch.ones(2, 3, dtype=torch.long, device=meta),
                                 torch.full((2, 3), 3, dtype=torch.long, device=meta))
    assert {v.device for v in out.values()} == {meta}
    assert [tuple(v.shape) for v in out.values()] == [(6, 10)] * 3  # width 1 + 8 + 1


def test_prepare_makes_one_input_per_granularity_from_the_first_ordinary_token(tiny_model):
    """Row 0 has [UNK] after [CLS], so its ordinary tokens start at position 2. Granularities [[1, 1], [2, 2]],
    one span each, on texts of 2 ordinary tokens: group 0 holds each text's 1-token span, group 1 its whole text."""
    objective, tokenizer = make(tiny_model, "costa", span_lengths=[[1, 1], [2, 2]], spans_per_granularity=1)
    cls, sep, unk, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id
    w = ordinary_ids(tokenizer, 4)
    ids = torch.tensor([[cls, unk, w[0], w[1], sep], [cls, w[2], w[3], sep, pad]])
    batch = objective.prepare({"input_ids": ids, "attention_mask": torch.tensor([[1] * 5, [1] * 4 + [0]]),
                               "seeds": example_seeds(5, 0, torch.arange(2))})
    groups = batch["span_groups"]
    assert len(groups) == 2 and [g["input_ids"].shape for g in groups] == [(2, 10), (2, 10)]
    whole = [g[: 4].tolist() for g in groups[1]["input_ids"]]
    assert whole == [[cls, w[0], w[1], sep], [cls, w[2], w[3], sep]]
    one = [g[1].item() for g in groups[0]["input_ids"]]
    assert one[0] in (w[0], w[1]) and one[1] in (w[2], w[3])


# ----- the group-wise loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("own_in_denominator", [True, False])
def test_group_loss_with_global_ids_and_a_text_without_spans(own_in_denominator):
    """Local texts have global ids 5, 6, 7 (first_text 5); spans 0, 1 are text 5's, span 2 another process's text
    9's, span 3 text 7's; text 6 owns none and adds 0 (no division by zero). tau = 0.5.
    text 5 = (3, 4) / 5 = (0.6, 0.8): cosines with (1, 0), (0, 1), (-1, 0), (0, -1): 0.6, 0.8, -0.6, -0.8;
    logits 1.2, 1.6, -1.2, -1.6. text 7 = (0, 1): cosines 0, 1, 0, -1; logits 0, 2, 0, -2, one positive (-2)."""
    texts = torch.tensor([[3.0, 4.0], [1.0, -1.0], [0.0, 1.0]])
    spans = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -3.0]])
    owner = torch.tensor([5, 5, 9, 7])
    e = math.exp
    if own_in_denominator:
        lse = math.log(e(1.2) + e(1.6) + e(-1.2) + e(-1.6))
        text5 = -((1.2 - lse) + (1.6 - lse)) / 2
    else:  # each positive against itself and the negatives (spans 2, 3)
        text5 = -((1.2 - math.log(e(1.2) + e(-1.2) + e(-1.6))) + (1.6 - math.log(e(1.6) + e(-1.2) + e(-1.6)))) / 2
    text7 = -(-2 - math.log(e(0) + e(2) + e(0) + e(-2)))
    got = group_contrastive_loss_sum(texts, spans, owner, 5, 0.5, own_in_denominator)
    assert got.item() == pytest.approx(text5 + text7, rel=1e-6)


def test_group_loss_is_made_on_the_inputs_device():
    meta = torch.device("meta")
    texts, spans = torch.randn(2, 3, device=meta), torch.randn(4, 3, device=meta)
    owner = torch.tensor([0, 0, 1, 1], device=meta)
    for flag in (True, False):
        assert group_contrastive_loss_sum(texts, spans, owner, 0, 0.1, flag).device == meta


# ----- the forward pass by hand -----------------------------------------------------------------------------------


SPANS = {"span_lengths": [[1, 2], [3, 4]], "spans_per_granularity": 2}  # 4 spans a text, 2 granularities


def by_hand(objective, batch):
    """(text vectors (B, D): projector on the encoder's [CLS] state; span vectors (B, 4, D) in granularity-major
    order: each span encoded alone, unpadded, as [CLS] span [SEP], the mean of its span tokens' states)."""
    with torch.no_grad():
        hidden = objective.arch.forward(batch["encoder_input_ids"], batch["attention_mask"])
        texts = objective.projector(hidden[:, 0])
        spans = [[] for _ in range(texts.shape[0])]
        for group in batch["span_groups"]:
            per = group["input_ids"].shape[0] // texts.shape[0]
            for row in range(group["input_ids"].shape[0]):
                n = int(group["attention_mask"][row].sum())
                size = int(group["token_mask"][row].sum())
                states = objective.arch.forward(group["input_ids"][row : row + 1, :n], torch.ones(1, n, dtype=torch.long))
                spans[row // per].append(states[0, 1 : 1 + size].mean(0))
    return hidden, texts, torch.stack([torch.stack(s) for s in spans])


def loss_by_hand(texts, spans_of, owner_of, own_ids, tau, visible=None):
    """sum over local texts i (global id own_ids[i]) of -1/|P| sum_p log softmax at p over the spans i may see."""
    total = 0.0
    for i, me in enumerate(own_ids):
        cols = [j for j in range(len(spans_of)) if visible is None or j in visible[i]]
        sims = torch.stack([F.cosine_similarity(texts[i], spans_of[j], dim=0) / tau for j in cols]).double()
        own = [k for k, j in enumerate(cols) if owner_of[j] == me]
        total -= sum((sims[k] - torch.logsumexp(sims, 0)).item() for k in own) / len(own)
    return total


def test_forward_by_hand_on_one_process(tiny_model, docstrings):
    objective, tokenizer = make(tiny_model, "costa", temperature=0.5, **SPANS)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:3]], max_len=24))
    hidden, texts, spans = by_hand(objective, batch)
    losses = objective(batch)
    assert set(losses) == {"mlm", "span"}
    flat = spans.flatten(0, 1)  # text-major: text t owns rows 4t .. 4t + 3
    expected = loss_by_hand(texts, flat, [r // 4 for r in range(12)], [0, 1, 2], 0.5)
    assert losses["span"].item() == pytest.approx(expected, rel=1e-5)
    # MLM: cross-entropy of the head at the masked positions, on the same encoder states
    log_probs = torch.log_softmax(objective.arch.head(hidden).double(), -1)
    mlm = -sum(log_probs[b, j, batch["input_ids"][b, j]].item() for b, j in batch["encoder_mask"].nonzero().tolist())
    assert losses["mlm"].item() == pytest.approx(mlm, rel=1e-5)


def fake_world(monkeypatch, other_spans, other_docs, local, spans_per_text):
    """This process is rank 1 of 2; rank 0 holds `other_spans` (its texts 0 .. local - 1) and `other_docs`."""
    monkeypatch.setattr(costa, "world", lambda: (1, 2))
    monkeypatch.setattr(costa, "gather_with_grad", lambda t: torch.cat([other_spans.to(t.dtype), t]))

    def gather(t):  # owner ids (local * spans_per_text of them): rank 0's are ours less `local`; else the docs
        return torch.cat([t - local, t]) if t.shape[0] == local * spans_per_text else torch.cat([other_docs, t])
    monkeypatch.setattr(costa, "gather", gather)


@pytest.mark.parametrize("cross_process", [True, False])
def test_forward_on_rank_1_of_2(tiny_model, docstrings, cross_process):
    """Two texts a process, 4 spans a text. Cross-process: our texts are global 2, 3 against rank 0's 8 spans
    (texts 0, 1; docs 5, 6) and ours (docs 5, 7): our text 2 (doc 5) does not see rank 0's text 0 (doc 5).
    Without: our texts are 0, 1 against our own 8 spans only, the docs of rank 0 unseen."""
    objective, tokenizer = make(tiny_model, "costa", temperature=0.5, cross_process=cross_process, **SPANS)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[3:5]], max_len=24))
    batch["doc"] = torch.tensor([5, 7])
    _, texts, spans = by_hand(objective, batch)
    ours = spans.flatten(0, 1)
    torch.manual_seed(1)
    # near our spans (at initialisation all span vectors are close): else rank 0's logits leave no trace
    other = ours.flip(0) + 0.05 * ours.std() * torch.randn(ours.shape)
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake_world(monkeypatch, other, torch.tensor([5, 6]), 2, 4)
        with torch.no_grad():
            got = objective(batch)["span"].item()
    owners = [r // 4 for r in range(8)]
    local = loss_by_hand(texts, ours, owners, [0, 1], 0.5)
    if cross_process:
        every = torch.cat([other, ours])
        visible = [[j for j in range(16) if j >= 4], list(range(16))]  # text 2 (doc 5) skips text 0's spans 0-3
        expected = loss_by_hand(texts, every, [r // 4 for r in range(16)], [2, 3], 0.5, visible)
        assert abs(expected - local) > 1e-3
        assert abs(expected - loss_by_hand(texts, every, [r // 4 for r in range(16)], [2, 3], 0.5)) > 1e-3
    else:
        expected = local
    assert got == pytest.approx(expected, rel=1e-5)


def test_forward_on_rank_1_of_2_without_documents(tiny_model, docstrings):
    """A batch without `doc` on rank 1 of 2: there are no documents to gather (gather(None) would fail on a real
    process group), and no span is left out: texts 2, 3 against all 16 spans, rank 0's 8 then ours."""
    objective, tokenizer = make(tiny_model, "costa", temperature=0.5, **SPANS)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[3:5]], max_len=24))
    _, texts, spans = by_hand(objective, batch)
    ours = spans.flatten(0, 1)
    torch.manual_seed(1)
    other = ours.flip(0) + 0.05 * ours.std() * torch.randn(ours.shape)
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake_world(monkeypatch, other, None, 2, 4)
        with torch.no_grad():
            got = objective(batch)["span"].item()
    expected = loss_by_hand(texts, torch.cat([other, ours]), [r // 4 for r in range(16)], [2, 3], 0.5)
    assert abs(expected - loss_by_hand(texts, ours, [r // 4 for r in range(8)], [0, 1], 0.5)) > 1e-3
    assert got == pytest.approx(expected, rel=1e-5)


# ----- checkpointed chunks and item counts ------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing, grad, chunks", [
    (True, True, [2, 2, 2]), (True, False, []), (False, True, [])])
def test_spans_are_checkpointed_in_chunks_only_when_training(tiny_model, docstrings, monkeypatch, checkpointing,
                                                             grad, chunks):
    """Texts (2, 10): 20 text tokens; span_chunk 1.0: 20 span tokens a chunk; each group is 2 texts x 3 spans of
    width 10 (spans of 1-2 tokens: 8 + [CLS] + [SEP]): 20 // 10 = 2 rows a chunk, 3 chunks a group. No chunks
    without a gradient (nothing to save) or with span_checkpointing off."""
    import torch.utils.checkpoint as checkpointing_module

    objective, tokenizer = make(tiny_model, "costa", span_lengths=[[1, 2]], spans_per_granularity=3,
                                span_checkpointing=checkpointing, span_chunk=1.0)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=10))
    assert batch["input_ids"].shape == (2, 10) and batch["span_groups"][0]["input_ids"].shape == (6, 10)
    seen, original = [], checkpointing_module.checkpoint

    def spy(function, *args, **kwargs):
        seen.append(args[0].shape[0])
        return original(function, *args, **kwargs)
    monkeypatch.setattr(checkpointing_module, "checkpoint", spy)
    with torch.set_grad_enabled(grad):
        objective(batch)
    assert seen == chunks


def test_rows_a_chunk_are_at_least_one(tiny_model, docstrings, monkeypatch):
    """span_chunk 0.01 of 20 text tokens: 0 span tokens, so one row a chunk, 6 chunks."""
    import torch.utils.checkpoint as checkpointing_module

    objective, tokenizer = make(tiny_model, "costa", span_lengths=[[1, 2]], spans_per_granularity=3, span_chunk=0.01)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=10))
    seen, original = [], checkpointing_module.checkpoint
    monkeypatch.setattr(checkpointing_module, "checkpoint",
                        lambda f, *a, **k: seen.append(a[0].shape[0]) or original(f, *a, **k))
    objective(batch)
    assert seen == [1] * 6


def test_num_items_counts_texts_on_the_inputs_device(tiny_model):
    """The span loss is a sum over texts: its count is the batch's texts (3), not its length (7)."""
    objective, _ = make(tiny_model, "costa")
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    counts = objective.num_items({"input_ids": torch.zeros(3, 7, dtype=torch.long), "encoder_mask": mask})
    assert counts["span"].item() == 3 and counts["mlm"].item() == 2
    meta = torch.device("meta")
    on_meta = objective.num_items({"input_ids": torch.zeros(3, 7, dtype=torch.long, device=meta),
                                   "encoder_mask": mask.to(meta)})
    assert {v.device for v in on_meta.values()} == {meta}


def test_the_loss_is_taken_in_full_precision_from_a_half_precision_model(tiny_model, docstrings):
    """Under bf16 (autocast on GPUs) the texts' and spans' vectors go up to fp32 before the softmax."""
    objective, tokenizer = make(tiny_model, "costa", **SPANS)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=16))
    with torch.no_grad():
        span = objective.to(torch.bfloat16)(batch)["span"]
    assert span.dtype == torch.float32 and torch.isfinite(span)


def test_projector_weights_and_buffers(tiny_model):
    """The text's representation: an MLP (Linear, GELU, Linear) of the hidden size on h; the span loss weighted by
    span_weight; the [CLS] / [SEP] wrapping kept out of the saved state (it is the tokenizer's, not learnt)."""
    objective, tokenizer = make(tiny_model, "costa", span_weight=2.5)
    hidden = objective.encoder.config.hidden_size
    linear1, act, linear2 = objective.projector
    assert isinstance(act, torch.nn.GELU)
    assert linear1.weight.shape == linear2.weight.shape == (hidden, hidden)
    assert objective.loss_weights == {"span": 2.5}
    assert objective._prefix.tolist() == [tokenizer.cls_token_id] and objective._suffix.tolist() == [tokenizer.sep_token_id]
    assert not any(k.endswith(("_prefix", "_suffix")) for k in objective.state_dict())


def test_forward_makes_its_span_owners_on_the_inputs_device(tiny_model, monkeypatch):
    """Users train on GPUs: the meta device stands in for one (mixing a CPU tensor into a meta computation raises).
    The encoder (transformers reads values off its mask, which meta cannot give) and the MLM loss are stubbed out:
    hidden states and pooled spans are handed over on meta."""
    objective, _ = make(tiny_model, "costa", **SPANS)
    meta, hidden_size = torch.device("meta"), objective.encoder.config.hidden_size
    objective.projector.to(meta)
    monkeypatch.setattr(objective, "encode", lambda batch: torch.randn(2, 6, hidden_size, device=meta))
    monkeypatch.setattr(objective, "_pooled_spans", lambda group, tokens: torch.randn(4, hidden_size, device=meta))
    monkeypatch.setattr(objective, "mlm_loss", lambda hidden, batch: hidden.sum())
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long, device=meta), "span_groups": [{}, {}]}
    with torch.no_grad():
        span = objective(batch)["span"]
    assert span.device == meta and span.shape == ()
