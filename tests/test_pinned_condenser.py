"""Condenser / coCondenser rules pinned from the mutation run's survivors (docs/mutation.md): the config bounds, the
loss weights, the head's padding mask and rotary positions, the two disjoint windows and the two document spans
drawn uniformly, the span contrast on one process of several (other processes' spans as negatives, their spans of
the same document spared), and every tensor made on the input's device. Expected values by hand on tiny inputs."""

from __future__ import annotations

import pytest
import torch

import retromae.objectives.condenser as condenser
from test_more_objectives import batch_of, document_batch, make
from retromae.config import ConfigError
from retromae.objectives import build_objective_config
from retromae.objectives.condenser import span_contrast_sum, two_disjoint_spans, two_document_spans
from retromae.rng import example_seeds


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


@pytest.fixture(scope="module")
def tiny_modernbert(tiny_family):
    """A rotary, pre-norm encoder: its Condenser head has rotary attention."""
    return tiny_family("modernbert")


@pytest.fixture(scope="module")
def tiny_roberta(tiny_family):
    """Positions after the padding index: a table of 130 rows holds 128 positions."""
    return tiny_family("roberta")


def seeds(n, seed=0):
    return example_seeds(seed, 0, torch.arange(n))


# ----- configuration bounds and loss weights -------------------------------------------------------------------


def test_config_bounds_accept_one_and_refuse_zero(tiny_model, docstrings):
    """skip_from >= 1, head_layers >= 1 (each checked alone), span_tokens >= 1; skip_from may be the last layer
    (the tiny model has 2) but not past it. The smallest head (one layer, on layer 2 = the last) runs."""
    build_objective_config({"name": "condenser", "skip_from": 1, "head_layers": 1})
    for bad in ({"skip_from": 0, "head_layers": 2}, {"skip_from": 1, "head_layers": 0}):
        with pytest.raises(ConfigError, match="must be >= 1"):
            build_objective_config({"name": "condenser", **bad})
    build_objective_config({"name": "cocondenser", "span_tokens": 1})
    with pytest.raises(ConfigError, match="span_tokens must be >= 1"):
        build_objective_config({"name": "cocondenser", "span_tokens": 0})
    with pytest.raises(ConfigError, match="skip_from=3: the model has 2 layers"):
        make(tiny_model, "condenser", skip_from=3)
    objective, tokenizer = make(tiny_model, "condenser", skip_from=2, head_layers=1)
    assert len(objective.head.layers) == 1
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=16))
    with torch.no_grad():
        losses = objective(batch)
    assert set(losses) == {"mlm", "head"} and all(torch.isfinite(v) for v in losses.values())


def test_loss_weights_are_the_configured_ones_by_loss_name(tiny_model):
    """L = mlm + head_weight * head (+ contrast_weight * contrast): the trainer reads loss_weights.get(name, 1.0)
    with the names forward() returns."""
    objective, _ = make(tiny_model, "condenser", skip_from=1, head_weight=0.5)
    assert {n: objective.loss_weights.get(n, 1.0) for n in ("mlm", "head")} == {"mlm": 1.0, "head": 0.5}
    objective, _ = make(tiny_model, "cocondenser", skip_from=1, head_weight=0.5, contrast_weight=0.25)
    assert {n: objective.loss_weights.get(n, 1.0) for n in ("mlm", "head", "contrast")} == \
        {"mlm": 1.0, "head": 0.5, "contrast": 0.25}


def test_document_spans_must_fit_the_models_positions_and_windows_need_not(tiny_model, tiny_roberta):
    """span_source=document_spans: span_tokens + [CLS] + [SEP] <= the positions the model reads (128 in the tiny
    models), so 126 is accepted and 127 refused; RoBERTa's table has 130 rows but its positions start after the
    padding index (2): 128 positions too, and a span of 126 + 2 tokens runs. Windows are cut from an example that
    already fits (no check)."""
    for model in (tiny_model, tiny_roberta):
        objective, _ = make(model, "cocondenser", skip_from=1, span_tokens=126, span_source="document_spans")
        with pytest.raises(ConfigError, match="span_tokens=127 plus 2 special tokens exceeds the model's 128 positions"):
            make(model, "cocondenser", skip_from=1, span_tokens=127, span_source="document_spans")
        make(model, "cocondenser", skip_from=1, span_tokens=1000)  # windows
    assert objective.encoder.config.max_position_embeddings == 130
    batch = objective.prepare({**document_batch([[130]]), "seeds": seeds(1)})
    assert batch["spans"]["attention_mask"].sum(-1).tolist() == [128, 128]
    with torch.no_grad():
        assert torch.isfinite(objective(batch)["contrast"])


