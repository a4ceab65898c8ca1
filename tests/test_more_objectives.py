"""SEED-Encoder, CoT-MAE, the PMI (challenging) decoder, TSDAE, MAE-LM, Condenser / coCondenser and Starbucks SMAE:
each objective's defining rule on a small hand-checkable case, and every named loss going down on a real corpus."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BEIR, tiny_config
from retromae.config import ConfigError
from retromae.data.batches import collate
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import build_objective_config, objective_class
from retromae.rng import example_seeds


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


def make(model_dir, name, **settings):
    cfg = ModelConfig(name_or_path=str(model_dir), dropout=0.0)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    settings = build_objective_config({"name": name, **settings})
    objective = objective_class(name)(load_masked_lm(cfg), tokenizer, settings)
    return objective.eval(), tokenizer


def batch_of(tokenizer, texts, max_len=64, first_index=0):
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "seeds": example_seeds(5, 0, torch.arange(first_index, first_index + len(texts)))}


def ordinary_ids(tokenizer, count):
    """`count` vocabulary ids that are whole words on their own (no special token, no ## piece)."""
    vocab = tokenizer.get_vocab()
    return [i for t, i in sorted(vocab.items(), key=lambda x: x[1])
            if not t.startswith("##") and i not in tokenizer.all_special_ids and t.isalpha()][:count]


# ----- SEED-Encoder ---------------------------------------------------------------------------------------


def test_seed_rows_see_exactly_their_window_and_column_zero():
    from retromae.objectives.seed import window_visibility

    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    for k in (1, 2, 3):
        visible = window_visibility(attention, k)[0]
        for i in range(8):
            expected = {j for j in range(6) if j == 0 or i - k + 1 <= j <= i}
            assert set(visible[i].nonzero().flatten().tolist()) == expected, (k, i)


@pytest.mark.parametrize("layers", [1, 3])
def test_seed_decoder_output_ignores_tokens_outside_its_window(tiny_model, docstrings, layers):
    """With k = 2, one layer's row i reads tokens {0, i-1, i} of the shifted text and nothing else; stacked layers
    reach i - layers*(k-1) .. i. The cross-attention reads h only, and the decoder has no embeddings of its own."""
    objective, tokenizer = make(tiny_model, "seed", decoder_layers=layers)
    objective.double()  # float64: a change three attention hops away is tiny at initialisation, but not zero
    batch = objective.prepare(batch_of(tokenizer, [docstrings[3]["text"]], max_len=24))
    assert not any(isinstance(m, torch.nn.Embedding) for m in objective.decoder.modules())
    h = torch.randn(1, objective.encoder.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        base = objective.decode(h, batch)[0]
        length = base.shape[0]
        for j in range(1, length):
            changed = dict(batch, input_ids=batch["input_ids"].clone())
            changed["input_ids"][0, j] = (changed["input_ids"][0, j] + 11) % len(tokenizer)
            moved = (objective.decode(h, changed)[0] - base).abs().amax(-1) > 1e-13
            reach = {i for i in range(length) if i - layers <= j <= i}
            assert set(moved.nonzero().flatten().tolist()) == reach, (j, layers)
        moved = (objective.decode(h + 1.0, batch)[0] - base).abs().amax(-1) > 1e-13
        assert moved.all(), "every row reads h through its cross-attention"
    assert objective.loss_weights == {"mlm": 0.5, "decoder": 0.5}
    assert torch.equal(batch["decoder_targets"], batch["attention_mask"][:, 1:].bool())


# ----- CoT-MAE --------------------------------------------------------------------------------------------


def document_batch(sentences_per_doc: list[list[int]], first_token: int = 10):
    """Documents whose sentences have the given lengths; token t of the corpus is id first_token + t % 500, so a
    span's ids tell where it came from."""
    docs, sizes, t = [], [], 0
    for lengths in sentences_per_doc:
        ids = [first_token + (t + k) % 500 for k in range(sum(lengths))]
        t += sum(lengths)
        docs.append(ids)
        sizes.append(lengths)
    return collate(docs, list(range(len(docs))), 0, 3, 0, 8, None, sizes)


def test_cotmae_partner_comes_from_the_same_document_and_matches_its_type(tiny_model):
    """The anchor is a span of the greedy sentence cut (<= T tokens, whole sentences); the partner is another span
    of that cut (random), the adjacent one (neighbour) or a window sharing >= 1 and <= half of its sentences with
    the anchor (overlap); the span inputs are [CLS] + those sentences' tokens + [SEP]; types come out ~1/3 each."""
    from retromae.objectives.cotmae import NEIGHBOUR, OVERLAPPING, RANDOM, UNPAIRED

    objective, tokenizer = make(tiny_model, "cotmae", max_span_tokens=8, short_span_prob=0.0)
    layout = [[3, 4, 2, 5, 1, 6, 2], [10], [2, 2, 2, 2], [20, 1, 1], [1, 2, 3, 1, 2, 3, 1, 2]]
    cut = {0: [(0, 2), (2, 5), (5, 7)], 1: [(0, 1)], 2: [(0, 4)], 3: [(0, 1), (1, 3)],
           4: [(0, 4), (4, 8)]}  # the greedy cut at 8 tokens, by hand
    seen = {RANDOM: 0, NEIGHBOUR: 0, OVERLAPPING: 0}
    base = document_batch(layout)
    for trial in range(40):
        batch = objective.prepare({**base, "seeds": example_seeds(trial, 0, torch.arange(len(layout)))})
        spans, n = batch["spans"], len(layout)
        for b, lengths in enumerate(layout):
            starts = [sum(lengths[:s]) for s in range(len(lengths) + 1)]
            anchor, partner = tuple(batch["anchor"][b].tolist()), tuple(batch["partner"][b].tolist())
            kind = batch["partner_type"][b].item()
            assert anchor in cut[b]
            for row, (s0, s1) in ((b, anchor), (b + n, partner)):
                doc = base["input_ids"][b, starts[s0] : starts[s0] + min(8, starts[s1] - starts[s0])].tolist()
                ids = spans["input_ids"][row][spans["attention_mask"][row].bool()].tolist()
                assert ids == [tokenizer.cls_token_id, *doc, tokenizer.sep_token_id], "whole sentences of this doc"
            if len(cut[b]) < 2:
                assert kind == UNPAIRED and not spans["decoder_targets"][[b, b + n]].any()
                continue
            if b == 3:
                assert kind != OVERLAPPING, "no window overlaps a lone long sentence: the neighbour instead"
            else:
                seen[kind] += 1
            if kind == RANDOM:
                assert partner in cut[b] and partner != anchor
            elif kind == NEIGHBOUR:
                assert abs(cut[b].index(partner) - cut[b].index(anchor)) == 1
            else:
                shared = len(set(range(*anchor)) & set(range(*partner)))
                assert 1 <= shared <= (partner[1] - partner[0]) / 2 and sum(lengths[partner[0] : partner[1]]) <= 8
    total = sum(seen.values())
    assert all(0.2 < v / total < 0.47 for v in seen.values()), seen


def test_cotmae_decodes_each_span_from_the_other_spans_h(tiny_model):
    objective, _ = make(tiny_model, "cotmae", max_span_tokens=8, short_span_prob=0.0)
    documents = document_batch([[3, 4, 2, 5], [4, 4, 4]])
    batch = objective.prepare({**documents, "seeds": example_seeds(1, 0, torch.arange(2))})
    spans = batch["spans"]
    h = torch.randn(4, objective.encoder.config.hidden_size)
    with torch.no_grad():
        base = objective.decode(h, spans)
        for source in range(4):
            changed = h.clone()
            changed[source] += 1.0
            moved = (objective.decode(changed, spans) - base).abs().flatten(1).amax(-1) > 1e-6
            assert moved.nonzero().flatten().tolist() == [(source + 2) % 4], "row b reads the h of row b +- B only"
    masked = spans["decoder_input_ids"] != spans["input_ids"]
    assert not (masked & ~spans["decoder_targets"]).any()
    with pytest.raises(ConfigError, match="data.cut=document"):
        objective.prepare({k: v for k, v in batch.items() if k != "sentence_ids"})


# ----- PMI decoder masking (the challenging decoder) -------------------------------------------------------


def test_pmi_word_scores_by_hand():
    """A word's score is the largest PMI of its pieces, floored; tf / |d| over the text's ordinary tokens."""
    from retromae.objectives.retromae import pmi_word_scores

    ids = torch.tensor([[0, 5, 6, 7, 5, 7, 1]])  # [CLS] a b+c a c [SEP]: words a, (b c), a, c
    words = torch.tensor([[-1, 0, 1, 1, 2, 3, -1]])
    log_share = torch.log(torch.tensor([0.5, 0.5, 0.1, 0.1, 0.1, 0.01, 0.001, 0.5]))
    scores = pmi_word_scores(ids, words, log_share, floor=0.1)
    a = math.log(2 / 5) - math.log(0.01)
    b, c = math.log(1 / 5) - math.log(0.001), math.log(2 / 5) - math.log(0.5)
    assert c < 0.1 < b and scores[0, :3].tolist() == pytest.approx([a, b, a], rel=1e-5)
    assert scores[0, 3:].tolist() == pytest.approx([0.1] * 4), "a common word, and slots past the last word: the floor"


@pytest.mark.parametrize("decoding", ["enhanced", "basic"])
def test_pmi_masks_hide_high_pmi_words_more_often_at_the_same_ratio(tiny_model, tiny_tokenizer, decoding):
    """Rare words (high PMI) are hidden from the decoder far more often than common ones, while the share of hidden
    tokens stays the uniform mask's (0.5), over many seeds."""
    words = ordinary_ids(tiny_tokenizer, 40)
    rare, common = words[:8], words[8:]
    ids = torch.tensor([[tiny_tokenizer.cls_token_id, *rare, *common, tiny_tokenizer.sep_token_id]] * 64)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "seeds": example_seeds(9, 0, torch.arange(64))}
    counts = torch.full((len(tiny_tokenizer),), 100_000)
    counts[rare] = 1
    share = {}
    for masking in ("uniform", "pmi"):
        objective, _ = make(tiny_model, "retromae", decoder_masking=masking, decoding=decoding)
        if masking == "pmi":
            objective.attach_corpus_statistics(counts, 10_000_000)
        else:
            assert not hasattr(objective, "attach_corpus_statistics"), "uniform asks for no statistics"
        prepared = objective.prepare(dict(batch))
        if decoding == "enhanced":
            eye = torch.eye(ids.shape[1], dtype=torch.bool)
            hidden = ~objective.visibility(prepared) & ~eye & (prepared["words"] >= 0)[:, None, :]
            rows = (prepared["words"] >= 0)[:, :, None].expand_as(hidden)
            by_column = (hidden & rows).sum((0, 1)).float() / rows.sum((0, 1)).clamp(min=1)
        else:
            by_column = prepared["decoder_targets"].float().mean(0)
        share[masking] = (by_column[1:9].mean().item(), by_column[9:41].mean().item(), by_column[1:41].mean().item())
    assert share["uniform"][0] == pytest.approx(0.5, abs=0.07) and share["uniform"][1] == pytest.approx(0.5, abs=0.05)
    assert share["pmi"][0] > 0.95 and share["pmi"][1] < 0.45, share
    assert share["pmi"][2] == pytest.approx(share["uniform"][2], abs=0.03), "the same expected ratio"


def test_pmi_without_statistics_is_refused_and_probabilities_keep_the_ratio(tiny_model, docstrings):
    from retromae.masking import capped_proportional

    objective, tokenizer = make(tiny_model, "retromae", decoder_masking="pmi")
    with pytest.raises(ConfigError, match="needs corpus statistics"):
        objective.prepare(batch_of(tokenizer, [docstrings[0]["text"]]))
    weights = torch.tensor([[9.0, 1.0, 1.0, 1.0, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]])
    lengths = torch.tensor([[1, 2, 1, 1, 0], [1, 1, 1, 1, 1]])
    p = capped_proportional(weights, lengths, torch.tensor([2.5, 2.5]))
    assert (p * lengths).sum(-1).tolist() == pytest.approx([2.5, 2.5])
    assert p[0].tolist() == pytest.approx([1.0, 0.375, 0.375, 0.375, 0.0])  # top word capped, the rest: 1.5 / 4
    assert p[1].tolist() == pytest.approx([w / 6 for w in (1, 2, 3, 4, 5)])
    # the objective's own chances: the expected number of hidden tokens is the ratio of every word token, word 0's too
    from retromae.masking import word_lengths

    objective.attach_corpus_statistics(torch.full((len(tokenizer),), 7), 7 * len(tokenizer))
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:3]]))
    words = batch["words"]
    chance = objective.word_chance(batch)
    expected = objective.config.decoder_mask_ratio * (words >= 0).sum(-1).float()
    assert (chance * word_lengths(words)).sum(-1).tolist() == pytest.approx(expected.tolist(), rel=1e-5)


