"""LexMAE's rules (methods.md §1.13), each computed here by hand on a tiny input: the lexicon-importance distribution
(a plain softmax of the max over non-special, non-pad positions of the MLM logits on the masked input), the bottleneck
through the stop-gradient word embeddings, the decoder's 50% overall re-masking (the encoder's exactly ceil(0.3 n)
positions plus fresh ones), and position 0 of the decoder's input holding the bottleneck with no position embedding."""

import math

import pytest
import torch

from retromae.objectives import build_objective_config, objective_class
from retromae.objectives.lexmae import exact_count_mask, lexicon_importance

TEXTS = ["open the file and read all of its lines into a list", "close the stream",
         "return the number of items in the queue, waiting if it is empty"]


@pytest.fixture
def lexmae(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(tiny_model)
    return objective_class("lexmae")(model, tiny_tokenizer, build_objective_config({"name": "lexmae"})).eval()


def prepared(objective, tokenizer, texts=TEXTS, seed=0):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return objective.prepare({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                              "seeds": torch.arange(len(texts)) + seed})


def test_lexicon_importance_is_a_plain_softmax_of_the_max_by_hand():
    logits = [[9.0, 9.0, 9.0], [1.0, -2.0, 0.5], [0.0, 3.0, -1.0], [7.0, 7.0, 7.0]]  # rows 0 and 3: [CLS], [SEP]
    pooled = torch.tensor(logits)[1:3].max(0).values  # the positions the rule keeps
    a = lexicon_importance(pooled[None])[0].tolist()
    mu = [max(logits[1][j], logits[2][j]) for j in range(3)]  # (1, 3, 0.5)
    expected = [math.exp(m) / sum(math.exp(x) for x in mu) for m in mu]
    assert a == pytest.approx(expected, rel=1e-6)
    assert lexicon_importance(torch.full((1, 3), float("-inf")))[0].tolist() == pytest.approx([1 / 3] * 3)


def test_the_bottleneck_pools_non_special_positions_of_the_masked_input_and_sits_at_position_0(lexmae, tiny_tokenizer):
    """The decoder's input, caught on its way in during forward(): position 0 is b = softmax(max over the lexicon
    positions of the MLM logits of the *masked* input) W_e, computed here position by position, with nothing added;
    positions 1.. are the encoder's embedding layer on the decoder's input."""
    batch = prepared(lexmae, tiny_tokenizer)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    special = {tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id, tiny_tokenizer.pad_token_id}
    by_hand = torch.tensor([[bool(attention[b, i]) and int(ids[b, i]) not in special for i in range(ids.shape[1])]
                            for b in range(ids.shape[0])])
    assert torch.equal(batch["lexicon_positions"], by_hand)
    assert (batch["encoder_input_ids"][by_hand] == tiny_tokenizer.mask_token_id).any(), "[MASK] positions pooled"
    seen = {}
    hook = lexmae.decoder.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].detach()))
    with torch.no_grad():
        lexmae(batch)
        hook.remove()
        arch = lexmae.arch
        logits = arch.head(arch.forward(batch["encoder_input_ids"], attention))  # on the masked input
        embeddings = arch.word_embeddings.weight
        for b in range(ids.shape[0]):
            mu = torch.full((logits.shape[-1],), float("-inf"))
            for i in range(ids.shape[1]):
                if by_hand[b, i]:
                    mu = torch.maximum(mu, logits[b, i])
            a = torch.exp(mu) / torch.exp(mu).sum()
            torch.testing.assert_close(seen["x"][b, 0], a @ embeddings, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen["x"][:, 1:], arch.embed(batch["decoder_input_ids"])[:, 1:])


def test_no_gradient_reaches_the_word_embeddings_through_the_bottleneck(lexmae, tiny_tokenizer):
    """b = a W_e with W_e detached: d(sum b)/dW_e comes only through a (the MLM head and the encoder). Without the
    stop-gradient it would carry the extra term d(sum_v a_v sum_e W_ve)/dW_ve = a_v (summed over the batch)."""
    batch = prepared(lexmae, tiny_tokenizer)
    weight = lexmae.arch.word_embeddings.weight

    def gradient(function):
        lexmae.zero_grad()
        function().sum().backward()
        return weight.grad.clone()

    hidden = lambda: lexmae.encode(batch)  # noqa: E731
    ours = gradient(lambda: lexmae.bottleneck(hidden(), batch))
    from retromae.objectives.base import max_pooled_logits

    live = gradient(lambda: lexicon_importance(max_pooled_logits(lexmae.arch.head, hidden(),
                                                                 batch["lexicon_positions"])) @ weight)
    with torch.no_grad():
        a = lexicon_importance(max_pooled_logits(lexmae.arch.head, lexmae.encode(batch), batch["lexicon_positions"]))
    extra = a.sum(0)[:, None].expand_as(weight)
    assert extra.abs().max() > 1e-3
    torch.testing.assert_close(ours, live - extra, rtol=1e-4, atol=1e-6)