def test_span_wrapping_tokens_are_not_saved_with_the_weights(tiny_model):
    """The [CLS] / [SEP] ids coCondenser wraps spans in are tokenizer facts, not weights: a checkpoint of the
    objective holds the encoder's and the head's parameters only."""
    objective, tokenizer = make(tiny_model, "cocondenser", skip_from=1)
    assert objective._prefix.tolist() == [tokenizer.cls_token_id] and objective._suffix.tolist() == [tokenizer.sep_token_id]
    keys = set(objective.state_dict())
    assert not any("_prefix" in k or "_suffix" in k for k in keys)
    expected = {f"encoder.{k}" for k in objective.encoder.state_dict()} | {f"head.{k}" for k in objective.head.state_dict()}
    assert keys == expected


# ----- the head: padding mask and rotary positions -------------------------------------------------------------


def test_head_ignores_padded_positions(tiny_model, docstrings):
    """The head attends to the real tokens only: states at padded positions do not move a real token's output."""
    objective, tokenizer = make(tiny_model, "condenser", skip_from=1)
    texts = ["a short one", docstrings[0]["text"]]
    batch = objective.prepare(batch_of(tokenizer, texts, max_len=24))
    real = batch["attention_mask"].bool()
    assert not real[0].all(), "the first text is padded"
    with torch.no_grad():
        states = objective.arch.layer_states(batch["encoder_input_ids"], batch["attention_mask"])
        base = objective.head_states(states, batch["attention_mask"])
        changed = [s.clone() for s in states]
        for s in changed:
            s[~real] += 5.0
        moved = objective.head_states(changed, batch["attention_mask"])
    torch.testing.assert_close(moved[real], base[real], rtol=0, atol=1e-6)


def test_rotary_head_reads_positions_0_to_L(tiny_modernbert, docstrings):
    """On a rotary encoder the head's attention rotates queries and keys by the positions 0 .. L-1 of the input
    [last CLS ; skip_from tokens]; without positions its output would differ."""
    objective, tokenizer = make(tiny_modernbert, "condenser", skip_from=1, head_layers=1)
    assert objective.head.layers[0].attention.rotary is not None
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=20))
    mask = batch["attention_mask"]
    objective.head.double()  # float64: the rotation's effect at initialisation is small, but not zero
    with torch.no_grad():
        states = [s.double() for s in objective.arch.layer_states(batch["encoder_input_ids"], mask)]
        got = objective.head_states(states, mask)
        x = torch.cat([states[-1][:, :1], states[1][:, 1:]], dim=1)
        length = x.shape[1]
        assert length != x.shape[2]
        expected = objective.head(x, mask.bool()[:, None, :], torch.arange(length))
        unrotated = objective.head(x, mask.bool()[:, None, :], None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (got - unrotated).abs().max() > 1e-6


# ----- two disjoint windows --------------------------------------------------------------------------------------


def test_window_sizes_and_the_one_token_text():
    """size = min(most, n // 2), at least 1; a text of n = 2 * size has no room: windows [0, size) and [size, n);
    a one-token text gives its token twice (both windows start at 0)."""
    lengths = torch.tensor([10, 10, 3, 2, 1, 7])
    first, second, size = two_disjoint_spans(lengths, seeds(6), 100)
    # n // 2: 5, 5, 1, 1, 0 -> 1, 3
    assert size.tolist() == [5, 5, 1, 1, 1, 3]
    assert first[[0, 1, 3, 4]].tolist() == [0, 0, 0, 0] and second[[0, 1, 3, 4]].tolist() == [5, 5, 1, 0]
    _, _, size = two_disjoint_spans(lengths, seeds(6), 2)
    assert size.tolist() == [2, 2, 1, 1, 1, 2]


def test_windows_are_drawn_uniformly_among_disjoint_placements():
    """n = 10, size 3: room 4 = 10 - 2 * 3; the first start is uniform in 0..4, the second uniform in
    first + 3 .. 7 (the room after the first): P(f, s) = 1/5 * 1/(5 - f), 15 placements, all disjoint. n = 6 with
    size 3 has no room: always (0, 3)."""
    n = 6000
    first, second, size = two_disjoint_spans(torch.full((n,), 10), seeds(n, 3), 3)
    assert (size == 3).all()
    assert (first >= 0).all() and (first + 3 <= second).all() and (second + 3 <= 10).all()
    for f in range(5):
        for s in range(f + 3, 8):
            share = ((first == f) & (second == s)).float().mean().item()
            assert share == pytest.approx(1 / 5 / (5 - f), abs=0.02), (f, s)
    first, second, _ = two_disjoint_spans(torch.full((500,), 6), seeds(500, 4), 3)
    assert (first == 0).all() and (second == 3).all()


# ----- two document spans ---------------------------------------------------------------------------------------


def test_document_spans_are_every_ordered_pair_of_different_spans_uniformly():
    """A document of three 4-token sentences with most = 4 is cut into 3 spans starting at tokens 0, 4, 8; row b
    gets the first span, row b + B the second, a different one: each of the 6 ordered pairs has probability 1/6."""
    n = 12000
    sentence_ids = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4]).repeat(n, 1)
    start, size = two_document_spans(sentence_ids, seeds(n, 5), 4)
    assert (size == 4).all() and start.shape == (2 * n,)
    first, second = start[:n] // 4, start[n:] // 4
    assert (start % 4 == 0).all() and (first != second).all()
    for a in range(3):
        for b in range(3):
            if a != b:
                share = ((first == a) & (second == b)).float().mean().item()
                assert share == pytest.approx(1 / 6, abs=0.02), (a, b)


