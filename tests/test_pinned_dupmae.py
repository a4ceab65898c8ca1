"""DupMAE's rules pinned on hand-checkable cases (methods.md §1.3): the bag-of-words target and loss, and the
retrieval representation [W h ; top-k of mu] with its save / load (an export's dupmae/ part, or a pretraining
export's heads file)."""

import json
import shutil

import pytest
import safetensors.torch
import torch

from retromae.config import ConfigError
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import build_objective_config, objective_class
from retromae.objectives.dupmae import (DupMAERepresentation, DupMAERepresentationConfig, bag_of_words,
                                        bag_of_words_loss_sum, head_state, load_head_state)
from retromae.rng import example_seeds

HEAD_BIAS = "cls.predictions.transform.dense.bias"  # one of the tiny BERT's own (untied) head weights


def masked_lm(model_dir):
    torch.manual_seed(0)
    return load_masked_lm(ModelConfig(name_or_path=str(model_dir), dropout=0.0))


def copy_of(model_dir, folder):
    shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    return folder


# ----- the bag-of-words loss ------------------------------------------------------------------------------------


def test_a_text_with_an_empty_bag_adds_nothing_to_the_loss():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    bag = torch.tensor([[True, False, True], [False, False, False]])
    # text 0: -(-1 + -3) / 2 = 2; text 1 has no ordinary token: 0 (not 1, not a division by zero)
    assert bag_of_words_loss_sum(log_probs, bag).item() == pytest.approx(2.0)