# ----- TSDAE ----------------------------------------------------------------------------------------------


def test_tsdae_deletes_whole_words_and_keeps_about_40_percent(tiny_model, docstrings):
    objective, tokenizer = make(tiny_model, "tsdae")
    texts = [d["text"] for d in docstrings[:6]] + ["Short."]
    kept_words = total_words = 0
    for trial in range(8):
        batch = objective.prepare(batch_of(tokenizer, texts, first_index=100 * trial))
        words, deleted = batch["words"], batch["deleted"]
        for b in range(len(texts)):
            word_ids = words[b][words[b] >= 0]
            gone = {w.item() for w in word_ids if deleted[b][words[b] == w].all()}
            assert all(deleted[b][words[b] == w].any() == (w in gone) for w in word_ids.unique().tolist())
            kept = word_ids.unique().numel() - len(gone)
            assert kept >= 1, "at least one word is kept"
            kept_words, total_words = kept_words + kept, total_words + word_ids.unique().numel()
            noisy = batch["noisy_input_ids"][b][batch["noisy_attention_mask"][b].bool()].tolist()
            real = batch["attention_mask"][b].bool()
            assert noisy == batch["input_ids"][b][real & ~deleted[b]].tolist(), "the kept tokens, in order"
    assert kept_words / total_words == pytest.approx(0.4, abs=0.04)


