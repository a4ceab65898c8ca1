"""SEED-Encoder (retromae/objectives/seed.py, methods.md §1.6): rules the mutation run found unpinned. The config's
bounds, the decoder's rotary positions on a rotary encoder (and none with `decoder_positions: own`), the size and
initialisation of the decoder's own position table, the width check of `decoder_projection: tied`, the items each
loss is averaged over, and the MLM loss beside the decoder's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_more_objectives import batch_of, make, ordinary_ids
from retromae.config import ConfigError
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import build_objective_config, objective_class
from retromae.objectives.seed import window_visibility
from retromae.rng import example_seeds
from retromae.tiny import make_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, docstrings):
    """Tiny random models (1 layer of 32) of the families the BERT fixture cannot stand for: EuroBERT (rotary
    positions, no position table) and ELECTRA (word embeddings of 16, narrower than its layers of 32)."""
    texts = [d["text"] for d in docstrings[:200]]
    root = tmp_path_factory.mktemp("seed_families")
    return {family: make_tiny_model(root / family, texts, vocab_size=300, hidden=32, layers=1, heads=2,
                                    max_positions=64, family=family)
            for family in ("eurobert", "electra")}


def seed_with_config(model_dir, edit_config, **settings):
    """A SEED objective whose encoder's config is edited (by `edit_config`) before the objective is built."""
    cfg = ModelConfig(name_or_path=str(model_dir), dropout=0.0)
    model = load_masked_lm(cfg)
    edit_config(model.config)
    torch.manual_seed(0)
    return objective_class("seed")(model, load_tokenizer(cfg), build_objective_config({"name": "seed", **settings}))


def ce_sum(logits, targets):
    return F.cross_entropy(logits.double(), targets, reduction="sum").item()


# ----- the config -----------------------------------------------------------------------------------------------


def test_seed_config_takes_one_layer_and_a_window_of_one_and_refuses_zero():
    """k = 1 (each row sees itself and column 0) and a single decoder layer are the smallest valid settings; zero of
    either is refused, each on its own (the other one valid)."""
    config = build_objective_config({"name": "seed", "attention_window": 1, "decoder_layers": 1})
    assert (config.attention_window, config.decoder_layers) == (1, 1)
    for bad in ({"attention_window": 0, "decoder_layers": 3}, {"attention_window": 2, "decoder_layers": 0}):
        with pytest.raises(ConfigError, match="must be >= 1"):
            build_objective_config({"name": "seed", **bad})


# ----- the visibility mask ---------------------------------------------------------------------------------------


def test_window_visibility_is_built_on_the_attention_masks_device():
    """The (B, L, L) mask is made where the batch lives (a mask built on the CPU for a batch on a GPU would fail
    there): on PyTorch's `meta` device, which holds no data, every tensor of the computation must be on it."""
    attention = torch.ones(2, 5, dtype=torch.long, device="meta")
    visible = window_visibility(attention, 2)
    assert visible.device.type == "meta" and visible.shape == (2, 5, 5) and visible.dtype == torch.bool


# ----- the items each loss is averaged over, and the MLM loss ------------------------------------------------------


def test_seed_counts_masked_tokens_and_next_token_targets(tiny_model):
    """num_items: mlm = the encoder's masked tokens; decoder = one target per real token after the first. Two rows
    of 6 and 4 real tokens ([CLS] w w w w [SEP] / [CLS] w w [SEP] [PAD] [PAD]): 5 + 3 = 8 decoder targets."""
    objective, tokenizer = make(tiny_model, "seed", mask_ratio=0.3)
    w = ordinary_ids(tokenizer, 6)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    ids = torch.tensor([[cls, w[0], w[1], w[2], w[3], sep], [cls, w[4], w[5], sep, pad, pad]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    batch = objective.prepare({"input_ids": ids, "attention_mask": attention,
                               "seeds": example_seeds(5, 0, torch.arange(2))})
    masked = int(batch["encoder_mask"].sum())
    assert masked > 0
    counts = objective.num_items(batch)
    assert set(counts) == {"mlm", "decoder"}
    assert int(counts["decoder"]) == 8 and int(counts["mlm"]) == masked


def test_seed_losses_are_the_encoders_mlm_and_the_decoders_next_token_loss(tiny_model, docstrings):
    """forward gives exactly two named losses: `mlm` = CE of BERT's own head on the encoder's final states of the
    corrupted input at the masked positions (targets: the original tokens), `decoder` = the next-token CE."""
    objective, tokenizer = make(tiny_model, "seed")
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:3]], max_len=24))
    bert = objective.encoder
    with torch.no_grad():
        hidden = bert.bert(input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        losses = objective(batch)
        masked = batch["encoder_mask"]
        expected_mlm = ce_sum(bert.cls(hidden[masked]), batch["input_ids"][masked])
    assert set(losses) == {"mlm", "decoder"}
    assert losses["mlm"].item() == pytest.approx(expected_mlm, rel=1e-5)


# ----- the decoder's positions -------------------------------------------------------------------------------------


def decoder_inputs(objective, batch, own_positions: bool):
    """What the decoder's first layer reads, built here: the encoder's embedding layer on the shifted text, or the
    bare word embeddings plus the decoder's own table's rows 0 .. L-2."""
    shifted = batch["input_ids"][:, :-1]
    if not own_positions:
        return objective.arch.embed(shifted)
    return objective.arch.word_embeddings(shifted) + objective.position_table.weight[: shifted.shape[1]][None]


def test_seed_decoder_on_a_rotary_encoder_rotates_by_the_shifted_texts_positions(family_models, docstrings):
    """EuroBERT has no position table: the decoder's self-attention is rotary, with position ids 0 .. L-2 of the
    shifted text. Its output equals the decoder stack run here with those positions, and differs from the stack
    run without positions (so positions do matter here)."""
    objective, tokenizer = make(family_models["eurobert"], "seed", decoder_layers=1)
    assert objective.decoder.layers[0].attention.rotary is not None
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=20))
    length = batch["input_ids"].shape[1] - 1
    assert length != objective.arch.hidden_size  # a length equal to the width would hide x.shape[2] for x.shape[1]
    h = torch.randn(2, objective.arch.hidden_size)
    with torch.no_grad():
        decoded = objective.decode(h, batch)
        x = decoder_inputs(objective, batch, own_positions=False)
        rotated = objective.decoder(x, batch["decoder_visible"], torch.arange(length), memory=h[:, None])
        unrotated = objective.decoder(x, batch["decoder_visible"], None, memory=h[:, None])
    torch.testing.assert_close(decoded, rotated)
    assert (decoded - unrotated).abs().max() > 1e-4


