"""RetroMAE's enhanced decoding, pinned rule by rule, and the loss wiring of the objectives."""

import pytest
import torch
from transformers import AutoModelForMaskedLM

from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import build_objective_config, objective_class
from retromae.objectives.retromae import decoder_visibility
from retromae.rng import example_seeds


def make_objective(model_dir, name="retromae", dropout=0.0, **settings):
    cfg = ModelConfig(name_or_path=str(model_dir), dropout=dropout)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    objective = objective_class(name)(load_masked_lm(cfg), tokenizer, build_objective_config({"name": name, **settings}))
    return objective.eval(), tokenizer


def make_batch(tokenizer, texts, first_index=0):
    enc = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    seeds = example_seeds(11, 0, torch.arange(first_index, first_index + len(texts)))
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "seeds": seeds}


@pytest.fixture(scope="module")
def retromae(tiny_model):
    return make_objective(tiny_model)


@pytest.fixture(scope="module")
def batch(retromae, docstrings):
    objective, tokenizer = retromae
    texts = [d["text"] for d in docstrings[:12]] + ["Short text."]
    return objective.prepare(make_batch(tokenizer, texts))


def test_visibility_rules(retromae, batch):
    visible, attention = retromae[0].visibility(batch), batch["attention_mask"].bool()
    targets = batch["decoder_targets"]
    B, L, _ = visible.shape
    eye = torch.eye(L, dtype=torch.bool)
    # own position hidden, for every row that is predicted (and every row but degenerate ones)
    assert not (visible & eye)[targets[:, :, None].expand(-1, -1, L) & eye].any()
    assert not visible[:, 1:, :][eye[1:, :].expand(B, -1, -1)].any()
    # column 0 (h) visible from every row but row 0
    assert visible[:, 1:, 0].all()
    assert not visible[:, 0, 0].any()
    # padding columns never visible
    assert not (visible & ~attention[:, None, :]).any()
    # special-token columns other than 0 ([SEP]) are never masked: visible to all real rows but their own
    sep = (batch["words"] < 0) & attention
    sep[:, 0] = False
    for b in range(B):
        for j in torch.nonzero(sep[b]).flatten():
            rows = torch.arange(L) != j
            assert visible[b, rows, j].all()


def test_hidden_columns_are_whole_words_at_the_decoder_ratio(retromae, batch):
    visible, words = retromae[0].visibility(batch), batch["words"]
    maskable = words >= 0
    hidden = ~visible & maskable[:, None, :]
    L = words.shape[1]
    hidden[:, torch.arange(L), torch.arange(L)] = False  # the own position is hidden on top of the word mask
    b = 0
    for i in range(1, int(batch["attention_mask"][b].sum())):
        for w in words[b][maskable[b]].unique():
            cols = (words[b] == w).clone()
            cols[i] = False
            if cols.any():
                states = hidden[b, i][cols]
                assert states.all() or not states.any(), "a row hides whole words"
    share = hidden[maskable].sum().item() / (maskable.sum(-1)[:, None] * maskable.sum(-1)[:, None]).sum().item()
    assert 0.45 < share < 0.55


def test_decoder_targets_every_ordinary_token_by_hand(batch, retromae):
    """The decoder predicts every real token but [CLS]/[SEP] (and padding), each against the original token: the
    targets and the summed loss, written out by hand from the token lists."""
    objective, tokenizer = retromae
    specials = set(tokenizer.all_special_ids)
    rows = zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
    expected = torch.tensor([[bool(a) and t not in specials for t, a in zip(ids, mask)] for ids, mask in rows])
    assert torch.equal(batch["decoder_targets"], expected)
    assert objective.num_items(batch)["decoder"].item() == expected.sum().item()
    with torch.no_grad():
        hidden = objective.encode(batch)
        decoded = objective.decode(hidden[:, 0], batch)
        head = objective.encoder.cls
        by_hand = 0.0
        for b, j in expected.nonzero().tolist():
            log_probs = torch.log_softmax(head(decoded[b, j][None])[0].double(), -1)
            by_hand -= log_probs[batch["input_ids"][b, j]].item()
        assert objective(batch)["decoder"].item() == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("name, loss, setting", [("retromae", "decoder", "decoder_loss_weight"),
                                                 ("dupmae", "bow", "bow_weight"),
                                                 ("costa", "span", "span_weight")])
def test_each_loss_weight_scales_its_gradient(tiny_model, docstrings, tmp_path, name, loss, setting):
    """The trainer's gradient is sum_k w_k grad(L_k): with w = 0 the loss adds nothing, with w = 2 its part doubles."""
    from retromae.trainer import TrainConfig, Trainer, make_accelerator

    grads = {}
    for weight in (0.0, 1.0, 2.0):
        objective, tokenizer = make_objective(tiny_model, name, **{setting: weight})
        objective.train()
        micro = make_batch(tokenizer, [d["text"] for d in docstrings[:8]])
        trainer = Trainer(objective, None, TrainConfig(output_dir=str(tmp_path), max_steps=1, report_to="none",
                                                       mixed_precision="no", cpu=True),
                          make_accelerator(TrainConfig(output_dir=str(tmp_path), report_to="none", cpu=True,
                                                       mixed_precision="no")))
        trainer.accumulate_gradients(trainer.prepare_batches([micro]))
        grads[weight] = torch.cat([p.grad.flatten() for p in trainer.objective.parameters() if p.grad is not None])
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    # (not the BoW decoder's contrast: an untrained decoder's log-distributions are all near -log V, so their cosine
    # similarities are all near 1 and the contrast's gradient is at float rounding, ~1e-7)
    part = grads[1.0] - grads[0.0]
    scale = part.abs().max()
    assert scale > 1e-5, f"the {loss} loss reaches the parameters"
    assert ((grads[2.0] - grads[0.0]) - 2 * part).abs().max() <= 1e-3 * scale