def test_tsdae_decoder_reads_one_key_the_pooled_vector_through_tied_causal_layers(tiny_model, docstrings):
    objective, tokenizer = make(tiny_model, "tsdae")
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:3]], max_len=20))
    keys = []
    hooks = [c.attention.register_forward_hook(lambda m, args, out: keys.append(args[1].shape[1]))
             for c in objective.cross_attention]
    own = {n for n, _ in objective.named_parameters() if not n.startswith("encoder.")}
    assert own and all(n.startswith("cross_attention.") for n in own), "the decoder's other weights are the encoder's"
    with torch.no_grad():
        vector = objective.pooled(batch)
        base = objective.decode(vector, batch)
        for h in hooks:
            h.remove()
        assert keys == [1] * len(objective.cross_attention), "each cross-attention has exactly one key"
        for j in (2, 7):
            changed = dict(batch, input_ids=batch["input_ids"].clone())
            changed["input_ids"][0, j] = (changed["input_ids"][0, j] + 5) % len(tokenizer)
            moved = (objective.decode(vector, changed)[0] - base[0]).abs().amax(-1) > 1e-6
            assert moved.nonzero().flatten().tolist() == list(range(j, base.shape[1])), "causal"
        moved = (objective.decode(vector + 1.0, batch) - base).abs().amax(-1) > 1e-6
        assert moved[batch["attention_mask"][:, :-1].bool()].all(), "every position reads the pooled vector"


