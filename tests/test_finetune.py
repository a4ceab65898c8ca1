"""Contrastive fine-tuning: the loss by hand, cross-device negatives, GradCache, mining, bad input, a real run."""

import json
import math

import numpy as np
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import free_port
from retromae.config import ConfigError
from retromae.data.corpus import CorpusError
from retromae.demo import docstring_corpus, split_first_sentence
from retromae.finetune.data import load_training_data, sample_group
from retromae.finetune.model import BiEncoder, LossConfig

PROBE = Path(__file__).resolve().parent / "helpers" / "finetune_probe.py"


@pytest.fixture(scope="module")
def tevatron_file(tmp_path_factory):
    """Docstring pairs in Tevatron's format: query = first sentence, positive = the rest, 3 negatives = others."""
    pairs = []
    for r in docstring_corpus(limit=600):
        first, rest = split_first_sentence(r["text"])
        if first and len(rest.split()) >= 6:
            pairs.append((first, rest))
    lines = []
    for i, (query, positive) in enumerate(pairs[:96]):
        negatives = [pairs[(i + k) % len(pairs)][1] for k in (7, 13, 29)]
        lines.append(json.dumps({"query_id": f"q{i}", "query": query,
                                 "positive_passages": [{"docid": f"d{i}", "title": "", "text": positive}],
                                 "negative_passages": [{"docid": f"n{i}{k}", "text": t} for k, t in enumerate(negatives)]}))
    path = tmp_path_factory.mktemp("ft") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class Fixed(torch.nn.Module):
    """A stand-in encoder whose 'hidden states' are given vectors, for checking the loss by hand."""

    def __init__(self, vectors):
        super().__init__()
        self.vectors = torch.nn.Parameter(torch.tensor(vectors))

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"last_hidden_state": self.vectors[input_ids[:, 0]][:, None, :]})


def test_infonce_equals_a_hand_computation():
    # 2 queries, group of 2 (positive, negative) each: 4 passages in the batch
    vectors = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.2], [0.1, 0.9], [0.5, 0.5], [0.3, -0.2]]
    bi = BiEncoder(Fixed(vectors), LossConfig(similarity="dot", temperature=0.5, cross_device_negatives=False))
    batch = {"query_input_ids": torch.tensor([[0], [1]]), "query_attention_mask": torch.ones(2, 1, dtype=torch.long),
             "passage_input_ids": torch.tensor([[2], [3], [4], [5]]), "passage_attention_mask": torch.ones(4, 1, dtype=torch.long),
             "passage_valid": torch.tensor([True, True, True, True])}
    loss = bi(batch)["contrastive"].item()
    q, p = vectors[:2], vectors[2:]
    expected = 0.0
    for i, target in ((0, 0), (1, 2)):  # query 1's positive is passage 2 (first of its group)
        logits = [sum(a * b for a, b in zip(q[i], pj)) / 0.5 for pj in p]
        expected += -logits[target] + math.log(sum(math.exp(x) for x in logits))
    assert loss == pytest.approx(expected, rel=1e-6)
    # a padded slot (a query without negatives) is masked out of every query's softmax
    batch["passage_valid"] = torch.tensor([True, False, True, True])
    logits0 = [sum(a * b for a, b in zip(q[0], pj)) / 0.5 for j, pj in enumerate(p) if j != 1]
    logits1 = [sum(a * b for a, b in zip(q[1], pj)) / 0.5 for j, pj in enumerate(p) if j != 1]
    expected = (-logits0[0] + math.log(sum(map(math.exp, logits0)))) + (-logits1[1] + math.log(sum(map(math.exp, logits1))))
    assert bi(batch)["contrastive"].item() == pytest.approx(expected, rel=1e-6)


