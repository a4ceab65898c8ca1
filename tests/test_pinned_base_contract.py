"""The objectives' shared contract (retromae/objectives/base.py): rules its mutation run found unpinned. What
`heads_state_dict` saves (the heads, not the encoder body nor names tied to it) and how `load_heads` restores it
(and which names it reports missing / unused); the token tables an objective builds (sized to the model's
vocabulary, not saved); the registry; where `build_objective_config` says an error is (file and line); and the
same-document mask of contrastive losses with a process's offset into the global batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, BertForMaskedLM

from retromae.config import ConfigError
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives import base, build_objective_config, objective_class
from retromae.objectives.base import Objective, ObjectiveConfig, register, same_document_elsewhere
from retromae.pretrain import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models

# The tiny BERT's own MLM head (BertForMaskedLM.cls): its decoder matrix is the word embeddings (the body's) and its
# decoder bias is another name for `cls.predictions.bias`, so neither is a head of its own.
BERT_HEAD = ["encoder.cls.predictions.bias",
             "encoder.cls.predictions.transform.dense.weight", "encoder.cls.predictions.transform.dense.bias",
             "encoder.cls.predictions.transform.LayerNorm.weight", "encoder.cls.predictions.transform.LayerNorm.bias"]
TABLES = ("_special", "_continuation", "_replacement_ids")


class Probe(Objective):
    """An objective with one head of its own beside the encoder's MLM head (not registered: a test's)."""

    name = "pinned-probe"
    Config = ObjectiveConfig

    def __init__(self, encoder, tokenizer, config):
        super().__init__(encoder, tokenizer, config)
        self.projector = nn.Linear(4, 3)


def probe(tiny_model, seed: int = 0) -> Probe:
    cfg = ModelConfig(name_or_path=str(tiny_model), dropout=0.0)
    torch.manual_seed(seed)
    return Probe(load_masked_lm(cfg), load_tokenizer(cfg), ObjectiveConfig())


def test_heads_are_every_weight_but_the_body_and_tied_names(tiny_model):
    objective = probe(tiny_model)
    heads = objective.heads_state_dict()
    assert list(heads) == BERT_HEAD + ["projector.weight", "projector.bias"], "in state_dict order, nothing else"
    live = objective.state_dict()
    for k, v in heads.items():
        assert isinstance(v, torch.Tensor) and torch.equal(v, live[k]), k
    # the dropped names: the body's, the decoder matrix (= word embeddings), the decoder bias (= predictions.bias)
    assert "encoder.cls.predictions.decoder.weight" in live and "encoder.cls.predictions.decoder.bias" in live
    assert not [k for k in heads if k.startswith("encoder.bert.")]


def test_the_token_tables_are_not_saved(tiny_model):
    """The tables come from the tokenizer: neither a checkpoint nor the saved heads carry them."""
    objective = probe(tiny_model)
    assert all(name in dict(objective.named_buffers()) for name in TABLES)
    assert not [k for k in objective.state_dict() if k.split(".")[-1] in TABLES]
    assert not [k for k in objective.heads_state_dict() if k in TABLES]


def test_the_token_tables_cover_the_models_vocabulary(tiny_model, tiny_tokenizer):
    """A model whose vocabulary is padded past the tokenizer's (700 words + 4 unused rows = 704 logits): the tables
    are indexed by the model's token ids, so they have 704 entries; the 4 unused ids are not special and are never
    drawn as random replacements (those come from the tokenizer's 700)."""
    assert len(tiny_tokenizer) == 700
    config = AutoConfig.from_pretrained(str(tiny_model))
    config.vocab_size = 704
    objective = Probe(BertForMaskedLM(config), tiny_tokenizer, ObjectiveConfig())
    assert objective.tables.special.shape == (704,) and objective.tables.continuation.shape == (704,)
    assert not objective.tables.special[700:].any()
    assert int(objective.tables.replacement_ids.max()) < 700


def test_no_loss_weights_by_default(tiny_model):
    """Each named loss enters the total with weight loss_weights.get(name, 1.0): an objective that sets none has an
    empty mapping, so every loss weighs 1."""
    objective = probe(tiny_model)
    assert objective.loss_weights == {}
    assert objective.loss_weights.get("mlm", 1.0) == 1.0


def test_load_heads_round_trip(tiny_model):
    """Heads saved from one objective load into a fresh one: every head takes the saved value, nothing is reported
    missing or unused, and a body weight in the file is not a head (reported unused, the body left alone)."""
    trained, fresh = probe(tiny_model, seed=0), probe(tiny_model, seed=1)
    with torch.no_grad():
        for k, p in trained.named_parameters():
            if not k.startswith("encoder.bert."):
                p.add_(0.5)  # the heads "trained": unlike the fresh objective's (same encoder file, other seed)
    state = trained.heads_state_dict()
    assert not torch.equal(state["projector.weight"], fresh.state_dict()["projector.weight"])
    assert not torch.equal(state["encoder.cls.predictions.bias"], fresh.state_dict()["encoder.cls.predictions.bias"])
    word_embeddings = fresh.state_dict()["encoder.bert.embeddings.word_embeddings.weight"].clone()
    body_entry = {"encoder.bert.embeddings.word_embeddings.weight": torch.zeros_like(word_embeddings)}

    assert fresh.load_heads(state) == ([], [])
    assert fresh.load_heads({**state, **body_entry}) == ([], ["encoder.bert.embeddings.word_embeddings.weight"])
    live = fresh.state_dict()
    for k in BERT_HEAD + ["projector.weight", "projector.bias"]:
        assert torch.equal(live[k], state[k]), f"{k} was not loaded"
    assert torch.equal(live["encoder.cls.predictions.decoder.bias"], state["encoder.cls.predictions.bias"]), "tied"
    assert torch.equal(live["encoder.bert.embeddings.word_embeddings.weight"], word_embeddings), "the body untouched"


def test_load_heads_reports_missing_and_unused_names(tiny_model):
    """A file from another objective: the heads it lacks keep their own values and are listed (sorted), its
    entries this objective has no head for are listed (sorted) and ignored; the heads it has are loaded."""
    trained, fresh = probe(tiny_model, seed=0), probe(tiny_model, seed=1)
    before = {k: v.clone() for k, v in fresh.heads_state_dict().items()}
    state = {k: v + 1.0 for k, v in trained.heads_state_dict().items()}
    del state["projector.weight"], state["encoder.cls.predictions.bias"]
    state["old_decoder.weight"] = torch.ones(2, 2)
    state["decoder.bias"] = torch.ones(2)

    missing, unexpected = fresh.load_heads(state)
    assert missing == ["encoder.cls.predictions.bias", "projector.weight"]
    assert unexpected == ["decoder.bias", "old_decoder.weight"]
    live = fresh.state_dict()
    assert torch.equal(live["projector.weight"], before["projector.weight"]), "a missing head keeps its value"
    assert torch.equal(live["encoder.cls.predictions.bias"], before["encoder.cls.predictions.bias"])
    assert torch.equal(live["projector.bias"], state["projector.bias"]), "a saved head is loaded"
    assert not hasattr(fresh, "old_decoder") and not hasattr(fresh, "decoder")


def test_register_maps_a_name_to_its_class_once():
    class Once(Probe):
        name = "pinned-probe-registered"

    try:
        assert register(Once) is Once
        assert objective_class("pinned-probe-registered") is Once
        with pytest.raises(ValueError, match="registered twice"):
            register(Once)
        assert objective_class("pinned-probe-registered") is Once, "the first registration stands"
    finally:
        base._REGISTRY.pop("pinned-probe-registered", None)


@pytest.mark.parametrize("data", [None, {}])
def test_an_objective_section_without_a_name_is_retromae(data):
    config = build_objective_config(data)
    assert type(config) is objective_class("retromae").Config and config.name == "retromae"


def test_errors_without_a_source_name_the_config():
    with pytest.raises(ConfigError, match=r"^<config>: unknown key 'objective.mask_ration'"):
        build_objective_config({"name": "mlm", "mask_ration": 0.2})


@pytest.mark.parametrize("section, line, message", [
    # line 1 model:, 2 name_or_path, 3 objective:, 4 name, 5 the key at fault
    ("  name: mlm\n  mask_ration: 0.2\n", 5, "unknown key 'objective.mask_ration'"),
    ("  name: mlm\n  mask_ratio: lots\n", 5, "objective.mask_ratio"),
    ("  name: cocondenser\n  span_tokens: 0\n", 5, "objective.span_tokens must be >= 1"),  # validate(), key=
])
def test_errors_name_the_file_and_line_of_the_key(tmp_path, section, line, message):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name_or_path: some/model\nobjective:\n" + section)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value), str(err.value)


def test_same_document_elsewhere_with_a_process_offset():
    """Rank 1 of 3 holds global texts 2 and 3 (first_text=2), of documents 5 and 7; the global batch's documents
    are [7, 5 | 5, 7 | 9]. Text 2 (doc 5) shares its document with text 1 (and itself, left out); text 3 (doc 7)
    with text 0 (and itself)."""
    excluded = same_document_elsewhere({"doc": torch.tensor([5, 7])}, 2, torch.tensor([7, 5, 5, 7, 9]))
    assert excluded.tolist() == [[False, True, False, False, False],
                                 [True, False, False, False, False]]
    # rank 0 (first_text=0) of the same global batch: texts 0 (doc 7) and 1 (doc 5)
    excluded = same_document_elsewhere({"doc": torch.tensor([7, 5])}, 0, torch.tensor([7, 5, 5, 7, 9]))
    assert excluded.tolist() == [[False, False, False, True, False],
                                 [False, False, True, False, False]]


def test_same_document_elsewhere_is_none_without_documents():
    assert same_document_elsewhere({"input_ids": torch.zeros(2, 3)}, 0, torch.tensor([1, 2])) is None
    assert same_document_elsewhere({"doc": torch.tensor([1, 2])}, 0, None) is None


def test_same_document_elsewhere_stays_on_the_batchs_device():
    """Every tensor made on the documents' device: a host tensor mixed in would fail on a GPU. The meta device
    stands in for one on CPU (it refuses a CPU operand just as CUDA does)."""
    docs = torch.tensor([5, 7], device="meta")
    excluded = same_document_elsewhere({"doc": docs}, 2, torch.tensor([7, 5, 5, 7, 9], device="meta"))
    assert excluded.device.type == "meta" and excluded.shape == (2, 5) and excluded.dtype == torch.bool