@pytest.mark.parametrize("name, switch", [("tsdae", "decoder_checkpointing"), ("starbucks", "pair_checkpointing")])
def test_checkpointing_gives_the_same_losses_and_gradients(tiny_model, docstrings, name, switch):
    """Recomputing TSDAE's decoder layers, or each Starbucks pair, in the backward pass (to save memory) changes
    nothing, dropout included."""
    results = []
    settings = {"pairs": [[1, 16], [2, 32]]} if name == "starbucks" else {}
    for recompute in (False, True):
        objective, tokenizer = make(tiny_model, name, **{switch: recompute, **settings})
        objective.train()
        for module in objective.modules():  # dropout on, so the checkpoint must replay the same masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
        batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:4]], max_len=32))
        torch.manual_seed(3)
        losses = objective(batch)
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}))
    (losses_plain, grads_plain), (losses_recomputed, grads_recomputed) = results
    assert losses_plain.keys() == losses_recomputed.keys()
    for key in losses_plain:
        torch.testing.assert_close(losses_recomputed[key], losses_plain[key], rtol=1e-6, atol=0.0)
    own = "cross_attention." if name == "tsdae" else "decoder."
    assert grads_plain.keys() == grads_recomputed.keys() and any(n.startswith(own) for n in grads_plain)
    for name in grads_plain:
        torch.testing.assert_close(grads_recomputed[name], grads_plain[name], rtol=1e-5, atol=1e-6)