def test_cross_device_targets_are_offset_by_the_passages_before_this_process(monkeypatch):
    """Process 1 of 2 sees process 0's 4 passages first in the gathered matrix: its query i's positive is column
    4 + 2 i (a group of 2), not 2 i. The gather is replaced by a fixed block so the loss can be written out."""
    import retromae.finetune.model as model_module

    vectors = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.2], [0.1, 0.9], [0.5, 0.5], [0.3, -0.2]]
    other = torch.tensor([[0.9, 0.1], [0.2, 0.7], [-0.4, 0.6], [0.7, 0.7]])  # process 0's passages
    monkeypatch.setattr(model_module, "world", lambda: (1, 2))
    monkeypatch.setattr(model_module, "gather_with_grad", lambda t: torch.cat([other, t]))
    monkeypatch.setattr(model_module, "gather", lambda t: torch.cat([torch.ones(4, dtype=t.dtype), t]))
    bi = BiEncoder(Fixed(vectors), LossConfig(similarity="dot", temperature=0.5, cross_device_negatives=True))
    batch = _batch([[0], [1]], [[2], [3], [4], [5]], [True, True, True, True])
    passages = other.tolist() + vectors[2:]
    expected = 0.0
    for i, target in ((0, 4), (1, 6)):
        logits = [sum(a * b for a, b in zip(vectors[i], p)) / 0.5 for p in passages]
        expected += -logits[target] + math.log(sum(math.exp(x) for x in logits))
    assert bi(batch)["contrastive"].item() == pytest.approx(expected, rel=1e-6)


def test_distillation_kl_equals_a_hand_computation():
    vectors = [[1.0, 0.0], [0.8, 0.2], [0.1, 0.9], [0.6, 0.4]]
    bi = BiEncoder(Fixed(vectors), LossConfig(temperature=1.0, cross_device_negatives=False, distill_weight=1.0))
    batch = {"query_input_ids": torch.tensor([[0]]), "query_attention_mask": torch.ones(1, 1, dtype=torch.long),
             "passage_input_ids": torch.tensor([[1], [2], [3]]), "passage_attention_mask": torch.ones(3, 1, dtype=torch.long),
             "passage_valid": torch.tensor([True, True, True]), "teacher_scores": torch.tensor([[3.0, -1.0, 1.0]])}
    student = [0.8, 0.1, 0.6]
    t = [math.exp(x) / sum(math.exp(y) for y in (3.0, -1.0, 1.0)) for x in (3.0, -1.0, 1.0)]
    s = [math.exp(x) / sum(math.exp(y) for y in student) for x in student]
    assert bi(batch)["distill"].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(t, s)), rel=1e-5)
    assert bi.num_items(batch)["distill"].item() == 1
    batch["teacher_scores"] = torch.tensor([[3.0, float("nan"), 1.0]])
    assert bi.num_items(batch)["distill"].item() == 0, "a group without complete teacher scores is left out"


def _batch(queries, passages, valid, teacher=None):
    batch = {"query_input_ids": torch.tensor(queries), "query_attention_mask": torch.ones(len(queries), 1, dtype=torch.long),
             "passage_input_ids": torch.tensor(passages),
             "passage_attention_mask": torch.ones(len(passages), 1, dtype=torch.long),
             "passage_valid": torch.tensor(valid)}
    if teacher is not None:
        batch["teacher_scores"] = torch.tensor(teacher)
    return batch


def _log_softmax(xs):
    top = max(xs)
    norm = top + math.log(sum(math.exp(x - top) for x in xs))
    return [x - norm for x in xs]


