"""The contrastive MLP bag-of-words decoder's rules pinned from the mutation run's survivors (methods.md §1.5): the
MLP decoder by hand, the symmetric InfoNCE on one process of several (global targets, the other process's views
and documents), the second view's mask and replacements, the item counts, which passes are checkpointed, and the
forward pass by hand (both views' [CLS] log-distributions, the batch's documents, the temperature). Expected values
by hand on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_more_objectives import batch_of, make

from retromae.masking import ENCODER_MASK, whole_word_mask
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import bow, build_objective_config, objective_class
from retromae.objectives.bow import MLPDecoder, symmetric_infonce_sum

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


def lse(*logits):
    return math.log(sum(math.exp(x) for x in logits))


# ----- the MLP decoder --------------------------------------------------------------------------------------------


def decoder_of(eps=None):
    """d = 2, V = 3: dense = identity, embeddings E rows (1, 0), (0, 1), (2, 3), output bias (0.5, 0.25, -1)."""
    embeddings = torch.nn.Embedding(3, 2)
    with torch.no_grad():
        embeddings.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]]))
    decoder = MLPDecoder(2, embeddings) if eps is None else MLPDecoder(2, embeddings, eps)
    with torch.no_grad():
        decoder.dense.weight.copy_(torch.eye(2))
        decoder.dense.bias.zero_()
        decoder.bias.copy_(torch.tensor([0.5, 0.25, -1.0]))
    return decoder


def test_mlp_decoder_by_hand():
    """h = (1, -1): GELU gives (Phi(1), -Phi(-1)), which differ by exactly 1 (gelu(x) - gelu(-x) = x): mean m, deviations
    +-0.5, variance 0.25. LayerNorm with eps 0.75: +-0.5 / sqrt(0.25 + 0.75) = (0.5, -0.5); times E^T: (0.5, -0.5,
    1 - 1.5 = -0.5); plus the bias: (1.0, -0.25, -1.5). The default eps is 1e-12 (BERT's): (1, -1) -> (1, -1, -1) + bias
    = (1.5, -0.75, -2)."""
    h = torch.tensor([[1.0, -1.0]])
    with torch.no_grad():
        assert decoder_of(0.75)(h)[0].tolist() == pytest.approx([1.0, -0.25, -1.5], abs=1e-6)
        assert decoder_of()(h)[0].tolist() == pytest.approx([1.5, -0.75, -2.0], abs=1e-5)
    assert decoder_of().norm.eps == 1e-12


def test_the_decoder_takes_the_encoders_norm_eps_and_the_weights_the_config(tiny_model):
    """The LayerNorm of the MLP decoder is the encoder's own (its eps), the contrast weighted by contrast_weight."""
    cfg = ModelConfig(name_or_path=str(tiny_model), dropout=0.0)
    encoder = load_masked_lm(cfg)
    encoder.config.layer_norm_eps = 3e-7
    objective = objective_class("bow")(encoder, load_tokenizer(cfg),
                                       build_objective_config({"name": "bow", "contrast_weight": 2.5}))
    assert objective.bow_decoder.norm.eps == 3e-7
    assert objective.loss_weights == {"contrast": 2.5}


# ----- the symmetric InfoNCE on rank 1 of 2 -----------------------------------------------------------------------

# Rank 0 holds texts 0, 1 (docs 5, 6), already normalised; we hold texts 2, 3, given unnormalised.
A0 = torch.tensor([[0.0, 0.0, 1.0], [0.8, 0.0, 0.6]])
B0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
A = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # normalised: a2 = (1, 0, 0), a3 = (0, 1, 0)
B = torch.tensor([[0.6, 0.8, 0.0], [0.0, 3.0, 4.0]])  # normalised: b2 = (0.6, 0.8, 0), b3 = (0, 0.6, 0.8)


def fake_world(monkeypatch, other_a, other_b, other_docs):
    """This process is rank 1 of 2; rank 0's (normalised) views and documents come first in every gather."""
    monkeypatch.setattr(bow, "world", lambda: (1, 2))
    first = F.normalize(A, dim=-1)

    def gather_with_grad(t):
        return torch.cat([other_a if torch.allclose(t, first) else other_b, t])
    monkeypatch.setattr(bow, "gather_with_grad", gather_with_grad)
    monkeypatch.setattr(bow, "gather", lambda t: torch.cat([other_docs, t]))


def test_infonce_across_processes_by_hand(monkeypatch):
    """tau = 0.5: logits 2 cos. Our texts are global 2, 3, their positives at columns 2, 3 of the 4 gathered.
    a2 vs b0..b3: cos 1, 0, 0.6, 0 | a3: 0, 0, 0.8, 0.6 | b2 vs a0..a3: 0, 0.48, 0.6, 0.8 | b3: 0.8, 0.48, 0, 0.6."""
    fake_world(monkeypatch, A0, B0, torch.tensor([5, 6]))
    expected = (lse(2, 0, 1.2, 0) - 1.2 + lse(0, 0, 1.6, 1.2) - 1.2
                + lse(0, 0.96, 1.2, 1.6) - 1.2 + lse(1.6, 0.96, 0, 1.2) - 1.2) / 2
    assert symmetric_infonce_sum(A, B, 0.5, True).item() == pytest.approx(expected, rel=1e-6)
    assert symmetric_infonce_sum(A, B, 0.5, True, {}).item() == pytest.approx(expected, rel=1e-6)
    # docs 5, 7: our text 2 (doc 5) leaves out rank 0's text 0 (doc 5), in both directions; text 3 keeps all
    excluded = (lse(0, 1.2, 0) - 1.2 + lse(0, 0, 1.6, 1.2) - 1.2
                + lse(0.96, 1.2, 1.6) - 1.2 + lse(1.6, 0.96, 0, 1.2) - 1.2) / 2
    got = symmetric_infonce_sum(A, B, 0.5, True, {"doc": torch.tensor([5, 7])})
    assert got.item() == pytest.approx(excluded, rel=1e-6)


def test_infonce_without_cross_process_stays_local_on_rank_1(monkeypatch):
    """cross_process off: texts 0, 1 against our own views only. a2 vs b2, b3: 1.2, 0 | a3: 1.6, 1.2 |
    b2 vs a2, a3: 1.2, 1.6 | b3: 0, 1.2."""
    fake_world(monkeypatch, A0, B0, torch.tensor([5, 6]))
    expected = (lse(1.2, 0) - 1.2 + lse(1.6, 1.2) - 1.2 + lse(1.2, 1.6) - 1.2 + lse(0, 1.2) - 1.2) / 2
    got = symmetric_infonce_sum(A, B, 0.5, False, {"doc": torch.tensor([5, 7])})
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_infonce_is_made_on_the_inputs_device():
    """Users train on GPUs: the meta device stands in for one (a CPU target among meta logits raises)."""
    meta = torch.device("meta")
    a, b = torch.randn(3, 5, device=meta), torch.randn(3, 5, device=meta)
    assert symmetric_infonce_sum(a, b, 0.05, True).device == meta
    assert symmetric_infonce_sum(a, b, 0.05, True, {"doc": torch.tensor([1, 1, 2], device=meta)}).device == meta


# ----- the second view ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_prob, random_prob", [(1.0, 0.0), (0.0, 1.0)])
def test_second_view_replacements_follow_the_config(tiny_model, docstrings, mask_prob, random_prob):
    """All masked tokens become [MASK] (1, 0) or a random ordinary token (0, 1); the others are left as they are.
    The second view's mask is a whole-word mask of its own stream (ENCODER_MASK + 40), not the first view's."""
    objective, tokenizer = make(tiny_model, "bow", mask_token_prob=mask_prob, random_token_prob=random_prob)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:4]], max_len=32))
    mask, ids, second = batch["second_mask"], batch["input_ids"], batch["second_input_ids"]
    assert torch.equal(mask, whole_word_mask(batch["words"], 0.3, batch["seeds"], ENCODER_MASK + 40))
    assert mask.any() and not torch.equal(mask, batch["encoder_mask"])
    assert torch.equal(second[~mask], ids[~mask])
    replaced = second[mask]
    if mask_prob == 1.0:
        assert (replaced == tokenizer.mask_token_id).all()
    else:
        assert not (replaced == tokenizer.mask_token_id).any()
        assert torch.isin(replaced, objective.tables.replacement_ids).all()
        # a draw among the ~700 ordinary tokens: the original again by chance 1 time in ~700 (of 39 masked here)
        assert (replaced == ids[mask]).sum() <= 1 and replaced.numel() >= 20