# ----- MAE-LM ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, settings", [("maelm", {}), ("retromae", {"encoder_masking": "remove"})])
def test_removed_positions_never_reach_the_encoder(tiny_model, docstrings, name, settings):
    """Whatever token sits at a removed position ([MASK] included), the encoder's outputs are the same, and equal
    the encoder run on the kept tokens alone with their original position ids."""
    objective, tokenizer = make(tiny_model, name, **settings)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:4]], max_len=32))
    removed = batch["removed"] if name == "maelm" else batch["encoder_mask"]
    assert removed.any() and (name == "retromae" or "encoder_input_ids" not in batch), "no corrupted input is made"
    seen = []
    hook = objective.arch.body.embeddings.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["input_ids"]), with_kwargs=True)
    with torch.no_grad():
        states = objective.encode(batch)
        hook.remove()
        assert tokenizer.mask_token_id not in seen[0]
        for replacement in (tokenizer.mask_token_id, 77):
            other = dict(batch, input_ids=batch["input_ids"].masked_fill(removed, replacement))
            assert torch.equal(objective.encode(other), states)
        b = 1
        keep = batch["attention_mask"][b].bool() & ~removed[b]
        positions = keep.nonzero().flatten()
        alone = objective.arch.body(input_ids=batch["input_ids"][b, positions][None],
                                              position_ids=positions[None]).last_hidden_state[0]
        assert torch.allclose(states[b, positions], alone, atol=1e-5)
        assert not states[b, ~keep].any()
    counts = objective.num_items(batch)
    assert counts["mlm"] == removed.sum() and torch.isfinite(objective(batch)["mlm"])


# ----- Condenser / coCondenser ------------------------------------------------------------------------------


def test_condenser_head_reads_the_skip_layer_tokens_and_the_last_cls(tiny_model, docstrings):
    objective, tokenizer = make(tiny_model, "condenser", skip_from=1)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:3]], max_len=24))
    with torch.no_grad():
        states = objective.arch.layer_states(batch["encoder_input_ids"], batch["attention_mask"])
        assert len(states) == 3  # embeddings, layer 1, layer 2
        base = objective.head_states(states, batch["attention_mask"])

        def moved(layer, rows):
            changed = list(states)
            changed[layer] = changed[layer].clone()
            changed[layer][:, rows] += 1.0
            return (objective.head_states(tuple(changed), batch["attention_mask"]) - base).abs().max() > 1e-5

        assert moved(1, slice(1, None)), "the head reads layer skip_from's tokens"
        assert moved(2, slice(0, 1)), "and the last layer's CLS"
        assert not moved(0, slice(None)) and not moved(2, slice(1, None)) and not moved(1, slice(0, 1))
    with pytest.raises(ConfigError, match="skip_from=6: the model has 2 layers"):
        make(tiny_model, "condenser")