# ----- the span contrast on one process of several ---------------------------------------------------------------


def fake_world(monkeypatch, rank, size, other_reps, other_docs):
    """This process is `rank` of `size` = 2; the other process (rank 0) holds `other_reps` / `other_docs`."""
    assert (rank, size) == (1, 2)
    monkeypatch.setattr(condenser, "world", lambda: (rank, size))
    monkeypatch.setattr(condenser, "gather_with_grad", lambda t: torch.cat([other_reps.to(t.dtype), t]))
    monkeypatch.setattr(condenser, "gather", lambda t: torch.cat([other_docs, t]))


def info_nce(logits, rows):
    """-sum over rows (own row of logits, sibling column, allowed columns) of log softmax at the sibling."""
    return -sum((logits[i, sibling] - torch.logsumexp(logits[i, allowed], 0)).item() for i, sibling, allowed in rows)


def test_contrast_on_rank_1_of_2_uses_every_span_and_spares_other_processes_same_document():
    """Rank 1 of 2, two examples a process (4 spans). Global columns: rank 0's spans 0..3 (examples 0, 1, 0, 1,
    docs 8, 9, 8, 9), ours 4..7 (examples 2, 3, 2, 3; docs 7, 8, 7, 8). Our row i is column 4 + i, its sibling
    4 + (i + 2) % 4; our example 3 (doc 8) does not see rank 0's example 0 (doc 8, columns 0 and 2)."""
    torch.manual_seed(0)
    reps, other = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    docs, other_docs = torch.tensor([7, 8]), torch.tensor([8, 9])
    logits = reps @ torch.cat([other, reps]).T  # (4 local rows, 8 global columns)
    rows = [(0, 6, [0, 1, 2, 3, 5, 6, 7]),
            (1, 7, [1, 3, 4, 6, 7]),
            (2, 4, [0, 1, 2, 3, 4, 5, 7]),
            (3, 5, [1, 3, 4, 5, 6])]
    expected = info_nce(logits, rows)
    no_docs = info_nce(logits, [(i, 4 + (i + 2) % 4, [j for j in range(8) if j != 4 + i]) for i in range(4)])
    local = info_nce(reps @ reps.T, [(i, (i + 2) % 4, [j for j in range(4) if j != i]) for i in range(4)])
    assert len({round(expected, 6), round(no_docs, 6), round(local, 6)}) == 3
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake_world(monkeypatch, 1, 2, other, other_docs)
        assert span_contrast_sum(reps, docs, cross_process=True).item() == pytest.approx(expected, rel=1e-9)
        assert span_contrast_sum(reps, None, cross_process=True).item() == pytest.approx(no_docs, rel=1e-9)
        assert span_contrast_sum(reps, docs, cross_process=False).item() == pytest.approx(local, rel=1e-9)


def test_forward_contrasts_with_the_other_processes_spans_when_cross_process(tiny_model, docstrings):
    """coCondenser's forward on rank 1 of 2 (cross_process: true, the default): the contrast of the spans' last-layer
    [CLS] states (BERT run by hand on the span inputs) against rank 0's spans too, rank 0's example of the same
    document spared (rank 0: docs 5, 6; ours: 5, 7)."""
    objective, tokenizer = make(tiny_model, "cocondenser", skip_from=1, span_tokens=6)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=40))
    batch["doc"] = torch.tensor([5, 7])
    spans = batch["spans"]
    with torch.no_grad():
        reps = objective.encoder.bert(input_ids=spans["encoder_input_ids"],
                                      attention_mask=spans["attention_mask"]).last_hidden_state[:, 0].double()
        # at initialisation every [CLS] state is nearly the same vector: rank 0's spans near it too, else their
        # logits would be far below ours and leave no trace in the loss
        torch.manual_seed(1)
        other = reps.flip(0) + 0.3 * torch.randn(reps.shape, dtype=torch.float64)
        with pytest.MonkeyPatch.context() as monkeypatch:
            fake_world(monkeypatch, 1, 2, other, torch.tensor([5, 6]))
            losses = objective(batch)
    logits = reps @ torch.cat([other, reps]).T
    # our example 2 (doc 5, rows 0 and 2) does not see rank 0's example 0 (doc 5, columns 0 and 2)
    rows = [(0, 6, [1, 3, 5, 6, 7]), (1, 7, [0, 1, 2, 3, 4, 6, 7]),
            (2, 4, [1, 3, 4, 5, 7]), (3, 5, [0, 1, 2, 3, 4, 5, 6])]
    local = info_nce(reps @ reps.T, [(i, (i + 2) % 4, [j for j in range(4) if j != i]) for i in range(4)])
    assert abs(info_nce(logits, rows) - local) > 0.5
    assert losses["contrast"].item() == pytest.approx(info_nce(logits, rows), rel=1e-4)