def test_distillation_with_a_temperature_an_invalid_passage_and_an_incomplete_row_by_hand():
    """KL(teacher || student) over each query's own group: teacher scores divided by distill_temperature (2), a
    padded passage left out of both distributions, a query with a missing teacher score left out of the sum."""
    vectors = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.1], [0.2, 0.9], [0.5, 0.5], [0.3, -0.2], [-0.4, 0.6],
               [0.9, 0.3], [0.1, 0.1], [0.7, -0.5], [0.4, 0.4]]
    bi = BiEncoder(Fixed(vectors), LossConfig(cross_device_negatives=False, distill_weight=1.0, distill_temperature=2.0))
    teacher = [[2.0, 0.0, -2.0], [1.0, 3.0, float("nan")], [float("nan"), 1.0, 0.5]]
    batch = _batch([[0], [1], [2]], [[3], [4], [5], [6], [7], [8], [9], [10], [11]],
                   [True, True, True, True, True, False, True, True, True], teacher)
    dot = lambda a, b: sum(x * y for x, y in zip(vectors[a], vectors[b]))  # noqa: E731

    def kl(t_scores, s_scores):
        t, s = _log_softmax([x / 2.0 for x in t_scores]), _log_softmax(s_scores)
        return sum(math.exp(a) * (a - b) for a, b in zip(t, s))

    expected = kl([2.0, 0.0, -2.0], [dot(0, 3), dot(0, 4), dot(0, 5)]) + kl([1.0, 3.0], [dot(1, 6), dot(1, 7)])
    assert bi(batch)["distill"].item() == pytest.approx(expected, rel=1e-5)
    assert bi.num_items(batch)["distill"].item() == 2


