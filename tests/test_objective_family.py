"""DupMAE, contrastive span prediction (COSTA) and bag-of-words decoders: their math on hand-checkable cases,
their named losses going down on real corpora, their cross-process negatives, and DupMAE's retrieval."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BEIR, free_port, tiny_config
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import build_objective_config, objective_class
from retromae.objectives.bow import symmetric_infonce_sum
from retromae.objectives.costa import group_contrastive_loss_sum, sample_spans
from retromae.objectives.dupmae import bag_of_words, bag_of_words_loss_sum, max_pool_logits
from retromae.rng import example_seeds

PROBE = Path(__file__).resolve().parent / "helpers" / "objective_probe.py"


def make(model_dir, name, **settings):
    cfg = ModelConfig(name_or_path=str(model_dir), dropout=0.0)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    return objective_class(name)(load_masked_lm(cfg), tokenizer, build_objective_config({"name": name, **settings})), tokenizer


def batch_of(tokenizer, texts, max_len=64):
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "seeds": example_seeds(5, 0, torch.arange(len(texts)))}


# ----- DupMAE ---------------------------------------------------------------------------------------------


def test_bag_of_words_target_and_max_pool_by_hand():
    ids = torch.tensor([[0, 5, 7, 5, 1, 9], [0, 3, 1, 9, 9, 9]])  # 0 = [CLS], 1 = [SEP], 9 = [PAD]
    ordinary = torch.tensor([[False, True, True, True, False, False], [False, True, False, False, False, False]])
    bag = bag_of_words(ids, ordinary, 10)
    assert bag[0].nonzero().flatten().tolist() == [5, 7] and bag[1].nonzero().flatten().tolist() == [3]
    logits = torch.arange(2 * 6 * 10, dtype=torch.float).view(2, 6, 10) % 7
    positions = torch.tensor([[False, True, False, True, True, False], [False, True, True, False, False, False]])
    mu = max_pool_logits(logits, positions)
    assert torch.equal(mu[0], torch.maximum(torch.maximum(logits[0, 1], logits[0, 3]), logits[0, 4]))
    assert torch.equal(mu[1], torch.maximum(logits[1, 1], logits[1, 2]))
    log_probs = mu.log_softmax(-1)
    expected = -(log_probs[0, 5] + log_probs[0, 7]) / 2 - log_probs[1, 3]
    assert bag_of_words_loss_sum(log_probs, bag).item() == pytest.approx(expected.item(), rel=1e-6)


def test_chunked_logit_losses_equal_the_whole_computation(tiny_model, docstrings, monkeypatch):
    """The memory-bounded MLM cross-entropy (chunks under checkpointing) and max-pooled logits (blocks of positions)
    give the values and gradients of computing all logits at once."""
    from retromae.objectives import base

    objective, tokenizer = make(tiny_model, "dupmae")
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:6]]))
    head = objective.arch.head
    hidden = torch.randn(*batch["input_ids"].shape, objective.encoder.config.hidden_size, requires_grad=True)

    def both():
        hidden.grad = None
        ce = base.masked_lm_loss_sum(head, hidden, batch["input_ids"], batch["decoder_targets"])
        mu = base.max_pooled_logits(head, hidden, batch["bow_positions"])
        (ce + mu.logsumexp(-1).sum()).backward()
        return ce.detach(), mu.detach(), hidden.grad.clone()

    whole = both()
    monkeypatch.setattr(base, "LOGIT_BUDGET", 3 * len(tokenizer))  # chunks of 3 rows, blocks of 1 position
    chunked = both()
    # a max is exact, but the logits it takes come from matrix products of other shapes, which some CPUs (an AVX-512
    # EPYC here) round differently in the last bit: equal to fp32 rounding, not bit for bit
    assert torch.allclose(whole[0], chunked[0], rtol=1e-5) and torch.allclose(whole[1], chunked[1], rtol=0, atol=1e-6)
    assert torch.allclose(whole[2], chunked[2], atol=1e-6)
    reference = max_pool_logits(head(hidden.detach()), batch["bow_positions"])
    assert torch.allclose(whole[1], reference)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_projection_cross_entropy_equals_autograd(with_bias):
    """The fused vocabulary projection + cross-entropy (gradients made chunk by chunk in the forward pass, scaled by
    the upstream gradient in the backward pass) gives F.cross_entropy(F.linear(...))'s sum and gradients, exactly in
    fp64 and to bf16 rounding under autocast."""
    import torch.nn.functional as F

    from retromae.objectives.base import linear_cross_entropy_sum

    torch.manual_seed(0)
    x = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (37,))
    grads = []
    for fused in (False, True):
        for t in (x, weight, bias):
            if t is not None:
                t.grad = None
        if fused:
            from retromae.objectives import base

            loss = base.LinearCrossEntropySum.apply(x, weight, bias, targets, 5)  # 8 chunks of 5 rows
        else:
            loss = F.cross_entropy(F.linear(x, weight, bias), targets, reduction="sum")
        (3.0 * loss).backward()  # an upstream gradient other than 1
        grads.append((loss.detach(), x.grad.clone(), weight.grad.clone(), None if bias is None else bias.grad.clone()))
    for ours, theirs in zip(grads[1], grads[0]):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    results = []
    for fused in (False, True):
        x32, w32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        b32 = None if bias is None else bias.detach().float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (linear_cross_entropy_sum(x32, w32, b32, targets) if fused
                    else F.cross_entropy(F.linear(x32, w32, b32).float(), targets, reduction="sum"))
        loss.backward()
        results.append((loss.detach(), x32.grad, w32.grad))
    (theirs, *their_grads), (ours, *our_grads) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=0)  # both: bf16 products, fp32 softmax
    for mine, reference in zip(our_grads, their_grads):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, reference, rtol=2e-2, atol=2e-2)


def test_max_pooled_projection_gradients_equal_autograd():
    """DupMAE's mu by blocks of positions, keeping only each (text, word)'s winning position, has autograd's
    gradients for x, W and b (fp64, exact); a text with no position gives -inf and no gradient."""
    import torch.nn.functional as F

    from retromae.objectives.base import MaxPooledProjection

    torch.manual_seed(1)
    x = torch.randn(3, 11, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(20, dtype=torch.float64, requires_grad=True)
    positions = torch.rand(3, 11) > 0.4
    positions[2] = False
    upstream = torch.randn(3, 20, dtype=torch.float64)
    grads = []
    for fused in (False, True):
        for t in (x, weight, bias):
            t.grad = None
        if fused:
            mu = MaxPooledProjection.apply(x, weight, bias, positions, 4)  # blocks of 4 positions
        else:
            mu = F.linear(x, weight, bias).masked_fill(~positions[..., None], float("-inf")).max(dim=1).values
        assert torch.isinf(mu[2]).all() and torch.isfinite(mu[:2]).all()
        (mu[:2] * upstream[:2]).sum().backward()
        grads.append((mu.detach(), x.grad.clone(), weight.grad.clone(), bias.grad.clone()))
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_dupmae_positions_and_losses(tiny_model, docstrings):
    texts = [d["text"] for d in docstrings[:6]]
    paper, tokenizer = make(tiny_model, "dupmae")
    code, _ = make(tiny_model, "dupmae", bow_positions="all", bow_weight=0.1)
    b1, b2 = paper.prepare(batch_of(tokenizer, texts)), code.prepare(batch_of(tokenizer, texts))
    real = b1["attention_mask"].bool()
    assert not b1["bow_positions"][:, 0].any() and not (b1["bow_positions"] & ~real).any()
    assert not (b1["bow_positions"] & b1["encoder_mask"]).any(), "paper: unmasked positions only"
    expected_all = real.clone()
    expected_all[:, 0] = False
    assert torch.equal(b2["bow_positions"], expected_all), "authors' code: every non-[CLS], non-pad position"
    assert code.loss_weights["bow"] == 0.1 and paper.loss_weights["bow"] == 1.0
    losses = paper(b1)
    retro, _ = make(tiny_model, "retromae")
    same = retro(retro.prepare(batch_of(tokenizer, texts)))
    assert losses["mlm"].item() == pytest.approx(same["mlm"].item(), rel=1e-5), "MLM from the shared logits"
    assert losses["decoder"].item() == pytest.approx(same["decoder"].item(), rel=1e-5)
    vocab = paper.encoder.config.vocab_size
    assert abs((losses["bow"] / paper.num_items(b1)["bow"]).item() - math.log(vocab)) < 1.0


def test_dupmae_joint_score_equals_dense_computation(tiny_model, docstrings):
    from retromae.objectives.dupmae import DupMAERepresentation, DupMAERepresentationConfig
    from retromae.retrieval.encoder import EncodeConfig
    from retromae.retrieval.hybrid import HybridEncoder, exact_search, pooled_search

    cfg = ModelConfig(name_or_path=str(tiny_model))
    rep = DupMAERepresentation(load_masked_lm(cfg), DupMAERepresentationConfig(dense_dim=16, topk=24)).eval()
    encoder = HybridEncoder(None, EncodeConfig(query_max_len=32, passage_max_len=64, batch_size=7),
                            representation=rep, tokenizer=load_tokenizer(cfg))
    docs_text = [d["text"] for d in docstrings[:60]]
    queries_text = [d["title"].replace(".", " ") for d in docstrings[:15]]
    docs, queries = encoder.encode(docs_text, "passage"), encoder.encode(queries_text, "query")
    # dense computation of [W h ; top-k mu] one text at a time
    def joint(texts, max_len):
        out = []
        with torch.no_grad():
            for t in texts:
                f = encoder.tokenizer([t], truncation=True, max_length=max_len, return_tensors="pt")
                d, v, i = rep(f["input_ids"], f["attention_mask"])
                assert (v >= 0).all() and v.shape[-1] == 24
                out.append(torch.cat([d, rep.densify(v, i)], -1)[0])
        return torch.stack(out).double().numpy()
    expected = joint(queries_text, 32) @ joint(docs_text, 64).T
    scores, positions = exact_search(queries, docs, k=60)
    got = np.zeros_like(expected)
    np.put_along_axis(got, positions, scores, axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    pooled_scores, pooled_positions = pooled_search(queries, docs, k=10, pool=60, use_gpu=False)
    assert (pooled_positions == positions[:, :10]).all(), "a pool holding every document gives the exact ranking"


def _synthetic_hybrid(rng, n, vocab, topk, dense_scale, sparse_scale):
    from scipy.sparse import csr_matrix

    from retromae.retrieval.hybrid import HybridVectors

    ids = np.stack([rng.choice(vocab, topk, replace=False) for _ in range(n)])
    values = rng.random((n, topk)).astype(np.float32) * sparse_scale
    sparse = csr_matrix((values.ravel(), ids.ravel(), np.arange(0, n * topk + 1, topk)), shape=(n, vocab))
    return HybridVectors(rng.standard_normal((n, 8)).astype(np.float32) * dense_scale, sparse)


def _same_top_k(queries, docs, pooled, k=10):
    """The pooled top-k has the exact scores rank by rank, and the exact documents in every query without ties."""
    from retromae.retrieval.hybrid import exact_search

    exact_scores, exact_positions = exact_search(queries, docs, k=k + 1)  # one more: a tie across the cut
    pooled_scores, pooled_positions = pooled
    np.testing.assert_allclose(pooled_scores, exact_scores[:, :k], rtol=1e-5, atol=1e-5)
    untied = (-np.diff(exact_scores, axis=1) > 1e-4).all(1)
    assert untied.mean() > 0.5
    for q in np.flatnonzero(untied):
        assert list(pooled_positions[q]) == list(exact_positions[q, :k])


def test_pooled_search_is_exact_when_the_sparse_part_decides():
    from retromae.retrieval.hybrid import exact_search, pooled_search
    from retromae.retrieval.index import DenseIndex

    rng = np.random.default_rng(0)
    # the sparse part dominates: a pool of dense candidates alone misses most of the true top-10
    docs = _synthetic_hybrid(rng, 400, vocab=300, topk=6, dense_scale=0.1, sparse_scale=3.0)
    queries = _synthetic_hybrid(rng, 25, vocab=300, topk=6, dense_scale=0.1, sparse_scale=3.0)
    exact = exact_search(queries, docs, k=10)

    index = DenseIndex(8, "Flat", use_gpu=False)
    index.add(docs.dense, [str(i) for i in range(400)])
    _, dense_pool = index.search(queries.dense, 30)
    missed = sum(len(set(row) - {int(h) for h in pool}) for row, pool in zip(exact[1], dense_pool))
    assert missed > 50, "the case must defeat a dense-only pool"
    stats = {}
    _same_top_k(queries, docs, pooled_search(queries, docs, k=10, pool=30, use_gpu=False, stats=stats))
    assert stats["added_by_bound"] >= missed and stats["queries_scored_in_full"] == 0
    # no sparse overlap at all and a pool no deeper than k: the bound cannot exclude anything, so full scoring
    empty = type(queries)(queries.dense, queries.sparse.multiply(0).tocsr())
    stats = {}
    _same_top_k(empty, docs, pooled_search(empty, docs, k=10, pool=10, use_gpu=False, stats=stats))
    assert stats["queries_scored_in_full"] == 25


@pytest.mark.skipif(not (BEIR / "nfcorpus").is_dir(), reason="../shared/data/beir is not present")
def test_pooled_search_equals_exact_on_nfcorpus(tiny_model):
    """Real texts, an untrained (so arbitrary) sparse head: the worst case for a dense candidate pool."""
    from retromae.objectives.dupmae import DupMAERepresentation, DupMAERepresentationConfig
    from retromae.retrieval.data import load_beir_folder
    from retromae.retrieval.encoder import EncodeConfig
    from retromae.retrieval.hybrid import HybridEncoder, pooled_search

    data = load_beir_folder(BEIR / "nfcorpus", "test")
    ids, texts = data.passages(" ")
    cfg = ModelConfig(name_or_path=str(tiny_model))
    rep = DupMAERepresentation(load_masked_lm(cfg), DupMAERepresentationConfig(dense_dim=32, topk=64)).eval()
    encoder = HybridEncoder(None, EncodeConfig(query_max_len=32, passage_max_len=96, batch_size=64),
                            representation=rep, tokenizer=load_tokenizer(cfg))
    docs = encoder.encode(texts, "passage")
    queries = encoder.encode(list(data.queries.values()), "query")
    stats = {}
    _same_top_k(queries, docs, pooled_search(queries, docs, k=10, pool=100, use_gpu=False, stats=stats))
    assert stats["added_by_bound"] > 0


# ----- COSTA ----------------------------------------------------------------------------------------------


def test_spans_stay_inside_their_text(tiny_model, docstrings):
    costa, tokenizer = make(tiny_model, "costa", span_lengths=[[1, 3], [4, 16], [16, 64], [64, 128]])
    texts = [d["text"] for d in docstrings[:10]] + ["Tiny text."]
    batch = costa.prepare(batch_of(tokenizer, texts, max_len=96))
    ids, words = batch["input_ids"], batch["words"]
    spans_per_text, groups = 4 * 5, batch["span_groups"]
    widths = [g["input_ids"].shape[1] for g in groups]
    assert widths == sorted(widths) and widths[0] <= 10 < 64 < widths[-1], "each granularity padded to its own width"
    span_ids, token_mask, attention = ([g[key].view(len(texts), 5, -1) for g in groups]
                                       for key in ("input_ids", "token_mask", "attention_mask"))
    for b in range(len(texts)):
        text_tokens = ids[b][words[b] >= 0].tolist()
        n = len(text_tokens)
        for s in range(spans_per_text):
            g, k = divmod(s, 5)
            tokens = span_ids[g][b, k][token_mask[g][b, k]].tolist()
            assert 1 <= len(tokens) <= n, "a span is never empty and never longer than its text"
            lo, hi = [[1, 3], [4, 16], [16, 64], [64, 128]][s // 5]
            assert len(tokens) == n if n < lo else lo <= len(tokens) <= min(hi, n)
            starts = [i for i in range(n - len(tokens) + 1) if text_tokens[i : i + len(tokens)] == tokens]
            assert starts, "a span is a contiguous piece of its own text: no padding, no special token"
            row = span_ids[g][b, k][attention[g][b, k].bool()].tolist()
            assert row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id and row[1:-1] == tokens


@pytest.mark.parametrize("name, switch, extra", [("costa", "span_checkpointing", {"span_chunk": 0.1}),
                                                 ("bow", "view_checkpointing", {})])
def test_memory_checkpointing_changes_no_value_or_gradient(tiny_model, docstrings, name, switch, extra):
    """COSTA's spans and the BoW decoder's two views, encoded under activation checkpointing to save memory, give
    the losses and gradients of encoding them plainly."""
    texts = [d["text"] for d in docstrings[:6]]
    results = []
    for checkpointing in (False, True):
        objective, tokenizer = make(tiny_model, name, **{switch: checkpointing, **extra})
        losses = objective(objective.prepare(batch_of(tokenizer, texts, max_len=96)))
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}))
    for key, value in results[0][0].items():
        assert torch.allclose(value, results[1][0][key], rtol=1e-5), key
    assert results[0][1].keys() == results[1][1].keys()
    for key, grad in results[0][1].items():
        # float32 sums over many spans in another order (the recomputation runs chunk by chunk, and oneDNN picks
        # its blocking by load): ~1e-4 relative on gradients of order 1 was seen once on a busy machine; a wrong
        # gradient is off by far more
        assert torch.allclose(grad, results[1][1][key], atol=1e-5, rtol=1e-3), key


def test_span_sampling_is_seeded_per_text():
    lengths = torch.tensor([50, 200, 3])
    seeds = example_seeds(1, 0, torch.tensor([7, 8, 9]))
    a = sample_spans(lengths, seeds, [[1, 3], [64, 128]], 5)
    b = sample_spans(lengths[1:2], seeds[1:2], [[1, 3], [64, 128]], 5)
    assert torch.equal(a[0][1], b[0][0]) and torch.equal(a[1][1], b[1][0])
    assert ((a[0] + a[1]) <= lengths[:, None]).all() and (a[0] >= 0).all()


def test_group_contrastive_loss_by_hand():
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    spans = torch.tensor([[1.0, 0.2], [0.6, 0.8], [0.1, 1.0], [-1.0, 0.3]])
    owner = torch.tensor([0, 0, 1, 1])  # text 0 owns spans 0, 1; text 1 owns spans 2, 3
    tau = 0.5
    sim = torch.nn.functional.normalize(texts, dim=-1) @ torch.nn.functional.normalize(spans, dim=-1).T / tau
    def expected(own_in_denominator):
        total = 0.0
        for i, own in ((0, [0, 1]), (1, [2, 3])):
            for p in own:
                others = [a for a in range(4) if a not in own]
                pool = list(range(4)) if own_in_denominator else [p] + others
                total -= (sim[i, p] - torch.logsumexp(sim[i, pool], 0)).item() / len(own)
        return total
    for flag in (True, False):
        got = group_contrastive_loss_sum(texts, spans, owner, 0, tau, flag).item()
        assert got == pytest.approx(expected(flag), rel=1e-6)
    # the positives are exactly the text's own spans: moving a span to the other text changes the loss
    assert group_contrastive_loss_sum(texts, spans, torch.tensor([0, 1, 1, 1]), 0, tau, True).item() != pytest.approx(
        expected(True), rel=1e-3)


# ----- bag-of-words decoders ------------------------------------------------------------------------------


def test_symmetric_infonce_by_hand():
    a = torch.tensor([[1.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.0, 0.3, 1.0]])
    b = torch.tensor([[0.9, 0.1, 0.4], [0.0, 1.0, 0.3], [0.5, 0.5, 0.5]])
    tau = 0.1
    na, nb = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    s = na @ nb.T / tau
    expected = 0.0
    for i in range(3):
        expected += (-(s[i, i] - torch.logsumexp(s[i], 0)) - (s[i, i] - torch.logsumexp(s[:, i], 0))).item() / 2
    assert symmetric_infonce_sum(a, b, tau, cross_process=False).item() == pytest.approx(expected, rel=1e-6)


def test_bow_views_decoder_and_targets(tiny_model, docstrings):
    bow, tokenizer = make(tiny_model, "bow")
    batch = bow.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:8]]))
    assert not torch.equal(batch["encoder_mask"], batch["second_mask"]), "two independent views"
    assert bow.bow_decoder.word_embeddings.weight is bow.encoder.bert.embeddings.word_embeddings.weight
    for b in range(8):
        ordinary = batch["input_ids"][b][batch["words"][b] >= 0]
        assert set(batch["bow_targets"][b].nonzero().flatten().tolist()) == set(ordinary.tolist())
    losses, counts = bow(batch), bow.num_items(batch)
    # L = MLM + BoW(view 1) + BoW(view 2) + contrast: the bow sum over texts counts each text once, so an untrained
    # decoder (near uniform over V words) gives about 2 log V, not log V (a weight of 1/2 would)
    assert set(losses) == {"mlm", "bow", "contrast"} and counts["bow"].item() == 8
    assert (losses["bow"] / counts["bow"]).item() == pytest.approx(2 * math.log(len(tokenizer)), abs=1.0)
    assert losses["contrast"].item() / 8 == pytest.approx(math.log(8), abs=0.05), "untrained views: near uniform"
    prediction, _ = make(tiny_model, "bow", views=1, decoder="mlm_head", contrast_weight=0.0)
    single = prediction.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:8]]))
    assert set(prediction(single)) == {"mlm", "bow"} and not hasattr(prediction, "bow_decoder")
    from retromae.config import ConfigError

    with pytest.raises(ConfigError, match="contrast_weight > 0 needs objective.views: 2"):
        build_objective_config({"name": "bow", "views": 1})


# ----- training: every named loss goes down; cross-process negatives are used -------------------------------


@pytest.mark.skipif(not (BEIR / "cranfield").is_dir(), reason="../shared/data/beir is not present")
@pytest.mark.parametrize("objective", [
    {"name": "dupmae"},
    {"name": "costa", "span_lengths": [[1, 3], [4, 16], [16, 32]], "spans_per_granularity": 3},
    {"name": "bow"},
    {"name": "bow", "views": 1, "decoder": "mlm_head", "contrast_weight": 0.0},
])
def test_every_named_loss_decreases_on_a_real_corpus(tiny_model, tmp_path, objective):
    from retromae.pretrain import run

    cfg = tiny_config(tiny_model, BEIR / "cranfield" / "corpus.jsonl", tmp_path, objective=objective,
                      train={"max_steps": 40, "lr": 2e-3, "warmup_ratio": 0.0, "logging_steps": 10},
                      data={"max_len": 64})
    history = run(cfg)["history"]
    names = [k for k in history[0] if k.startswith("loss/")]
    assert len(names) >= 2
    for name in names:
        assert history[-1][name] < history[0][name], f"{name}: {history[0][name]:.4f} -> {history[-1][name]:.4f}"
    assert (tmp_path / "model" / "pretraining" / "heads.safetensors").is_file()


def launch(args, processes, cwd):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(PROBE), *args] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(PROBE),
        *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((Path(args[2]) / "record.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("objective, loss", [
    ({"name": "costa", "span_lengths": [[1, 3], [4, 8]], "spans_per_granularity": 2}, "span"),
    ({"name": "bow"}, "contrast"),
    ({"name": "cocondenser", "skip_from": 1, "span_tokens": 8}, "contrast"),
])
def test_cross_process_negatives_are_used(tiny_model, corpus_file, tmp_path, objective, loss):
    """2 processes equal 1 process holding the global batch (float64: exact); dropping the other process's
    spans / views changes the loss."""
    spec = json.dumps(objective)
    one = launch([str(tiny_model), str(corpus_file), str(tmp_path / "one"), "8", spec, "float64"], 1, tmp_path)
    two = launch([str(tiny_model), str(corpus_file), str(tmp_path / "two"), "4", spec, "float64"], 2, tmp_path)
    local = launch([str(tiny_model), str(corpus_file), str(tmp_path / "local"), "4",
                    json.dumps({**objective, "cross_process": False}), "float64"], 2, tmp_path)
    assert two["num_processes"] == 2
    for name in one["means"]:
        assert two["means"][name] == pytest.approx(one["means"][name], rel=1e-10)
    assert abs(local["means"][loss] - two["means"][loss]) > 1e-3, "the other process's negatives are in the loss"
    import safetensors.torch

    g1 = safetensors.torch.load_file(str(tmp_path / "one" / "grads.safetensors"))
    g2 = safetensors.torch.load_file(str(tmp_path / "two" / "grads.safetensors"))
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-10, rtol=1e-7), k


def test_contrastive_objectives_refuse_gradient_accumulation(tiny_model, corpus_file, tmp_path):
    """Their negatives are the global batch: accumulation would shrink them to one micro-batch, so it is refused
    before anything loads; per-item objectives (and BoW prediction, which has no contrast) accumulate exactly."""
    from conftest import tiny_config
    from retromae.config import ConfigError
    from retromae.objectives.base import check_accumulation
    from retromae.pretrain import run

    for name, loss in (("costa", "span"), ("bow", "contrast")):
        cfg = tiny_config(tiny_model, corpus_file, tmp_path / name, objective={"name": name},
                          train={"gradient_accumulation_steps": 2})
        with pytest.raises(ConfigError, match=rf"'{loss}'.*gradient_accumulation_steps=2.*one micro-batch"):
            run(cfg)
        assert not (tmp_path / name).exists(), "refused before anything is written"
    for objective in ({"name": "retromae"}, {"name": "bow", "views": 1, "contrast_weight": 0.0}):
        check_accumulation(build_objective_config(objective), 4)


def test_blocks_of_one_document_are_not_negatives_of_each_other():
    """Two packed blocks of one article (same `doc`) must not push each other away: each text's loss equals the
    loss computed without the other block among its negatives."""
    import torch.nn.functional as F

    from retromae.objectives.base import same_document_elsewhere
    from retromae.objectives.bow import symmetric_infonce_sum
    from retromae.objectives.costa import group_contrastive_loss_sum

    torch.manual_seed(3)
    texts, spans = torch.randn(3, 8), torch.randn(6, 8)
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    batch = {"doc": torch.tensor([7, 7, 9])}  # texts 0 and 1: one document
    excluded = same_document_elsewhere(batch, 0, batch["doc"])
    assert excluded.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    masked = group_contrastive_loss_sum(texts, spans, owner, 0, 0.1, True, excluded)
    visible = {0: [0, 1, 4, 5], 1: [2, 3, 4, 5], 2: [0, 1, 2, 3, 4, 5]}  # own spans and other documents' only
    by_hand = sum(group_contrastive_loss_sum(texts[i : i + 1], spans[cols], owner[cols], i, 0.1, True)
                  for i, cols in visible.items())
    assert masked.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert masked.item() < group_contrastive_loss_sum(texts, spans, owner, 0, 0.1, True).item()
    a, b = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    rows = {0: [0, 2], 1: [1, 2], 2: [0, 1, 2]}  # the candidates of each text: itself and other documents
    hand = sum((F.cross_entropy((a[i] @ b[cols].T / 0.05)[None], torch.tensor([cols.index(i)]))
                + F.cross_entropy((b[i] @ a[cols].T / 0.05)[None], torch.tensor([cols.index(i)]))) / 2
               for i, cols in rows.items())
    assert symmetric_infonce_sum(a, b, 0.05, False, batch).item() == pytest.approx(hand.item(), rel=1e-5)