def test_encoder_masks_exactly_ceil_30_percent_and_the_decoder_half_overall(lexmae, tiny_tokenizer, docstrings):
    """Each text: exactly ceil(0.3 n) of its n ordinary tokens masked for the encoder (token-level); the decoder's
    mask contains them and adds each other ordinary token with probability (0.5 - 0.3) / 0.7, so that half of all
    ordinary tokens are masked; specials and padding never; the decoder input is the original text off its mask."""
    texts = [d["text"] for d in docstrings[:64]]
    batch = tiny_tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    out = lexmae.prepare({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                          "seeds": torch.arange(64)})
    ordinary = out["lexicon_positions"]
    n = ordinary.sum(-1)
    assert torch.equal(out["encoder_mask"].sum(-1), torch.tensor([math.ceil(0.3 * int(k) - 1e-9) for k in n]))
    assert n.min() > 5 and int(n[0]) * 3 % 10 != 0, "texts long enough, some where 0.3 n is not whole"
    encoder, decoder = out["encoder_mask"], out["decoder_mask"]
    assert not (encoder & ~decoder).any(), "the encoder's masked positions stay masked for the decoder"
    assert not (decoder & ~ordinary).any()
    share = decoder.sum().item() / n.sum().item()
    fresh = (decoder & ~encoder).sum().item() / (ordinary & ~encoder).sum().item()
    # ~2,700 ordinary tokens: the shares' standard deviations are ~0.01
    assert abs(share - 0.5) < 0.04 and abs(fresh - 0.2 / 0.7) < 0.04, (share, fresh)
    same = ~decoder & batch["attention_mask"].bool()
    assert torch.equal(out["decoder_input_ids"][same], batch["input_ids"][same])
    masked_share = (out["decoder_input_ids"][decoder] == tiny_tokenizer.mask_token_id).float().mean().item()
    assert abs(masked_share - 0.8) < 0.05, masked_share
    assert torch.equal(exact_count_mask(torch.ones(1, 10, dtype=torch.bool), 0.3, torch.tensor([5]), 1).sum(-1),
                       torch.tensor([3])), "ceil(0.3 x 10) = 3, not 4 (float 0.3 x 10 = 3.0000000000000004)"


def test_lexmae_loss_goes_down_and_its_decoder_is_not_exported(lexmae, tiny_tokenizer):
    batch = prepared(lexmae, tiny_tokenizer)
    lexmae.train()
    optimizer = torch.optim.AdamW(lexmae.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        counts = lexmae.num_items(batch)
        out = lexmae(batch)
        loss = sum(out[k] / counts[k] for k in out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    heads = lexmae.heads_state_dict()
    assert "decoder_bias" in heads and not any("word_embeddings" in k for k in heads)


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, corpus_file, tmp_path):
    """LexMAE's losses are sums over their own tokens, counted over the global batch: 2 processes x 4 texts compute
    the losses and gradients of 1 process x 8 (float64)."""
    import json
    import sys
    from pathlib import Path

    import safetensors.torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_objective_family import launch

    spec = json.dumps({"name": "lexmae"})
    one = launch([str(tiny_model), str(corpus_file), str(tmp_path / "one"), "8", spec, "float64"], 1, tmp_path)
    two = launch([str(tiny_model), str(corpus_file), str(tmp_path / "two"), "4", spec, "float64"], 2, tmp_path)
    assert two["num_processes"] == 2 and set(one["means"]) == {"mlm", "decoder"}
    for name in one["means"]:
        assert two["means"][name] == pytest.approx(one["means"][name], rel=1e-10), name
    g1 = safetensors.torch.load_file(str(tmp_path / "one" / "grads.safetensors"))
    g2 = safetensors.torch.load_file(str(tmp_path / "two" / "grads.safetensors"))
    assert any(k.startswith("decoder") for k in g1)
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-10, rtol=1e-7), k