def test_cocondenser_spans_and_contrast_by_hand(tiny_model, docstrings):
    """Two disjoint windows of each text become their own inputs; the contrast is InfoNCE over unnormalised dot
    products of every other span, the sibling as positive, other spans of the same document left out."""
    from retromae.objectives.condenser import span_contrast_sum

    objective, tokenizer = make(tiny_model, "cocondenser", skip_from=1, span_tokens=6)
    plain = batch_of(tokenizer, [d["text"] for d in docstrings[:4]], max_len=40)
    batch = objective.prepare(plain)
    spans, n = batch["spans"], 4
    for b in range(n):
        text = plain["input_ids"][b][1 : int(plain["attention_mask"][b].sum()) - 1].tolist()
        pieces = [spans["input_ids"][r][spans["attention_mask"][r].bool()].tolist()[1:-1] for r in (b, b + n)]
        places = [next(i for i in range(len(text)) if text[i : i + len(p)] == p) for p in pieces]
        assert len(pieces[0]) == len(pieces[1]) == min(6, len(text) // 2)
        assert places[0] + len(pieces[0]) <= places[1], "disjoint, in order"
    reps, docs = torch.randn(8, 5), torch.tensor([0, 1, 1, 2])
    logits = reps @ reps.T
    expected = 0.0
    for i in range(8):
        example, sibling = i % 4, (i + 4) % 8
        allowed = [j for j in range(8) if j != i and (docs[j % 4] != docs[example] or j % 4 == example)]
        expected -= (logits[i, sibling] - torch.logsumexp(logits[i, allowed], 0)).item()
    assert span_contrast_sum(reps, docs, cross_process=True).item() == pytest.approx(expected, rel=1e-5)
    losses, counts = objective(batch), objective.num_items(batch)
    assert set(losses) == set(counts) == {"mlm", "head", "contrast"} and counts["contrast"] == 8
    assert build_objective_config({"name": "cocondenser"}).batch_wide_losses() == ["contrast"]


# ----- Starbucks SMAE ---------------------------------------------------------------------------------------


def test_starbucks_loss_is_the_mean_over_pairs_of_mlm_and_mae(tiny_model, docstrings):
    """Trainer total (each named loss / its count x its weight) = mean over pairs of (MLM + MAE) / 2; a pair's MLM
    uses the head with its dense weight cut to the first d columns; masks nested; decoder starts as layer 0."""
    import torch.nn.functional as F

    pairs = [[1, 16], [2, 32]]
    objective, tokenizer = make(tiny_model, "starbucks", pairs=pairs)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:6]]))
    enc, dec = batch["encoder_mask"], batch["decoder_mask"]
    ordinary = (batch["words"] >= 0).sum()
    assert not (enc & ~dec).any() and enc.sum() / ordinary == pytest.approx(0.2, abs=0.05)
    assert dec.sum() / ordinary == pytest.approx(0.4, abs=0.05)
    layer0 = objective.arch.layers[0]
    for (name, p), q in zip(objective.decoder.named_parameters(), layer0.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    with torch.no_grad():
        losses, counts = objective(batch), objective.num_items(batch)
        total = sum(objective.loss_weights[k] * losses[k] / counts[k] for k in losses)
        states = objective.arch.layer_states(batch["encoder_input_ids"], batch["attention_mask"])
        head = objective.arch.head
        dense = objective.encoder.cls.predictions.transform.dense
        per_pair = []
        for layer, dim in pairs:
            x = states[layer][enc][:, :dim]
            t = objective.encoder.cls.predictions.transform.LayerNorm(F.gelu(x @ dense.weight[:, :dim].T + dense.bias))
            mlm = F.cross_entropy(objective.encoder.cls.predictions.decoder(t), batch["input_ids"][enc])
            assert (losses[f"mlm_{layer}x{dim}"] / enc.sum()).item() == pytest.approx(mlm.item(), rel=1e-5)
            per_pair.append((mlm + losses[f"mae_{layer}x{dim}"] / dec.sum()) / 2)
        assert total.item() == pytest.approx(torch.stack(per_pair).mean().item(), rel=1e-6)
        full = F.cross_entropy(head(states[2][enc]), batch["input_ids"][enc])
        assert (losses["mlm_2x32"] / enc.sum()).item() == pytest.approx(full.item(), rel=1e-5), "full size: plain MLM"
    with pytest.raises(ConfigError, match=r"\[\[3, 16\]\] do not fit the model \(2 layers of 32 dimensions\)"):
        make(tiny_model, "starbucks", pairs=[[1, 16], [3, 16]])


# ----- training: every named loss goes down on a real corpus -------------------------------------------------


@pytest.mark.skipif(not (BEIR / "cranfield").is_dir(), reason="../shared/data/beir is not present")
@pytest.mark.parametrize("objective, data", [
    ({"name": "seed"}, {}),
    ({"name": "cotmae", "max_span_tokens": 32}, {"cut": "document", "max_len": 128}),
    ({"name": "retromae", "decoder_masking": "pmi", "encoder_masking": "remove"}, {}),
    ({"name": "tsdae"}, {}),
    ({"name": "maelm"}, {}),
    ({"name": "condenser", "skip_from": 1}, {}),
    ({"name": "cocondenser", "skip_from": 1, "span_tokens": 24}, {}),
    ({"name": "starbucks", "pairs": [[1, 16], [2, 32]]}, {}),
], ids=["seed", "cotmae", "retromae-pmi-remove", "tsdae", "maelm", "condenser", "cocondenser", "starbucks"])
def test_every_named_loss_decreases_on_a_real_corpus(tiny_model, tmp_path, objective, data):
    from retromae.pretrain import run

    cfg = tiny_config(tiny_model, BEIR / "cranfield" / "corpus.jsonl", tmp_path, objective=objective,
                      train={"max_steps": 30, "lr": 2e-3, "warmup_ratio": 0.0, "logging_steps": 10},
                      data={"max_len": 64, **data})
    history = run(cfg)["history"]
    names = [k for k in history[0] if k.startswith("loss/")]
    assert names
    for name in names:
        assert history[-1][name] < history[0][name], f"{name}: {history[0][name]:.4f} -> {history[-1][name]:.4f}"
    assert (tmp_path / "model" / "pretraining" / "heads.safetensors").is_file()


# ----- Starbucks across the stages: SRL fine-tuning and the (layer, dim) evaluation --------------------------


def test_srl_loss_and_its_kl_sends_no_gradient_to_the_full_size(tiny_model):
    """SRL = CE at full size + at each other (layer, dim) pair CE + KL towards the full-size scores, which are
    detached: the KL term moves the pairs, never the full-size vectors."""
    import torch.nn.functional as F

    from retromae.finetune.model import BiEncoder, LossConfig
    from retromae.modeling import load_pretrained

    from transformers import AutoModel

    encoder = load_pretrained(AutoModel, ModelConfig(name_or_path=str(tiny_model), dropout=0.0))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model)))
    pairs = [[1, 8], [2, 16], [2, 32]]  # the last is the full size (2 layers of 32): not an extra pair
    bi = BiEncoder(encoder, LossConfig(starbucks_pairs=pairs, cross_device_negatives=False))
    assert bi.pairs == [(1, 8), (2, 16)]
    for too_big in ([[1, 64]], [[3, 8]]):  # wider than the model, or deeper
        with pytest.raises(ConfigError, match="does not fit"):
            BiEncoder(encoder, LossConfig(starbucks_pairs=too_big, cross_device_negatives=False))
    q = tokenizer(["open a file", "close the stream"], padding=True, return_tensors="pt")
    p = tokenizer(["read bytes from a file", "a socket", "flush and close", "stream of text"], padding=True,
                  return_tensors="pt")
    batch = {"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
             "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"],
             "passage_valid": torch.ones(4, dtype=torch.bool)}
    losses = bi(batch)
    assert set(losses) == {"contrastive", "srl_ce", "srl_kl"}
    assert bi.num_items(batch)["srl_kl"].item() == 2 and bi.num_items(batch)["srl_ce"].item() == 2
    # by hand, from the hidden states
    with torch.no_grad():
        qs = encoder(**q, output_hidden_states=True).hidden_states
        ps = encoder(**p, output_hidden_states=True).hidden_states
    targets = torch.tensor([0, 2])
    full = qs[-1][:, 0] @ ps[-1][:, 0].T
    expected_ce, expected_kl = 0.0, 0.0
    for layer, dim in bi.pairs:
        scores = qs[layer][:, 0, :dim] @ ps[layer][:, 0, :dim].T
        expected_ce += F.cross_entropy(scores, targets, reduction="sum")
        expected_kl += F.kl_div(scores.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="sum")
    assert losses["contrastive"].item() == pytest.approx(F.cross_entropy(full, targets, reduction="sum").item(),
                                                         rel=1e-5)
    assert losses["srl_ce"].item() == pytest.approx(float(expected_ce), rel=1e-5)
    assert losses["srl_kl"].item() == pytest.approx(float(expected_kl), rel=1e-4)
    # the KL's gradient reaches the pair parts of the vectors, not the full-size part
    queries, passages = bi.encode_queries(batch), bi.encode_passages(batch)
    queries.retain_grad()
    passages.retain_grad()
    kl = bi._srl_losses(queries, passages, batch["passage_valid"], targets, 2, batch)["srl_kl"]
    kl.backward()
    assert queries.grad[:, :32].abs().max() == 0 and passages.grad[:, :32].abs().max() == 0
    assert queries.grad[:, 32:].abs().max() > 0
    # with teacher scores, distillation reads the full-size scores of each query's own group: KL(teacher || student)
    bi.cfg.distill_weight = 1.0
    batch["teacher_scores"] = torch.tensor([[2.0, -1.0], [0.5, 1.5]])
    expected = sum(F.kl_div(full[i, 2 * i: 2 * i + 2].log_softmax(-1), batch["teacher_scores"][i].log_softmax(-1),
                            log_target=True, reduction="sum") for i in range(2))
    assert bi(batch)["distill"].item() == pytest.approx(float(expected), rel=1e-5)


