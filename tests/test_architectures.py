"""Every encoder family through the one adapter (`retromae.architectures`): its view of a model equals the model's own
computation, masks of our making reach every family's layers, decoders take the encoder's shape, attention is chosen
per family, long texts go through RetroMAE's decoder in bounded blocks, and every objective pretrains every family
(the matrix of `retromae.matrix`), whose exports sentence-transformers loads and `retromae evaluate` encodes alike;
fine-tuning and evaluation run on every family too."""

import json

import pytest
import torch

from retromae.architectures import encoder_of
from retromae.matrix import OBJECTIVES, corpus_texts, run_cell, tiny_family_model, write_corpus
from retromae.tiny import FAMILIES


@pytest.fixture(scope="session")
def matrix_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="session")
def matrix_texts():
    return corpus_texts()


@pytest.fixture(scope="session")
def matrix_corpus(matrix_root, matrix_texts):
    return write_corpus(matrix_root / "corpus.jsonl", matrix_texts)


def family_model(root, family, texts):
    return tiny_family_model(root / family / "model", family, texts)


def load(root, family, texts):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = family_model(root, family, texts)
    return AutoModelForMaskedLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_sees_what_the_model_computes(matrix_root, matrix_texts, family):
    """embed() is what the first layer reads; run_layer() with a padding visibility of our making is each layer's own
    output; the head is the model's MLM logits; layer_states ends with the model's output."""
    model, tokenizer = load(matrix_root, family, matrix_texts)
    arch = encoder_of(model)
    batch = tokenizer(matrix_texts[:3], truncation=True, max_length=40, padding=True, return_tensors="pt")
    ids, attention = batch["input_ids"], batch["attention_mask"]
    inputs, outputs = [], []

    def record(module, args, kwargs, out):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        outputs.append(out[0] if isinstance(out, tuple) else out)

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in arch.layers]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
        for hook in hooks:
            hook.remove()
        assert len(inputs) == arch.num_layers == model.config.num_hidden_layers
        torch.testing.assert_close(arch.embed(ids), inputs[0])
        visible = attention.bool()[:, None, :].expand(-1, ids.shape[1], -1)
        real = attention.bool()
        for layer, x, y in zip(arch.layers, inputs, outputs):
            torch.testing.assert_close(arch.run_layer(layer, x, visible)[real], y[real], atol=1e-5, rtol=1e-5)
        last = arch.forward(ids, attention)
        torch.testing.assert_close(arch.head(last)[real], logits[real], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(arch.head.projection(arch.head.transform(last)), arch.head(last))
        states = arch.layer_states(ids, attention)
        assert len(states) == arch.num_layers + 1
        torch.testing.assert_close(states[-1], last)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_knows_which_bodies_take_token_types(matrix_root, matrix_texts, family):
    import inspect

    model, _ = load(matrix_root, family, matrix_texts)
    arch = encoder_of(model)
    assert arch.token_types == ("token_type_ids" in inspect.signature(arch.body.forward).parameters), family


def test_a_head_that_multiplies_by_the_embeddings_itself_is_split_too():
    """DeBERTa's non-legacy head (lm_predictions) has no decoder matrix of its own: transform + tied projection."""
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    model = DebertaV2ForMaskedLM(DebertaV2Config(vocab_size=90, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=64, legacy=False)).eval()
    torch.nn.init.normal_(model.lm_predictions.lm_head.bias)
    arch = encoder_of(model)
    ids = torch.randint(5, 90, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(arch.head(arch.forward(ids, torch.ones_like(ids))), logits)
    assert arch.head.vocab_size == 90 and arch.head.projection.weight is model.deberta.embeddings.word_embeddings.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_a_causal_mask_of_ours_reaches_every_family_layer(matrix_root, matrix_texts, family):
    """Row i of a layer run with a causal visibility moves when token j <= i changes and never when j > i; in a
    sliding-window layer (ModernBERT) rows further than the window from j do not move either."""
    model, tokenizer = load(matrix_root, family, matrix_texts)
    arch = encoder_of(model)
    ids = tokenizer(matrix_texts[7], truncation=True, max_length=40, return_tensors="pt")["input_ids"]
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None]
    j = 5
    changed = ids.clone()
    changed[0, j] = (changed[0, j] + 11) % len(tokenizer)
    model.double()
    with torch.no_grad():
        for layer in arch.layers:
            before = arch.run_layer(layer, arch.embed(ids).double(), causal)[0]
            after = arch.run_layer(layer, arch.embed(changed).double(), causal)[0]
            moved = ((after - before).abs().amax(-1) > 1e-9).nonzero().flatten().tolist()
            rows = range(j, length)
            if getattr(layer, "attention_type", "") == "sliding_attention":
                rows = range(j, min(length, j + model.config.sliding_window + 1))
            assert moved == list(rows), (family, moved)


def test_decoders_take_the_encoder_shape(matrix_root, matrix_texts):
    """BERT: post-LN, plain feed-forward, positions from its table; ModernBERT: pre-norm, gated, rotary with its global
    base, a final norm; EuroBERT: RMSNorm; DeBERTa-v3 (relative attention): rotary with base 10,000."""
    from retromae.objectives.retromae import RetroMAE, RetroMAEConfig

    expected = {"bert": (False, False, None, torch.nn.LayerNorm), "modernbert": (True, True, 160000.0, torch.nn.LayerNorm),
                "eurobert": (True, True, 10000.0, torch.nn.RMSNorm), "deberta-v3": (False, False, 10000.0, torch.nn.LayerNorm)}
    for family, (prenorm, glu, theta, norm) in expected.items():
        model, tokenizer = load(matrix_root, family, matrix_texts)
        objective = RetroMAE(model, tokenizer, RetroMAEConfig())
        spec = objective.arch.decoder_spec()
        assert (spec.prenorm, spec.glu, spec.rotary_theta) == (prenorm, glu, theta), family
        assert isinstance(objective.decoder.attention_norm, norm), family
        assert hasattr(objective, "decoder_norm") == prenorm, "a pre-norm decoder closes with a final norm"
        width = objective.decoder.ffn.intermediate.out_features
        assert width == spec.intermediate * (2 if glu else 1)


def test_attention_is_chosen_per_family(matrix_root, matrix_texts):
    """sdpa where the family's transformers class has it, eager for DeBERTa and MPNet, and a one-line refusal when
    sdpa is asked of a family without it."""
    from retromae.config import ConfigError
    from retromae.modeling import ModelConfig, load_masked_lm

    for family, implementation in (("bert", "sdpa"), ("modernbert", "sdpa"), ("deberta-v3", "eager"),
                                   ("mpnet", "eager")):
        model = load_masked_lm(ModelConfig(str(family_model(matrix_root, family, matrix_texts))))
        assert model.config._attn_implementation == implementation, family
    with pytest.raises(ConfigError, match="model.attn_implementation=sdpa: DebertaV2ForMaskedLM has no sdpa"):
        load_masked_lm(ModelConfig(str(family_model(matrix_root, "deberta-v3", matrix_texts)),
                                   attn_implementation="sdpa"))


def test_a_kernel_that_only_knows_padding_is_swapped_for_the_objectives_own_masks(matrix_root, matrix_texts):
    """A ModernBERT loaded with an attention kernel that, like flash attention, takes padding and nothing else: its
    encoder passes use that kernel, TSDAE's causal decoder and Starbucks' decoder (the encoder's own layers run with
    masks of ours) run through sdpa, and the losses are those of the model loaded with sdpa."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
    from retromae.objectives import build_objective_config, objective_class

    calls = []

    def padding_only(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
            rows = attention_mask[..., : attention_mask.shape[-1], :]
            if not torch.equal(rows, rows[..., :1, :].expand_as(rows)) and module.sliding_window is None:
                raise AssertionError("the padding-only kernel was given a mask that is not padding")
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("padding_only", padding_only)
    ALL_MASK_ATTENTION_FUNCTIONS.register("padding_only", sdpa_mask)
    path = str(family_model(matrix_root, "modernbert", matrix_texts))
    tokenizer = load_tokenizer(ModelConfig(path))
    batch = tokenizer(matrix_texts[:4], truncation=True, max_length=40, padding=True, return_tensors="pt")
    for settings in ({"name": "tsdae"}, {"name": "starbucks", "pairs": [[1, 16], [2, 32]]}):
        losses = {}
        for implementation in ("sdpa", "padding_only"):
            torch.manual_seed(0)
            model = load_masked_lm(ModelConfig(path, attn_implementation=implementation, dropout=0.0))
            objective = objective_class(settings["name"])(model, tokenizer, build_objective_config(settings))
            prepared = objective.prepare({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                          "seeds": torch.arange(4)})
            calls.clear()
            losses[implementation] = objective(prepared)
            if implementation == "padding_only":
                assert calls, "the encoder's own passes used the padding-only kernel"
                assert model.config._attn_implementation == "padding_only", "and keep it after the decoder's calls"
        for name in losses["sdpa"]:
            torch.testing.assert_close(losses["padding_only"][name], losses["sdpa"][name])


def test_an_unknown_family_is_refused_before_any_weight_loads(tmp_path):
    """A model whose type no adapter knows (here a GPT-2 config with no weights at all) stops pretraining in one
    line at the preflight, naming the known families."""
    from transformers import GPT2Config

    from retromae.config import ConfigError
    from retromae.pretrain import load_config, preflight

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    corpus = tmp_path / "c.txt"
    corpus.write_text("a text\n")
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'gpt2'}", f"data.corpus=[{corpus}]"])
    with pytest.raises(ConfigError, match=r"model type 'gpt2' is not an encoder family this toolkit knows \(bert, "
                                          r".*modernbert"):
        preflight(cfg)


@pytest.mark.parametrize("family", ["bert", "modernbert", "deberta-v3"])
def test_enhanced_decoding_in_row_blocks_equals_one_block(matrix_root, matrix_texts, family, monkeypatch):
    """A long text's decoder rows go through the decoder a block at a time (each block's mask, attention and logits
    built, dropped and recomputed in the backward pass): the same loss and gradients as all rows at once."""
    from retromae.objectives import retromae as module
    from retromae.objectives.retromae import RetroMAE, RetroMAEConfig

    model, tokenizer = load(matrix_root, family, matrix_texts)
    objective = RetroMAE(model, tokenizer, RetroMAEConfig()).eval()  # no dropout: its draws depend on block shapes
    batch = tokenizer(matrix_texts[:4], truncation=True, max_length=48, padding=True, return_tensors="pt")
    prepared = objective.prepare({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                  "seeds": torch.arange(4)})
    results = []
    for budget in (module.ATTENTION_BUDGET, 4 * batch["input_ids"].numel() * 2):  # one block | blocks of 4 rows
        monkeypatch.setattr(module, "ATTENTION_BUDGET", budget)
        objective.zero_grad()
        loss = objective(prepared)["decoder"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}))
    assert len(objective.row_blocks(prepared)) == batch["input_ids"].shape[1] // 4 + (batch["input_ids"].shape[1] % 4 > 0)
    (whole, whole_grads), (blocked, blocked_grads) = results
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-4)
    assert whole_grads.keys() == blocked_grads.keys() and any(n.startswith("decoder.") for n in whole_grads)
    for name in whole_grads:
        torch.testing.assert_close(blocked_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6)
    visible = objective.visibility(prepared)
    rows = torch.arange(8, 20)
    assert torch.equal(objective.visibility(prepared, rows), visible[:, rows]), "a block is that part of the whole"


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_objective_pretrains_every_family(matrix_root, matrix_texts, matrix_corpus, family, objective):
    """A matrix cell: 2 steps of `retromae pretrain`, the export loaded by AutoModel and SentenceTransformer, and
    `retromae evaluate`'s encoder equal to sentence-transformers' encode_query / encode_document."""
    cell = run_cell(family, objective, matrix_root, matrix_corpus, matrix_texts)
    assert cell.status == "ok", cell.detail


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_fine_tunes_and_evaluates(matrix_root, matrix_texts, beir_task, family, tmp_path):
    """Contrastive fine-tuning of the family's model (CLS, dot) for a few steps, its export scored by `evaluate` on
    a BEIR folder, and encoded as sentence-transformers encodes it."""
    from retromae.finetune.run import load_finetune_config, run
    from retromae.matrix import encodings_agree
    from retromae.retrieval.encoder import EncodeConfig
    from retromae.retrieval.evaluate import SearchConfig, evaluate_model

    overrides = {
        "model.name_or_path": str(family_model(matrix_root, family, matrix_texts)), "data.train": str(beir_task),
        "data.group_size": 2, "data.query_max_len": 24, "data.passage_max_len": 48, "train.per_device_batch_size": 8,
        "train.max_steps": 3, "train.lr": 1e-3, "train.report_to": "none", "train.cpu": True,
        "train.mixed_precision": "no", "train.logging_steps": 1, "train.output_dir": str(tmp_path / "out"),
    }
    result = run(load_finetune_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
    assert len(result["history"]) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    scores = evaluate_model(result["model_dir"], str(beir_task), "test", EncodeConfig(precision="no"),
                            SearchConfig(metrics=["ndcg@10", "recall@100"]))
    assert 0.0 < scores["recall@100"] <= 1.0 and 0.0 <= scores["ndcg@10"] <= 1.0
    assert encodings_agree(result["model_dir"], matrix_texts[:4]) is None


def test_a_tokenizer_that_puts_nothing_at_position_zero_is_refused_before_the_data(matrix_root, matrix_texts,
                                                                                  matrix_corpus, tmp_path):
    """The objectives read a text's vector at position 0: a tokenizer that adds no [CLS] / <s> / BOS stops the run in
    one line, before the example cache is built."""
    import shutil

    from retromae.masking import TokenizerError
    from retromae.matrix import cell_config
    from retromae.pretrain import run

    model = tmp_path / "no_start"
    shutil.copytree(family_model(matrix_root, "modernbert", matrix_texts), model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (model / "tokenizer.json").write_text(json.dumps(spec))
    cfg = cell_config(model, matrix_corpus, tmp_path / "run", "retromae")
    with pytest.raises(TokenizerError, match="puts no special token before a text"):
        run(cfg)
    assert not (tmp_path / "cache").exists(), "refused before the data was prepared"