def test_margin_mse_over_pairs_with_teacher_scores_by_hand():
    """MarginMSE: ((s+ - s-) - (t+ - t-))^2 over each (positive, negative) pair whose two passages are there and
    scored by the teacher; its gradient stays finite beside a padded passage (a score of -inf)."""
    vectors = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.1], [0.2, 0.9], [0.5, 0.5], [0.3, -0.2], [-0.4, 0.6]]
    bi = BiEncoder(Fixed(vectors), LossConfig(cross_device_negatives=False, distill_weight=1.0,
                                              distill_loss="margin_mse"))
    teacher = [[3.0, 1.0, 0.0], [2.0, float("nan"), 5.0]]
    batch = _batch([[0], [1]], [[2], [3], [4], [5], [6], [7]], [True, True, True, True, True, False], teacher)
    dot = lambda a, b: sum(x * y for x, y in zip(vectors[a], vectors[b]))  # noqa: E731
    # query 0: pairs (2, 3) and (2, 4); query 1: passage 6 has no teacher score, passage 7 is padding: no pair
    expected = ((dot(0, 2) - dot(0, 3)) - (3.0 - 1.0)) ** 2 + ((dot(0, 2) - dot(0, 4)) - (3.0 - 0.0)) ** 2
    loss = bi(batch)["distill"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(bi.encoder.vectors.grad).all()


class FixedTokens(torch.nn.Module):
    """A stand-in encoder whose hidden state at each position is the given vector of that position's token id."""

    def __init__(self, vectors, dtype=torch.float32):
        super().__init__()
        self.vectors = torch.nn.Parameter(torch.tensor(vectors, dtype=dtype))

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"last_hidden_state": self.vectors[input_ids]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_over_mean_pooled_vectors_by_hand(dtype):
    """pooling mean over the attended positions, similarity cosine, temperature 0.05; bf16 hidden states are pooled
    and normalised in fp32 (the values below are exact in bf16, so the hand computation in float64 holds)."""
    vectors = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.75, -0.25], [-0.5, 1.0], [9.0, 9.0]]
    bi = BiEncoder(FixedTokens(vectors, dtype), LossConfig(similarity="cosine", pooling="mean", temperature=0.05,
                                                           cross_device_negatives=False))
    batch = {"query_input_ids": torch.tensor([[0, 1, 5], [2, 5, 5]]),
             "query_attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
             "passage_input_ids": torch.tensor([[3, 4, 5], [0, 5, 5]]),
             "passage_attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
             "passage_valid": torch.tensor([True, True])}

    def mean_unit(ids):
        v = [sum(vectors[i][d] for i in ids) / len(ids) for d in range(2)]
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    q = [mean_unit([0, 1]), mean_unit([2])]
    p = [mean_unit([3, 4]), mean_unit([0])]  # token 5 (padding) must not count
    expected = 0.0
    for i in range(2):
        logits = [sum(a * b for a, b in zip(q[i], pj)) / 0.05 for pj in p]
        expected += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    assert bi(batch)["contrastive"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("chunk", [1, 2])
def test_grad_cache_in_process_equals_the_same_chunks_without_it(tiny_model, tiny_tokenizer, chunk):
    """GradCache (`grad_cache_chunk`) with dropout on: its vectors and gradients are those of encoding the same
    chunks in turn without it, dropout masks included (each chunk's re-run in the backward pass restores its RNG
    state). The 2-process test compares it with the uncached loss without dropout; this one runs in the process."""
    from transformers import AutoModel

    from retromae.modeling import ModelConfig, load_pretrained

    encoder = load_pretrained(AutoModel, ModelConfig(name_or_path=str(tiny_model), dropout=0.3)).train()
    texts = ["open a file", "close the stream now", "read bytes", "a socket", "flush and close it"]
    enc = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    weights = torch.randn(5, encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def run(grad_cache: bool):
        bi = BiEncoder(encoder, LossConfig(grad_cache_chunk=chunk if grad_cache else 0, cross_device_negatives=False))
        encoder.zero_grad()
        torch.manual_seed(7)
        if grad_cache:
            vectors = bi.embed(encoder, enc["input_ids"], enc["attention_mask"])
        else:
            vectors = torch.cat([bi._embed(encoder, enc["input_ids"][i : i + chunk], enc["attention_mask"][i : i + chunk])
                                 for i in range(0, 5, chunk)])
        (vectors * weights).sum().backward()
        return vectors.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    cached, cached_grads = run(True)
    plain, plain_grads = run(False)
    assert cached.shape == (5, encoder.config.hidden_size) and torch.allclose(cached, plain, atol=1e-6)
    assert cached_grads.keys() == plain_grads.keys() and len(plain_grads) > 5
    for name in plain_grads:
        assert torch.allclose(cached_grads[name], plain_grads[name], atol=1e-5), name
    with torch.no_grad():  # without gradients nothing is cached: the whole batch in one pass
        torch.manual_seed(7)
        whole = BiEncoder(encoder, LossConfig(grad_cache_chunk=chunk)).embed(encoder, enc["input_ids"],
                                                                            enc["attention_mask"])
        torch.manual_seed(7)
        assert torch.equal(whole, BiEncoder(encoder, LossConfig())._embed(encoder, enc["input_ids"],
                                                                          enc["attention_mask"]))


@pytest.mark.parametrize("settings, refused", [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"representation": "dupmae", "similarity": "cosine"}, "scores by dot product"),
    ({"representation": "splade", "similarity": "cosine"}, "scores by dot product"),
    ({"representation": "splade", "shared_encoder": False}, "one encoder for queries and documents"),
    ({"flops_query_weight": -0.1}, "must be >= 0"),
    ({"flops_warmup_steps": -1}, "must be >= 0"),
    ({"starbucks_pairs": [[1]]}, "is not a \\[layer, dim\\]"),
    ({"starbucks_pairs": [[0, 8]]}, "is not a \\[layer, dim\\]"),
])
def test_loss_settings_that_cannot_work_are_refused(settings, refused):
    with pytest.raises(ConfigError, match=refused):
        LossConfig(**settings).validate()


def test_loss_settings_at_their_edges_are_accepted():
    LossConfig(flops_query_weight=0.0, flops_doc_weight=0.0, flops_warmup_steps=0, representation="splade").validate()
    LossConfig(temperature=0.01, similarity="cosine").validate()