def test_layer_and_dim_evaluation_encodes_once_and_scores_every_pair(tiny_model, beir_task, tmp_path):
    from retromae.retrieval.encoder import EncodeConfig
    from retromae.retrieval.evaluate import SearchConfig, evaluate_model

    search = SearchConfig(metrics=["ndcg@10"], layers=[1, 2], dims=[8, 32])
    cfg = EncodeConfig(precision="no", passage_max_len=32, query_max_len=32)
    out = tmp_path / "grid.json"
    grid = evaluate_model(str(tiny_model), str(beir_task), None, cfg, search, output=str(out))
    assert sorted(grid["matryoshka"]) == ["1x32", "1x8", "2x32", "2x8"]
    plain = evaluate_model(str(tiny_model), str(beir_task), None, cfg, SearchConfig(metrics=["ndcg@10"]))
    assert grid["matryoshka"]["2x32"]["ndcg@10"] == pytest.approx(plain["ndcg@10"], abs=1e-9), "the last layer whole"
    assert grid["ndcg@10"] == grid["matryoshka"]["2x32"]["ndcg@10"]
    assert (tmp_path / "grid.matryoshka.png").stat().st_size > 1000
    assert "| 1 | " in (tmp_path / "grid.matryoshka.md").read_text()
    # the (layer, 8) cells rank by the FIRST 8 coordinates of that layer's own vector: written out with numpy
    from retromae.retrieval.data import load_beir_folder
    from retromae.retrieval.encoder import TextEncoder
    from retromae.retrieval.metrics import evaluate

    import numpy as np

    data = load_beir_folder(beir_task, "test")
    ids, texts = data.passages(" ")
    qids = list(data.queries)
    encoder = TextEncoder(str(tiny_model), cfg, device="cpu").with_layers([1, 2])
    docs = encoder.encode(texts, "passage", show_progress=False)
    queries = encoder.encode([data.queries[q] for q in qids], "query", show_progress=False)
    def ndcg_of(block):
        scores = queries[:, block].astype(np.float64) @ docs[:, block].T.astype(np.float64)
        run = {q: {ids[j]: float(scores[n, j]) for j in np.argsort(-scores[n])[:100]} for n, q in enumerate(qids)}
        return evaluate(data.qrels, run, ["ndcg@10"])[0]["ndcg@10"]

    # FAISS's float32 inner products and these differ in the last bits, and with several BLAS threads a near-tie of
    # this random model can rank the other way (seen: 0.011339 against 0.011416), hence a tolerance. This random
    # model's slices all score about alike, so this end-to-end check cannot tell the first 8 coordinates from
    # others: that rule is pinned on hand-made vectors (test_pinned_evaluate.py, the layer and dim grid)
    for i, layer in enumerate([1, 2]):
        expected = ndcg_of(slice(32 * i, 32 * i + 8))  # layer i's block of 32, its first 8 coordinates
        assert grid["matryoshka"][f"{layer}x8"]["ndcg@10"] == pytest.approx(expected, abs=5e-4), (layer, expected)