# ----- item counts ------------------------------------------------------------------------------------------------


def counts_batch(device="cpu"):
    """3 texts of 7 tokens, vocabulary 5: text 1's bag is empty; 2 tokens masked in view 1, 3 in view 2."""
    bag = torch.zeros(3, 5, dtype=torch.bool)
    bag[0, 1] = bag[0, 4] = bag[2, 2] = True
    first, second = torch.zeros(3, 7, dtype=torch.bool), torch.zeros(3, 7, dtype=torch.bool)
    first[0, 1] = first[2, 3] = True
    second[0, 2] = second[1, 1] = second[1, 5] = True
    return {"input_ids": torch.zeros(3, 7, dtype=torch.long, device=device), "bow_targets": bag.to(device),
            "encoder_mask": first.to(device), "second_mask": second.to(device)}


def test_num_items_by_hand(tiny_model):
    """Two views: mlm 2 + 3 masked tokens, bow the 2 texts with a bag (one count for both views' sums), contrast the
    3 texts. One view: mlm 2, bow 2, no contrast."""
    objective, _ = make(tiny_model, "bow")
    counts = {k: v.item() for k, v in objective.num_items(counts_batch()).items()}
    assert counts == {"mlm": 5, "bow": 2, "contrast": 3.0}
    single, _ = make(tiny_model, "bow", views=1, contrast_weight=0.0)
    batch = counts_batch()
    del batch["second_mask"]
    assert {k: v.item() for k, v in single.num_items(batch).items()} == {"mlm": 2, "bow": 2}
    meta = torch.device("meta")
    assert {v.device for v in objective.num_items(counts_batch(meta)).values()} == {meta}