def test_separate_towers_encode_queries_with_the_query_encoder():
    passages_tower = Fixed([[1.0, 0.0], [0.0, 1.0]])
    queries_tower = Fixed([[0.5, 0.5], [2.0, -1.0]])
    with pytest.raises(ValueError, match="needs a query encoder"):
        BiEncoder(passages_tower, LossConfig(shared_encoder=False))
    bi = BiEncoder(passages_tower, LossConfig(shared_encoder=False), query_encoder=queries_tower)
    batch = _batch([[1]], [[0]], [True])
    assert bi.encode_queries(batch).tolist() == [[2.0, -1.0]] and bi.encode_passages(batch).tolist() == [[1.0, 0.0]]
    shared = BiEncoder(passages_tower, LossConfig(), query_encoder=queries_tower)
    assert shared.encode_queries(batch).tolist() == [[0.0, 1.0]], "a shared encoder ignores a second tower"


def test_a_padded_batch_embeds_each_text_as_alone(tiny_model, tiny_tokenizer):
    from transformers import AutoModel

    from retromae.modeling import ModelConfig, load_pretrained

    encoder = load_pretrained(AutoModel, ModelConfig(name_or_path=str(tiny_model), dropout=0.0)).eval()
    bi = BiEncoder(encoder, LossConfig(pooling="mean"))
    texts = ["open", "close the stream of bytes now and then"]
    enc = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        batch = bi.embed(encoder, enc["input_ids"], enc["attention_mask"])
        for i, text in enumerate(texts):
            alone = tiny_tokenizer([text], return_tensors="pt")
            assert torch.allclose(batch[i], bi.embed(encoder, alone["input_ids"], alone["attention_mask"])[0],
                                  atol=1e-5), text


def test_group_sampling():
    import random

    import numpy as np

    positives, negatives = np.array([1, 2]), np.array([10, 11, 12, 13])
    chosen = sample_group(positives, negatives, 4, random.Random(0))
    assert chosen[0] in positives and len(set(chosen[1:])) == 3 and set(chosen[1:]) <= set(negatives)
    assert sample_group(np.array([5]), np.array([], int), 4, random.Random(0)) == [5], "no negatives: in-batch only"
    assert len(sample_group(np.array([5]), np.array([7]), 4, random.Random(0))) == 4


def launch(args, processes, tmp_path, port):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(PROBE), *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), str(PROBE), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.slow
def test_cross_device_negatives_two_processes_equal_one(tiny_model, tevatron_file, tmp_path):
    # float64: the check is then exact to 1e-12 (see the probe's docstring for why float32 is not enough here)
    launch([str(tiny_model), str(tevatron_file), str(tmp_path / "one"), "8", "0", "float64"], 1, tmp_path, 0)
    launch([str(tiny_model), str(tevatron_file), str(tmp_path / "two"), "4", "0", "float64"], 2, tmp_path, free_port())
    one = json.loads((tmp_path / "one" / "record.json").read_text())
    two = json.loads((tmp_path / "two" / "record.json").read_text())
    assert (one["num_processes"], two["num_processes"], one["queries"], two["queries"]) == (1, 2, 8, 8)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-12)
    g1 = safetensors.torch.load_file(str(tmp_path / "one" / "grads.safetensors"))
    g2 = safetensors.torch.load_file(str(tmp_path / "two" / "grads.safetensors"))
    assert g1.keys() == g2.keys() and len(g1) > 10
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-12, rtol=1e-9), f"{k}: {(g1[k] - g2[k]).abs().max()}"
    # and the other process's passages really are in the loss: without them it would be lower
    assert one["loss"] > 0


def test_grad_cache_gradients_equal_uncached(tiny_model, tevatron_file, tmp_path):
    for chunk, name in ((0, "plain"), (5, "cached")):
        launch([str(tiny_model), str(tevatron_file), str(tmp_path / name), "8", str(chunk), "float64"], 1, tmp_path, 0)
    plain = json.loads((tmp_path / "plain" / "record.json").read_text())
    cached = json.loads((tmp_path / "cached" / "record.json").read_text())
    assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-12)
    g1 = safetensors.torch.load_file(str(tmp_path / "plain" / "grads.safetensors"))
    g2 = safetensors.torch.load_file(str(tmp_path / "cached" / "grads.safetensors"))
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-12, rtol=1e-9), k