# ----- where the windows start -----------------------------------------------------------------------------------


def test_windows_start_at_each_rows_first_ordinary_token(tiny_model):
    """Row 0 has a special token ([UNK]) right after [CLS], so its ordinary tokens start at position 2, row 1's at
    1. Both have 4 ordinary tokens: size 2, no room: windows tokens 0-1 and 2-3 of each row's ordinary tokens."""
    objective, tokenizer = make(tiny_model, "cocondenser", skip_from=1, span_tokens=50)
    cls, sep, unk, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id
    words = [i for t, i in sorted(tokenizer.get_vocab().items(), key=lambda x: x[1])
             if t.isalpha() and not t.startswith("##") and i not in tokenizer.all_special_ids][:8]
    ids = torch.tensor([[cls, unk] + words[:4] + [sep], [cls] + words[4:] + [sep, pad]])
    mask = torch.tensor([[1] * 7, [1] * 6 + [0]])
    batch = objective.prepare({"input_ids": ids, "attention_mask": mask, "seeds": seeds(2)})
    spans = batch["spans"]
    got = [spans["input_ids"][r][spans["attention_mask"][r].bool()].tolist() for r in range(4)]
    assert got == [[cls] + words[0:2] + [sep], [cls] + words[4:6] + [sep],
                   [cls] + words[2:4] + [sep], [cls] + words[6:8] + [sep]]


# ----- every tensor on the input's device ------------------------------------------------------------------------


def test_tensors_are_made_on_the_inputs_device(tiny_model, tiny_modernbert, docstrings):
    """Users train on GPUs: every tensor these functions make must be on their input's device. The meta device
    stands in for a GPU here: mixing a CPU tensor into a meta computation raises."""
    meta = torch.device("meta")
    first, second, size = two_disjoint_spans(torch.full((3,), 10, device=meta),
                                             torch.zeros(3, dtype=torch.int32, device=meta), 3)
    assert {first.device, second.device, size.device} == {meta}
    reps = torch.randn(4, 5, device=meta)
    assert span_contrast_sum(reps, torch.tensor([0, 1], device=meta), cross_process=True).device == meta
    assert span_contrast_sum(reps, None, cross_process=True).device == meta

    objective, tokenizer = make(tiny_model, "cocondenser", skip_from=1, span_tokens=6)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=24))
    on_meta = {**batch, "spans": {k: v.to(meta) for k, v in batch["spans"].items()}}
    counts = objective.num_items(on_meta)
    assert {v.device for v in counts.values()} == {meta} and set(counts) == {"mlm", "head", "contrast"}

    objective, tokenizer = make(tiny_modernbert, "condenser", skip_from=1, head_layers=1)
    objective.head.to(meta)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=16))
    with torch.no_grad():
        states = [s.to(meta) for s in objective.arch.layer_states(batch["encoder_input_ids"], batch["attention_mask"])]
        out = objective.head_states(states, batch["attention_mask"].to(meta))
    assert out.device == meta and out.shape == states[-1].shape


def test_document_span_draws_are_made_on_the_inputs_device(monkeypatch):
    """two_document_spans draws its spans on the device of the cut (the cut itself reads a sentence count off the
    tensor, which the meta device cannot give: it is made on the CPU here and handed over on meta)."""
    meta = torch.device("meta")
    sentence_ids = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4])
    cut = condenser.whole_sentence_cut(sentence_ids, torch.tensor([4]))
    assert cut["spans"].tolist() == [3]
    monkeypatch.setattr(condenser, "whole_sentence_cut", lambda ids, budget: {k: v.to(meta) for k, v in cut.items()})
    start, size = two_document_spans(sentence_ids.to(meta), torch.zeros(1, dtype=torch.int32, device=meta), 4)
    assert start.device == size.device == meta and start.shape == size.shape == (2,)