def test_decoder_sees_h_but_never_the_token_it_predicts(retromae, batch):
    objective, _ = retromae
    torch.manual_seed(1)
    h = torch.randn(batch["input_ids"].shape[0], objective.encoder.config.hidden_size)
    with torch.no_grad():
        base = objective.decode(h, batch)
        b, L = 0, int(batch["attention_mask"][0].sum())
        for i in range(1, L - 1):
            changed = dict(batch)
            ids = batch["input_ids"].clone()
            ids[b, i] = (ids[b, i] + 7) % objective.encoder.config.vocab_size
            changed["input_ids"] = ids
            out = objective.decode(h, changed)
            assert torch.allclose(out[b, i], base[b, i], atol=1e-6), f"row {i} saw its own token"
            rows_that_see_i = objective.visibility(batch)[b, :, i]
            moved = (out[b] - base[b]).abs().amax(-1) > 1e-6
            assert torch.equal(moved[rows_that_see_i], torch.ones_like(moved[rows_that_see_i]))
            assert not moved[~rows_that_see_i].any(), "a row saw a column its mask hides"
        h2 = h.clone()
        h2[b] += 1.0
        out = objective.decode(h2, batch)
        assert ((out[b, 1:L] - base[b, 1:L]).abs().amax(-1) > 1e-6).all(), "every row sees h"


def test_mlm_loss_equals_transformers_masked_lm_loss(tiny_model, docstrings):
    objective, tokenizer = make_objective(tiny_model, "mlm")
    batch = objective.prepare(make_batch(tokenizer, [d["text"] for d in docstrings[20:28]]))
    with torch.no_grad():
        ours = objective(batch)["mlm"] / objective.num_items(batch)["mlm"]
        labels = torch.where(batch["encoder_mask"], batch["input_ids"], -100)
        reference = AutoModelForMaskedLM.from_pretrained(tiny_model).eval()
        theirs = reference(input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_retromae_losses_and_gradients_reach_encoder_and_decoder(retromae, batch):
    objective, _ = retromae
    objective.zero_grad()
    losses = objective(batch)
    counts = objective.num_items(batch)
    assert set(losses) == set(counts) == {"mlm", "decoder"}
    total = sum(losses[n] / counts[n] for n in losses)
    total.backward()
    assert objective.decoder.attention.query.weight.grad.abs().sum() > 0
    layer0 = objective.encoder.bert.encoder.layer[0].attention.self.query.weight.grad
    assert layer0.abs().sum() > 0
    # at initialisation both losses sit near log(vocabulary size)
    vocab = objective.encoder.config.vocab_size
    for n in losses:
        assert abs((losses[n] / counts[n]).item() - torch.log(torch.tensor(float(vocab))).item()) < 1.5
    objective.zero_grad()


def test_basic_decoding_predicts_its_masked_tokens(tiny_model, docstrings):
    objective, tokenizer = make_objective(tiny_model, decoding="basic")
    batch = objective.prepare(make_batch(tokenizer, [d["text"] for d in docstrings[:6]]))
    targets = batch["decoder_targets"]
    share = targets.sum() / (batch["words"] >= 0).sum()
    assert 0.4 < share.item() < 0.65
    changed = batch["decoder_input_ids"] != batch["input_ids"]
    assert not (changed & ~targets).any(), "only the decoder-masked tokens are corrupted"
    losses = objective(batch)
    assert torch.isfinite(losses["decoder"]) and losses["decoder"] > 0


def test_unknown_objective_and_bad_settings_are_refused():
    from retromae.config import ConfigError

    with pytest.raises(ConfigError, match="not a known objective"):
        build_objective_config({"name": "retromea"})
    with pytest.raises(ConfigError, match="decoding"):
        build_objective_config({"name": "retromae", "decoding": "fancy"})
    with pytest.raises(ConfigError, match="unknown key 'objective.decoder_ratio'"):
        build_objective_config({"name": "retromae", "decoder_ratio": 0.5})


def test_visibility_gives_empty_rows_column_zero():
    words = torch.tensor([[-1, 0, -1, -1]])  # [CLS] w [SEP]? no: a text whose only word is hidden everywhere
    attention = torch.tensor([[1, 1, 0, 0]])
    hidden = torch.zeros(1, 4, 4, dtype=torch.bool)
    hidden[:, :, 1] = True
    visible = decoder_visibility(words, attention, hidden)
    assert visible.any(-1).all(), "no row is left without a column (attention would be NaN)"
    assert not visible[0, :, 2:].any()