# ----- checkpointing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, calls", [
    ({}, 2), ({"view_checkpointing": False}, 0), ({"views": 1, "contrast_weight": 0.0}, 0)])
def test_only_two_views_are_checkpointed(tiny_model, docstrings, monkeypatch, settings, calls):
    """Two views under view_checkpointing (the default): each view's pass checkpointed; one view is never (nothing
    to save: MLM's memory)."""
    import torch.utils.checkpoint as checkpointing_module

    objective, tokenizer = make(tiny_model, "bow", **settings)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=12))
    seen, original = [], checkpointing_module.checkpoint
    monkeypatch.setattr(checkpointing_module, "checkpoint",
                        lambda f, *a, **k: seen.append(a[0].shape) or original(f, *a, **k))
    objective(batch)
    assert len(seen) == calls


# ----- the forward pass by hand -----------------------------------------------------------------------------------


def log_distribution_by_hand(objective, h):
    """MLP decoder: LayerNorm(GELU(W h + c)) E^T + bias, written out; the MLM head for decoder: mlm_head."""
    if objective.config.decoder == "mlm_head":
        return objective.arch.head(h).double().log_softmax(-1)
    d = objective.bow_decoder
    x = F.gelu(h @ d.dense.weight.T + d.dense.bias)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    x = (x - mean) / torch.sqrt(var + d.norm.eps) * d.norm.weight + d.norm.bias
    return (x @ objective.arch.word_embeddings.weight.T + d.bias).double().log_softmax(-1)


def spread_out(objective, batch):
    """At initialisation the tiny encoder's [CLS] states barely differ between texts, so every text's word
    distribution is about the same (cosines of the log-distributions 1 - 1e-8: the InfoNCE is log B whatever tau,
    documents or views). The decoder's dense bias taking off the batch's mean state and a large LayerNorm gain set
    the distributions apart."""
    if objective.config.decoder != "mlp":
        return
    d = objective.bow_decoder
    with torch.no_grad():
        mean = objective.arch.forward(batch["encoder_input_ids"], batch["attention_mask"])[:, 0].mean(0)
        d.dense.bias.copy_(-(d.dense.weight @ mean))
        d.norm.weight.fill_(30.0)


def views_by_hand(objective, batch):
    """Per view: (its MLM sum over its masked tokens, its [CLS] log-distribution), the padded batch's mask used."""
    views = [("encoder_input_ids", "encoder_mask"), ("second_input_ids", "second_mask")][: objective.config.views]
    out = []
    with torch.no_grad():
        for ids, masked in views:
            hidden = objective.arch.forward(batch[ids], batch["attention_mask"])
            log_probs = objective.arch.head(hidden).double().log_softmax(-1)
            mlm = -sum(log_probs[b, j, batch["input_ids"][b, j]].item() for b, j in batch[masked].nonzero().tolist())
            out.append((mlm, log_distribution_by_hand(objective, hidden[:, 0])))
    return out


def infonce_by_hand(a, b, others_a, others_b, first, tau, visible):
    """sum over our texts i (global first + i) of (CE(a_i vs the visible b) + CE(b_i vs the visible a)) / 2."""
    every_a = F.normalize(torch.cat([others_a, a]), dim=-1)
    every_b = F.normalize(torch.cat([others_b, b]), dim=-1)
    total = 0.0
    for i in range(a.shape[0]):
        me = first + i
        for rows, cols in ((every_a, every_b), (every_b, every_a)):
            logits = [(rows[me] @ cols[j]).item() / tau for j in visible[i]]
            total += (lse(*logits) - (rows[me] @ cols[me]).item() / tau) / 2
    return total


