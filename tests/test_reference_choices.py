"""Where our default differs from the authors' code, the authors' behaviour is a named option: CoT-MAE's
`span_cut: reference`, coCondenser's `span_source: document_spans`, SEED's `decoder_positions: own` and
`decoder_projection: tied`. Each is checked here on a tiny input against what the authors' code does, computed by
hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_more_objectives import batch_of, document_batch, make
from retromae.config import ConfigError
from retromae.rng import example_seeds


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----- SEED-Encoder: the decoder's own positions and a plain tied projection ---------------------------------


def test_seed_reference_decoder_has_its_own_positions_and_a_plain_tied_projection(tiny_model, docstrings):
    """Decoder input = word embedding of each token + row t of a position table of the decoder's own (not the
    encoder's embedding layer: no encoder positions, no embedding norm); decoder loss = sum of CE(states @ W_e^T)
    over the next tokens: no MLM transform, no bias (the head's bias is set non-zero here so that using it shows)."""
    objective, tokenizer = make(tiny_model, "seed", decoder_positions="own", decoder_projection="tied")
    bert = objective.encoder
    with torch.no_grad():
        bert.cls.predictions.bias.normal_()  # the MLM head's bias, zero at initialisation
        bert.bert.embeddings.position_embeddings.weight.normal_()  # the encoder's positions: must not reach the decoder
    table = objective.position_table
    assert table is not None and table.weight.shape == (bert.config.max_position_embeddings, bert.config.hidden_size)
    assert all(table.weight is not p for p in bert.parameters()), "a table of the decoder's own"
    batch = objective.prepare(batch_of(tokenizer, [d["text"] for d in docstrings[:3]], max_len=20))
    seen = []
    hook = objective.decoder.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        h = bert.bert(input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        decoded = objective.decode(h[:, 0], batch)
        losses = objective(batch)
    hook.remove()
    shifted = batch["input_ids"][:, :-1]
    words = bert.bert.embeddings.word_embeddings.weight
    expected_input = words[shifted] + table.weight[: shifted.shape[1]][None]
    torch.testing.assert_close(seen[0], expected_input)
    targets = batch["decoder_targets"]
    logits = decoded[targets].double() @ words.double().T
    expected = F.cross_entropy(logits, batch["input_ids"][:, 1:][targets], reduction="sum").item()
    assert losses["decoder"].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="decoder_projection='plain' is not one of"):
        make(tiny_model, "seed", decoder_projection="plain")