def test_seed_own_positions_replace_rotary_on_a_rotary_encoder(family_models, docstrings):
    """`decoder_positions: own` (the authors' code): positions come from the decoder's table only, so on a rotary
    encoder the decoder's attention is not rotary: decode = the stack on (word embedding + table row), no positions."""
    objective, tokenizer = make(family_models["eurobert"], "seed", decoder_layers=1, decoder_positions="own")
    assert all(layer.attention.rotary is None for layer in objective.decoder.layers)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=20))
    h = torch.randn(2, objective.arch.hidden_size)
    with torch.no_grad():
        decoded = objective.decode(h, batch)
        x = decoder_inputs(objective, batch, own_positions=True)
        expected = objective.decoder(x, batch["decoder_visible"], None, memory=h[:, None])
    torch.testing.assert_close(decoded, expected)


def test_seed_own_position_table_has_a_row_per_encoder_position_and_the_encoders_init(tiny_model):
    """The table has one row per position the encoder takes (its config's max_position_embeddings: 128 for the tiny
    BERT), 512 (BERT's) where the config gives no count (0). Its weights are drawn like the encoder's: normal with
    std = the config's initializer_range (set to 0.05 here: 128 x 32 draws give a sample std within ~0.001 of it)."""
    def widen_init(config):
        config.initializer_range = 0.05

    table = seed_with_config(tiny_model, widen_init, decoder_positions="own").position_table.weight
    assert table.shape == (128, 32)
    assert table.std().item() == pytest.approx(0.05, abs=0.004)
    assert table.mean().item() == pytest.approx(0.0, abs=0.004)

    def no_count(config):
        config.max_position_embeddings = 0

    assert seed_with_config(tiny_model, no_count, decoder_positions="own").position_table.weight.shape == (512, 32)


# ----- the read-out of the decoder on narrow word embeddings (ELECTRA) ------------------------------------------------


def test_seed_on_narrow_embeddings_reads_out_through_the_generator_head_and_refuses_tied(family_models, docstrings):
    """ELECTRA's word embeddings (16) are narrower than its layers (32). The default read-out is the encoder's MLM
    head (ELECTRA's generator head: 32 -> 16 -> vocabulary), which fits: decoder loss = CE of that head on the
    decoder's states. `decoder_projection: tied` (states @ W_e^T) cannot multiply 32-wide states by 16-wide
    embeddings: refused in one line, naming both widths."""
    objective, tokenizer = make(family_models["electra"], "seed")
    electra = objective.encoder
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=20))
    with torch.no_grad():
        h = electra.electra(input_ids=batch["encoder_input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
        decoded = objective.decode(h, batch)
        losses = objective(batch)
        targets = batch["decoder_targets"]
        logits = electra.generator_lm_head(electra.generator_predictions(decoded[targets]))
    assert losses["decoder"].item() == pytest.approx(ce_sum(logits, batch["input_ids"][:, 1:][targets]), rel=1e-5)
    with pytest.raises(ConfigError, match=r"decoder_projection=tied needs word embeddings as wide as the layers "
                                          r"\(16 != 32\)"):
        make(family_models["electra"], "seed", decoder_projection="tied")


def test_seed_decoder_positions_are_made_on_the_batchs_device(family_models, docstrings):
    """The rotary position ids are made where the decoder's inputs live (ids made on the CPU for a batch on a GPU
    would fail there): the objective and the batch on PyTorch's `meta` device (no data), decode runs there."""
    objective, tokenizer = make(family_models["eurobert"], "seed", decoder_layers=1)
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:2]], max_len=12))
    objective.to("meta")
    on_meta = {k: v.to("meta") for k, v in batch.items() if torch.is_tensor(v)}
    decoded = objective.decode(torch.zeros(2, objective.arch.hidden_size, device="meta"), on_meta)
    assert decoded.device.type == "meta" and decoded.shape == (2, batch["input_ids"].shape[1] - 1, 32)