def test_the_first_word_is_in_the_bag(tiny_model):
    """The ordinary tokens are every word's, the first word (word index 0) included; [CLS] / [SEP] / pad are not."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model)))
    objective = objective_class("dupmae")(masked_lm(tiny_model), tokenizer, build_objective_config({"name": "dupmae"}))
    texts = ["value", "return the value"]  # the first: one word only, so its bag is that word's pieces
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    batch = objective.prepare({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                               "seeds": example_seeds(5, 0, torch.arange(2))})
    specials = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    for row, ids in zip(batch["bow_targets"], enc["input_ids"].tolist()):
        expected = sorted(set(ids) - specials)  # by hand: the text's token ids less the special ones
        assert expected and row.nonzero().flatten().tolist() == expected
    assert objective.num_items(batch)["bow"].item() == 2


def test_bag_of_words_is_made_on_the_device_of_the_ids():
    ids = torch.tensor([[0, 5, 1]], device="meta")  # meta: a device other than the CPU, without a GPU
    bag = bag_of_words(ids, torch.ones(1, 3, dtype=torch.bool, device="meta"), 8)
    assert bag.device.type == "meta" and bag.shape == (1, 8) and bag.dtype == torch.bool


# ----- the retrieval representation -----------------------------------------------------------------------------


def reference_mu(rep, ids, mask):
    """mu by a plain loop: each text's max of the head's logits over its positions 1 .. n-1 (no [CLS], no pad)."""
    with torch.no_grad():
        logits = rep.arch.head(rep.arch.forward(ids, mask))
    rows = []
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        rows.append(torch.stack([logits[b, p] for p in range(1, n)]).max(0).values)
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ["relu", "none"])
def test_representation_is_cls_projection_and_max_pooled_logits(tiny_model, activation):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model)))
    mlm = masked_lm(tiny_model)
    vocab = mlm.config.vocab_size
    rep = DupMAERepresentation(mlm, DupMAERepresentationConfig(dense_dim=8, topk=10 ** 6,
                                                               sparse_activation=activation)).eval()
    enc = tokenizer(["return the value of the function", "a list"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask[1].sum() < mask[0].sum(), "the second text is padded"
    with torch.no_grad():
        dense, values, vocab_ids = rep(ids, mask)
        cls_state = rep.arch.forward(ids, mask)[:, 0]
    # W starts as the truncated identity: W h = the first 8 coordinates of the [CLS] state
    torch.testing.assert_close(dense, cls_state[:, :8])
    mu = reference_mu(rep, ids, mask)
    assert (mu < 0).any() and (mu < 1).any(), "the case must show whether values are clamped, and where"
    expected = mu.clamp(min=0.0) if activation == "relu" else mu
    assert values.shape == (2, vocab)  # topk beyond the vocabulary keeps all of it
    assert (values[:, :-1] >= values[:, 1:]).all(), "the top-k in decreasing order"
    torch.testing.assert_close(rep.densify(values, vocab_ids), expected)


def test_densify_keeps_the_values_dtype_and_device(tiny_model):
    rep = DupMAERepresentation(masked_lm(tiny_model), DupMAERepresentationConfig(dense_dim=4, topk=2))
    values = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    out = rep.densify(values, torch.tensor([[3, 1]]))
    expected = torch.zeros(1, rep.vocab_size, dtype=torch.float64)
    expected[0, 3], expected[0, 1] = 0.5, -1.0  # by hand: each value at its vocabulary id, 0 elsewhere
    assert out.dtype == torch.float64 and torch.equal(out, expected)
    on_meta = rep.densify(values.to("meta"), torch.tensor([[3, 1]], device="meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (1, rep.vocab_size)


def test_head_state_names_are_the_models_own_and_leave_out_tied_weights(tiny_model):
    mlm = masked_lm(tiny_model)
    state = head_state(mlm)
    # the tiny BERT's head: its transform (dense, LayerNorm) and its output bias; the output matrix is the word
    # embeddings (tied), so not saved again
    assert sorted(state) == sorted(["cls.predictions.bias", "cls.predictions.transform.dense.weight",
                                    "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
                                    "cls.predictions.transform.LayerNorm.bias"])
    assert sorted(head_state(mlm, "head.")) == sorted("head." + name for name in state)


def test_load_head_state_loads_only_head_weights_under_the_prefix(tiny_model):
    mlm = masked_lm(tiny_model)
    body_before = mlm.bert.embeddings.word_embeddings.weight.detach().clone()
    vocab, hidden = body_before.shape
    state = {"encoder.cls.predictions.bias": torch.full((vocab,), 0.25),  # a head weight under the prefix
             "encoder.bert.embeddings.word_embeddings.weight": torch.zeros(vocab, hidden),  # the body: not a head weight
             "head." + HEAD_BIAS: torch.full((hidden,), 3.0)}  # another prefix
    assert load_head_state(mlm, state, "encoder.") == ["cls.predictions.bias"]
    assert torch.equal(mlm.cls.predictions.bias.detach(), torch.full((vocab,), 0.25))
    assert torch.equal(mlm.bert.embeddings.word_embeddings.weight.detach(), body_before)
    assert not torch.equal(dict(mlm.named_parameters())[HEAD_BIAS].detach(), torch.full((hidden,), 3.0))


# ----- save / load ----------------------------------------------------------------------------------------------


def test_save_then_load_gives_back_head_projection_and_settings(tiny_model, tmp_path):
    mlm = masked_lm(tiny_model)
    cfg = DupMAERepresentationConfig(dense_dim=8, topk=5, sparse_activation="none")
    rep = DupMAERepresentation(mlm, cfg)
    hidden = rep.arch.hidden_size
    with torch.no_grad():
        dict(mlm.named_parameters())[HEAD_BIAS].fill_(0.125)
        rep.projection.weight.fill_(0.5)
    export = tmp_path / "run" / "model"
    rep.save(export / "dupmae")  # the folders above it do not exist yet
    with torch.no_grad():
        rep.projection.weight.fill_(-2.0)
    rep.save(export / "dupmae")  # again, into the folder now there: overwritten
    copy_of(tiny_model, export)
    loaded = DupMAERepresentation.load(str(export))
    assert loaded.cfg == cfg and not loaded.training
    assert torch.equal(loaded.projection.weight.detach(), torch.full((8, hidden), -2.0))
    assert torch.equal(dict(loaded.mlm.named_parameters())[HEAD_BIAS].detach(), torch.full((hidden,), 0.125))
    assert json.loads((export / "dupmae" / "config.json").read_text())["dense_dim"] == 8


def test_load_of_a_plain_export_in_half_precision(tiny_model, tmp_path):
    """No dupmae/ part: the default settings, W = the truncated identity, fp32 weights whatever the checkpoint
    stores."""
    folder = tmp_path / "bf16"
    masked_lm(tiny_model).to(torch.bfloat16).save_pretrained(folder)
    rep = DupMAERepresentation.load(str(folder))
    hidden = rep.arch.hidden_size
    assert rep.cfg == DupMAERepresentationConfig()
    assert {p.dtype for p in rep.parameters()} == {torch.float32}
    expected = torch.zeros(384, hidden)  # by hand: rows 0 .. hidden-1 the identity, the rest 0
    for i in range(hidden):
        expected[i, i] = 1.0
    assert torch.equal(rep.projection.weight.detach(), expected)
    assert next(rep.parameters()).device.type == "cpu"


def test_load_of_a_pretraining_export_takes_its_heads_file(tiny_model, tmp_path):
    folder = copy_of(tiny_model, tmp_path / "pretrained")
    (folder / "pretraining").mkdir()
    hidden = masked_lm(tiny_model).config.hidden_size
    safetensors.torch.save_file({"encoder." + HEAD_BIAS: torch.full((hidden,), 0.75)},
                                str(folder / "pretraining" / "heads.safetensors"))
    rep = DupMAERepresentation.load(str(folder))
    assert torch.equal(dict(rep.mlm.named_parameters())[HEAD_BIAS].detach(), torch.full((hidden,), 0.75))


def test_load_puts_the_representation_on_the_device_given(tiny_model):
    rep = DupMAERepresentation.load(str(tiny_model), device="meta")  # meta: a device other than the CPU
    assert {p.device.type for p in rep.parameters()} == {"meta"}


def test_load_of_a_missing_folder_names_the_model(tmp_path):
    with pytest.raises(ConfigError, match=r"^model='.*nothing'"):
        DupMAERepresentation.load(str(tmp_path / "nothing"))