def test_mining_never_returns_a_positive(tiny_model, beir_task, tmp_path):
    from retromae.finetune.mine import MineConfig, mine_negatives
    from retromae.retrieval.encoder import EncodeConfig

    # give some queries several positives, so that dropping them is exercised
    qrels = (beir_task / "qrels" / "train.tsv").read_text().splitlines()
    extra = [f"q{i}\tdoc{i + 1}\t1" for i in range(0, 40, 2)]
    folder = tmp_path / "multi"
    import shutil

    shutil.copytree(beir_task, folder)
    (folder / "qrels" / "train.tsv").write_text("\n".join(qrels + extra) + "\n")
    out = tmp_path / "mined.jsonl"
    summary = mine_negatives(str(tiny_model), str(folder), str(out), "train",
                             EncodeConfig(passage_max_len=48, precision="no"), MineConfig(depth=20, skip_top=2))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    data = load_training_data(str(folder), "beir", "train")
    assert len(rows) == len(data) == summary["queries"], "every training query is mined"
    for row in rows:
        assert row["negative_ids"] and not set(row["negative_ids"]) & set(row["positive_ids"])
        assert len(row["negative_ids"]) == 20
    # the mined file trains as is, against the folder's corpus
    mined = load_training_data(str(out), "auto", corpus=str(folder))
    assert len(mined) == len(rows) and len(mined.negatives.row(0)) == 20


@pytest.mark.parametrize("line, message", [
    ('{"query_id": "q1", "query": "a question", "positive_ids": []}', r"mined\.jsonl:2: query 'q1' has no positive"),
    ('{"query_id": "q1", "query": "a question", "positive_ids": ["nope"]}', r"mined\.jsonl:2: passage id 'nope'"),
    ('{"query_id": "q1", "query": "  ", "positive_ids": ["doc0"]}', r"mined\.jsonl:2: the query is empty"),
    ('{"query_id": "q1", "positive_ids": ["doc0"]}', r"mined\.jsonl:2: no 'query' field"),
])
def test_bad_training_lines_are_named(beir_task, tmp_path, line, message):
    path = tmp_path / "mined.jsonl"
    path.write_text('{"query_id": "q0", "query": "fine", "positive_ids": ["doc0"], "negative_ids": ["doc1"]}\n'
                    + line + "\n")
    with pytest.raises(CorpusError, match=message):
        load_training_data(str(path), "mined", corpus=str(beir_task))


def test_bad_tevatron_line_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"query_id": "1", "query": "q", "positive_passages": [{"text": "p"}]}\n'
                    '{"query_id": "2", "query": "q", "positive_passages": []}\n')
    with pytest.raises(CorpusError, match=r"t\.jsonl:2: query '2' has no positive passage"):
        load_training_data(str(path))