@pytest.mark.parametrize("settings", [{"temperature": 0.02}, {"views": 1, "decoder": "mlm_head", "contrast_weight": 0}])
def test_forward_by_hand_on_one_process(tiny_model, docstrings, settings):
    """Texts of different lengths (padding): each view's [CLS] state through the decoder, its log-distribution in
    the bag-of-words loss (mean over the bag, summed over texts and views) and, with two views, in the InfoNCE at
    tau = 0.02, the texts of one document (docs 4, 4, 8) out of each other's negatives."""
    objective, tokenizer = make(tiny_model, "bow", **settings)
    texts = [docstrings[0]["text"][:40], docstrings[1]["text"], docstrings[2]["text"][:80]]
    batch = objective.prepare({**batch_of(tokenizer, texts, max_len=24), "doc": torch.tensor([4, 4, 8])})
    spread_out(objective, batch)
    assert not batch["attention_mask"].all(), "padding in the batch"
    views = views_by_hand(objective, batch)
    with torch.no_grad():
        losses = objective(batch)
    assert losses["mlm"].item() == pytest.approx(sum(m for m, _ in views), rel=1e-5)
    bags = [batch["bow_targets"][t].nonzero().flatten().tolist() for t in range(3)]
    bow_loss = -sum(lp[t, bags[t]].mean().item() for _, lp in views for t in range(3))
    assert losses["bow"].item() == pytest.approx(bow_loss, rel=1e-5)
    if objective.config.views == 1:
        assert set(losses) == {"mlm", "bow"}
        return
    (_, a), (_, b) = views
    none = torch.zeros(0, a.shape[1], dtype=a.dtype)
    expected = infonce_by_hand(a, b, none, none, 0, 0.02, [[0, 2], [1, 2], [0, 1, 2]])
    assert losses["contrast"].item() == pytest.approx(expected, rel=1e-5)
    # the temperature, the documents and both views each matter here
    assert abs(infonce_by_hand(a, b, none, none, 0, 1.0, [[0, 2], [1, 2], [0, 1, 2]]) - expected) > 1e-3 * expected
    assert abs(infonce_by_hand(a, b, none, none, 0, 0.02, [[0, 1, 2]] * 3) - expected) > 1e-3 * expected
    assert abs(infonce_by_hand(b, b, none, none, 0, 0.02, [[0, 2], [1, 2], [0, 1, 2]]) - expected) > 1e-3 * expected


@pytest.mark.parametrize("cross_process", [True, False])
def test_forward_on_rank_1_of_2(tiny_model, docstrings, monkeypatch, cross_process):
    """Rank 0 holds 2 texts (docs 4, 6) whose views are ours reversed; ours are globals 2, 3 (docs 4, 9): our text 2
    leaves out rank 0's text 0. Without cross_process: ours only, locals 0, 1."""
    objective, tokenizer = make(tiny_model, "bow", temperature=0.05, cross_process=cross_process)
    batch = objective.prepare({**batch_of(tokenizer, [d["text"] for d in docstrings[5:7]], max_len=16),
                               "doc": torch.tensor([4, 9])})
    spread_out(objective, batch)
    (_, a), (_, b) = views_by_hand(objective, batch)
    other_a, other_b = a.flip(0), b.flip(0)
    monkeypatch.setattr(bow, "world", lambda: (1, 2))
    first = F.normalize(a.float(), dim=-1)
    monkeypatch.setattr(bow, "gather_with_grad", lambda t: torch.cat(
        [F.normalize((other_a if torch.allclose(t, first, atol=1e-6) else other_b).float(), dim=-1), t]))
    monkeypatch.setattr(bow, "gather", lambda t: torch.cat([torch.tensor([4, 6]), t]))
    with torch.no_grad():
        got = objective(batch)["contrast"].item()
    none = torch.zeros(0, a.shape[1], dtype=a.dtype)
    if cross_process:
        expected = infonce_by_hand(a, b, other_a, other_b, 2, 0.05, [[1, 2, 3], [0, 1, 2, 3]])
    else:
        expected = infonce_by_hand(a, b, none, none, 0, 0.05, [[0, 1], [0, 1]])
    assert got == pytest.approx(expected, rel=1e-5)