def test_finetune_run_learns_and_exports(tiny_model, beir_task, tmp_path):
    from sentence_transformers import SentenceTransformer

    from retromae.finetune.run import load_finetune_config, run

    overrides = {
        "model.name_or_path": str(tiny_model), "data.train": str(beir_task), "data.group_size": 1,
        "data.query_max_len": 24, "data.passage_max_len": 48, "loss.similarity": "cosine",
        "loss.temperature": 0.05, "loss.pooling": "mean", "train.per_device_batch_size": 16, "train.max_steps": 30,
        "train.lr": 1e-3, "train.report_to": "none", "train.cpu": True, "train.mixed_precision": "no",
        "train.logging_steps": 5, "train.output_dir": str(tmp_path / "out"), "dev.dataset": str(beir_task),
        "dev.every_steps": 10,
    }
    cfg = load_finetune_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    result = run(cfg)
    history = result["history"]
    assert history[-1]["loss/contrastive"] < history[0]["loss/contrastive"] - 0.3
    dev = result["dev"]
    assert [h["step"] for h in dev["history"]] == [10, 20, 30]
    assert dev["best"] == max(h["ndcg@10"] for h in dev["history"])
    st = SentenceTransformer(result["model_dir"], device="cpu")
    vectors = st.encode(["open a file", "close the stream"])
    assert abs(float((vectors[0] ** 2).sum()) - 1) < 1e-5, "cosine training exports a normalising model"
    # the exported (best) model scores on dev, under evaluate's defaults (the model's own settings), what the
    # selector measured
    from retromae.retrieval.encoder import EncodeConfig
    from retromae.retrieval.evaluate import SearchConfig, evaluate_model

    again = evaluate_model(result["model_dir"], str(beir_task), "dev", EncodeConfig(precision="no"),
                           SearchConfig(metrics=["ndcg@10"]))
    assert again["settings"]["passage_max_len"] == again["settings"]["query_max_len"] == 48
    assert again["ndcg@10"] == pytest.approx(dev["best"], abs=1e-4)


def test_hugging_face_dataset_and_teacher_scores(tmp_path, tevatron_file):
    from retromae.finetune.data import read_teacher_scores

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "train.jsonl").write_text(tevatron_file.read_text())
    data = load_training_data(str(folder), "hf", "train")
    assert len(data) == 96 and len(data.negatives.row(0)) == 3
    scores = tmp_path / "teacher.tsv"
    scores.write_text("q1\td1\t3.5\nq1\td2\t-1\n")
    teacher = read_teacher_scores(str(scores))
    found = teacher.lookup(["q1", "q1", "q2"], ["d1", "d2", "d1"])
    assert found[:2].tolist() == [3.5, -1.0] and np.isnan(found[2])
    scores.write_text("q1\td1\t3.5\nq1\td2\n")
    with pytest.raises(CorpusError, match=r"teacher\.tsv:2: expected"):
        read_teacher_scores(str(scores))


def test_dupmae_representation_fine_tunes_exports_and_evaluates(tiny_model, beir_task, tmp_path):
    from retromae.finetune.run import load_finetune_config, run
    from retromae.retrieval.encoder import EncodeConfig
    from retromae.retrieval.evaluate import SearchConfig, evaluate_model

    overrides = {
        "model.name_or_path": str(tiny_model), "data.train": str(beir_task), "data.group_size": 1,
        "data.query_max_len": 24, "data.passage_max_len": 48, "loss.representation": "dupmae",
        "loss.dupmae_dense_dim": 16, "loss.dupmae_topk": 32, "train.per_device_batch_size": 16, "train.max_steps": 20,
        "train.lr": 1e-3, "train.report_to": "none", "train.cpu": True, "train.mixed_precision": "no",
        "train.logging_steps": 5, "train.output_dir": str(tmp_path / "out"), "dev.dataset": str(beir_task),
        "dev.every_steps": 10,
    }
    result = run(load_finetune_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    model = Path(result["model_dir"])
    assert (model / "dupmae" / "dupmae.safetensors").is_file() and (model / "model.safetensors").is_file()
    cfg = EncodeConfig(precision="no")  # the model's own settings
    exact = evaluate_model(str(model), str(beir_task), "dev", cfg, SearchConfig(metrics=["ndcg@10"],
                                                                               representation="dupmae"))
    assert exact["ndcg@10"] == pytest.approx(result["dev"]["best"], abs=1e-4), "the export scores what dev measured"
    pooled = evaluate_model(str(model), str(beir_task), "dev", cfg, SearchConfig(
        metrics=["ndcg@10"], representation="dupmae", hybrid_search="pooled", candidate_pool=10_000))
    assert pooled["ndcg@10"] == pytest.approx(exact["ndcg@10"], abs=1e-9), "a pool of the whole corpus is exact"
