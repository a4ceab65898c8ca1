"""Learned sparse retrieval: SPLADE vectors, FLOPS, MarginMSE and fusion by hand; the exact sparse search against
brute force; Seismic against exact; cross-device gathering and GradCache with vocabulary-sized vectors; a SPLADE
fine-tune whose export SparseEncoder encodes and scores exactly as `retromae evaluate --representation splade`."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from conftest import free_port
from retromae.finetune.model import BiEncoder, LossConfig, flops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune import launch, tevatron_file  # noqa: E402,F401  (the 1- and 2-process launcher, its data)


def test_splade_vector_is_the_max_over_attended_positions_of_log1p_relu(tiny_model, tiny_tokenizer):
    """w_j = max over every attended position, [CLS] and [SEP] included, of log(1 + ReLU(logit_ij)), computed here
    position by position from the model's own logits."""
    from transformers import AutoModelForMaskedLM

    from retromae.retrieval.sparse import SpladeRepresentation

    model = AutoModelForMaskedLM.from_pretrained(tiny_model).eval()
    torch.nn.init.normal_(model.cls.predictions.bias, std=2.0)  # a head with positive and negative logits
    batch = tiny_tokenizer(["open the file and read it", "close"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        ours = SpladeRepresentation(model)(batch["input_ids"], batch["attention_mask"])
    expected = torch.zeros(2, logits.shape[-1])
    for b in range(2):
        for i in range(logits.shape[1]):
            if batch["attention_mask"][b, i]:
                expected[b] = torch.maximum(expected[b], torch.log1p(torch.relu(logits[b, i])))
    torch.testing.assert_close(ours, expected)
    # [CLS] and [SEP] count: leaving them out gives another vector (on "close", 1 of 3 positions is ordinary)
    without = torch.log1p(torch.relu(logits[1, 1])).clamp(min=0)
    assert not torch.allclose(ours[1], without)


def test_flops_and_its_warm_up_by_hand():
    w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    valid = torch.tensor([True, True, False])  # the third row is a padded slot
    # columns: mean over the 2 valid rows = (2, 0.5, 1); sum of squares = 4 + 0.25 + 1
    assert flops(w, valid).item() == pytest.approx(5.25)
    bi = BiEncoder(torch.nn.Linear(1, 1), LossConfig(representation="splade", flops_query_weight=0.4,
                                                     flops_doc_weight=0.2, flops_warmup_steps=10))
    bi.steps_done.fill_(5)
    assert bi.loss_weights["flops_q"] == pytest.approx(0.4 * 0.25) and bi.loss_weights["flops_d"] == pytest.approx(0.05)
    bi.steps_done.fill_(30)
    assert bi.loss_weights["flops_q"] == pytest.approx(0.4), "constant after the warm-up"
    assert bi.loss_weights["nnz_q"] == 0.0, "sparsity is reported, not trained"


def test_flops_of_a_launch_is_each_process_share_of_the_global_value(monkeypatch):
    """Process 1 of 2: the global batch's column means over every process's valid rows, squared and summed, and this
    process returns half of it (the trainer adds the processes' shares); its items count the value once, on
    process 0 only."""
    import retromae.finetune.model as model_module

    other_columns, other_count = torch.tensor([[4.0, 0.0, 1.0]]), torch.tensor([3.0])  # process 0's sums, 3 rows
    monkeypatch.setattr(model_module, "world", lambda: (1, 2))
    monkeypatch.setattr(model_module, "gather_with_grad", lambda t: torch.cat([other_columns, t]))
    monkeypatch.setattr(model_module, "gather", lambda t: torch.cat([other_count, t]))
    w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    valid = torch.tensor([True, True, False])
    # columns over 5 rows: (4 + 4, 0 + 1, 1 + 2) / 5 = (1.6, 0.2, 0.6); squares 2.56 + 0.04 + 0.36 = 2.96; half: 1.48
    assert flops(w, valid).item() == pytest.approx(1.48)
    bi = BiEncoder(torch.nn.Linear(1, 1), LossConfig(representation="splade", cross_device_negatives=False))
    items = bi.num_items({"query_input_ids": torch.zeros(2, 1, dtype=torch.long),
                          "passage_valid": torch.tensor([True, False, True, True])})
    assert items["flops_q"].item() == 0.0 and items["flops_d"].item() == 0.0, "counted on process 0 only"
    assert items["nnz_q"].item() == 2 and items["nnz_d"].item() == 3
    monkeypatch.setattr(model_module, "world", lambda: (0, 2))
    assert bi.num_items({"query_input_ids": torch.zeros(2, 1, dtype=torch.long),
                         "passage_valid": torch.ones(4, dtype=torch.bool)})["flops_q"].item() == 1.0


def test_kl_sum_leaves_out_masked_entries_by_hand():
    from retromae.finetune.model import _kl_sum

    teacher = torch.tensor([[0.25, 0.75, 0.0]]).log()  # the third entry is masked (-inf)
    student = torch.tensor([[0.5, 0.5, 0.0]]).log()
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert _kl_sum(teacher, student).item() == pytest.approx(expected, rel=1e-6)


class Vectors(torch.nn.Module):
    """A stand-in SPLADE encoder: text i (its first token id) is the given vocabulary vector."""

    def __init__(self, vectors):
        super().__init__()
        self.vectors = torch.nn.Parameter(torch.tensor(vectors))

    def forward(self, input_ids, attention_mask):
        return self.vectors[input_ids[:, 0]]


def test_splade_losses_margin_mse_and_nonzeros_by_hand():
    # one query, its positive and two negatives, vocabulary of 3
    vectors = [[1.0, 0.0, 2.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [2.0, 0.0, 0.0]]
    bi = BiEncoder(Vectors(vectors), LossConfig(representation="splade", cross_device_negatives=False,
                                                distill_weight=1.0, distill_loss="margin_mse"))
    batch = {"query_input_ids": torch.tensor([[0]]), "query_attention_mask": torch.ones(1, 1, dtype=torch.long),
             "passage_input_ids": torch.tensor([[1], [2], [3]]),
             "passage_attention_mask": torch.ones(3, 1, dtype=torch.long),
             "passage_valid": torch.tensor([True, True, True]), "teacher_scores": torch.tensor([[4.0, 1.0, 3.5]])}
    losses = bi(batch)
    s = [1.0, 2.0, 2.0]  # q . p for each passage
    assert losses["contrastive"].item() == pytest.approx(-s[0] + math.log(sum(math.exp(x) for x in s)))
    margins = [(s[0] - s[j]) - (4.0 - t) for j, t in ((1, 1.0), (2, 3.5))]
    assert losses["distill"].item() == pytest.approx(sum(m * m for m in margins))
    items = bi.num_items(batch)
    assert items["distill"].item() == 2 and items["nnz_q"].item() == 1 and items["nnz_d"].item() == 3
    assert losses["nnz_q"].item() == 2 and losses["nnz_d"].item() == 2 + 1 + 1
    docs = torch.tensor(vectors[1:])
    assert losses["flops_d"].item() == pytest.approx(float((docs.mean(0) ** 2).sum()))
    assert losses["flops_q"].item() == pytest.approx(1.0 + 4.0)
    batch["teacher_scores"] = torch.tensor([[4.0, float("nan"), 3.5]])
    assert bi.num_items(batch)["distill"].item() == 1, "a pair without a teacher score is left out"


def random_sparse(rows: int, vocabulary: int, per_row: int, seed: int, quantum: float | None = None):
    from scipy.sparse import csr_matrix

    rng = np.random.default_rng(seed)
    indices = np.concatenate([np.sort(rng.choice(vocabulary, per_row, replace=False)) for _ in range(rows)])
    values = rng.gamma(1.0, 1.0, rows * per_row).astype(np.float32)
    if quantum:  # coarse values make ties
        values = np.ceil(values / quantum) * quantum
    return csr_matrix((values, indices, np.arange(0, rows * per_row + 1, per_row)), shape=(rows, vocabulary))


def brute_force(queries, docs, k):
    """Dense scores, documents sharing no term left out, ties by position: the reference."""
    dense = (queries @ docs.T).toarray()
    shared = ((queries != 0).astype(np.float32) @ (docs != 0).astype(np.float32).T).toarray() > 0
    scores, positions = [], []
    for row, ok in zip(dense, shared):
        cols = [c for c in np.lexsort((np.arange(len(row)), -row)) if ok[c]][:k]
        scores.append(list(row[cols]) + [-np.inf] * (k - len(cols)))
        positions.append(cols + [-1] * (k - len(cols)))
    return np.array(scores, np.float32), np.array(positions)


def test_exact_sparse_search_equals_brute_force_across_blocks_and_shards(monkeypatch):
    from retromae.retrieval import sparse
    from retromae.retrieval.search import merge_top_k

    docs = random_sparse(500, 300, 12, seed=1, quantum=0.5)
    queries = random_sparse(40, 300, 6, seed=2, quantum=0.5)
    want_scores, want_positions = brute_force(queries, docs, 20)
    monkeypatch.setattr(sparse, "SCORE_BUDGET", 7 * 97)  # several query blocks
    for block in (1 << 18, 97):  # one inverted index, or blocks of 97 documents
        scores, positions = sparse.ExactSparseIndex(docs, doc_block=block).search(queries, 20)
        assert np.array_equal(positions, want_positions), block
        np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    # three processes' shards, merged as evaluation merges them
    parts = [(0, 170), (170, 333), (333, 500)]
    found = [sparse.ExactSparseIndex(docs[lo:hi]).search(queries, 20) for lo, hi in parts]
    merged = merge_top_k([s for s, _ in found], [np.where(p >= 0, p + lo, -1) for (s, p), (lo, _) in zip(found, parts)],
                         20)
    assert np.array_equal(merged[1], want_positions)


def test_seismic_finds_what_exact_search_finds():
    from retromae.retrieval.sparse import ExactSparseIndex, SeismicSearch, SparseSearchConfig

    docs = random_sparse(3000, 2000, 40, seed=3)
    queries = random_sparse(50, 2000, 15, seed=4)
    _, exact = ExactSparseIndex(docs).search(queries, 10)
    scores, approx = SeismicSearch(docs, SparseSearchConfig(index="seismic", n_postings=400, query_cut=15,
                                                            heap_factor=0.9, threads=1)).search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall
    # Seismic's candidates are re-scored exactly (its own scores are f16)
    row = int(approx[0, 0])
    assert scores[0, 0] == pytest.approx(float((docs[row] @ queries[0].T).toarray()[0, 0]), rel=1e-6)


def test_fusion_by_hand():
    from retromae.retrieval.sparse import FusionConfig, fuse_runs

    dense = {"q": {"a": 0.9, "b": 0.5, "c": 0.1}}
    sparse = {"q": {"c": 7.0, "a": 3.0}}
    rrf = fuse_runs([dense, sparse], FusionConfig(method="rrf", rrf_k=60))["q"]
    assert rrf["a"] == pytest.approx(1 / 61 + 1 / 62) and rrf["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert rrf["b"] == pytest.approx(1 / 62) and list(rrf) == ["a", "c", "b"]
    linear = fuse_runs([dense, sparse], FusionConfig(method="linear", weights=[1.0, 0.5]))["q"]
    assert linear["a"] == pytest.approx(1.0 + 0.5 * 0.0) and linear["c"] == pytest.approx(0.0 + 0.5 * 1.0)
    assert linear["b"] == pytest.approx(0.5)


@pytest.mark.slow
def test_splade_cross_device_and_grad_cache_equal_one_process(tiny_model, tevatron_file, tmp_path):  # noqa: F811 (the fixture)
    """SPLADE's InfoNCE, FLOPS (queries and documents) and gradients: 2 processes x 4 queries with cross-device
    negatives == 1 process x 8 queries == 1 process x 8 queries under GradCache (float64)."""
    extra = json.dumps({"loss.representation": "splade", "loss.temperature": 1.0, "loss.flops_query_weight": 0.3,
                        "loss.flops_doc_weight": 0.2})
    launch([str(tiny_model), str(tevatron_file), str(tmp_path / "one"), "8", "0", "float64", extra], 1, tmp_path, 0)
    launch([str(tiny_model), str(tevatron_file), str(tmp_path / "two"), "4", "0", "float64", extra], 2, tmp_path,
           free_port())
    launch([str(tiny_model), str(tevatron_file), str(tmp_path / "cached"), "8", "3", "float64", extra], 1, tmp_path, 0)
    records = {name: json.loads((tmp_path / name / "record.json").read_text()) for name in ("one", "two", "cached")}
    assert records["two"]["num_processes"] == 2
    for name in ("flops_q", "flops_d", "contrastive", "nnz_q", "nnz_d"):
        assert records["two"]["losses"][name] == pytest.approx(records["one"]["losses"][name], rel=1e-10), name
        assert records["cached"]["losses"][name] == pytest.approx(records["one"]["losses"][name], rel=1e-10), name
    assert records["one"]["losses"]["flops_d"] > 0
    grads = {n: safetensors.torch.load_file(str(tmp_path / n / "grads.safetensors")) for n in records}
    assert len(grads["one"]) > 10 and any("cls.predictions" in k for k in grads["one"])
    for name in ("two", "cached"):
        assert grads[name].keys() == grads["one"].keys()
        for k in grads["one"]:
            torch.testing.assert_close(grads[name][k], grads["one"][k], atol=1e-11, rtol=1e-8, msg=f"{name} {k}")


def test_splade_fine_tunes_exports_and_sparse_encoder_agrees(tiny_model, beir_task, tmp_path):
    """A SPLADE fine-tune: the losses go down, the mean non-zeros are logged; its export loads in SparseEncoder
    (prompts and length included), which gives `evaluate --representation splade`'s vectors and scores; the export
    scores on dev what model selection measured; Seismic's run is scored; mining retrieves no positive."""
    from sentence_transformers import SparseEncoder

    from retromae.finetune.mine import MineConfig, mine_negatives
    from retromae.finetune.run import load_finetune_config, run
    from retromae.retrieval.encoder import EncodeConfig
    from retromae.retrieval.evaluate import SearchConfig, evaluate_model
    from retromae.retrieval.sparse import SparseSearchConfig, SparseTextEncoder

    overrides = {
        "model.name_or_path": str(tiny_model), "data.train": str(beir_task), "data.group_size": 2,
        "data.query_max_len": 24, "data.passage_max_len": 40, "data.query_prefix": "query: ",
        "data.passage_prefix": "passage: ", "loss.representation": "splade", "loss.flops_query_weight": 1e-3,
        "loss.flops_doc_weight": 1e-3, "train.per_device_batch_size": 16, "train.max_steps": 16, "train.lr": 1e-3,
        "train.report_to": "none", "train.cpu": True, "train.mixed_precision": "no", "train.logging_steps": 4,
        "train.output_dir": str(tmp_path / "out"), "dev.dataset": str(beir_task), "dev.every_steps": 8,
    }
    result = run(load_finetune_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
    first, last = result["history"][0], result["history"][-1]
    assert last["loss/contrastive"] < first["loss/contrastive"] and last["loss/nnz_d"] > 0
    model = result["model_dir"]
    ours = SparseTextEncoder(model, EncodeConfig(precision="no"), device="cpu")
    assert (ours.cfg.query_prefix, ours.cfg.passage_prefix, ours.cfg.passage_max_len) == ("query: ", "passage: ", 40)
    st = SparseEncoder(model, device="cpu")
    assert st.max_seq_length == 40 and st.prompts["query"] == "query: "
    queries, docs = ["how to open a file", "sort a list"], ["Open file and return a stream. " * 8, "Sort it."]
    mine_q, mine_d = ours.encode(queries, "query").toarray(), ours.encode(docs, "passage").toarray()
    theirs_q = st.encode_query(queries, convert_to_tensor=True).to_dense().numpy()
    theirs_d = st.encode_document(docs, convert_to_tensor=True).to_dense().numpy()
    np.testing.assert_allclose(mine_q, theirs_q, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mine_d, theirs_d, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mine_q @ mine_d.T, st.similarity(torch.tensor(theirs_q), torch.tensor(theirs_d)).numpy(),
                               rtol=1e-5)
    exact = evaluate_model(model, str(beir_task), "dev", EncodeConfig(precision="no"),
                           SearchConfig(metrics=["ndcg@10"], representation="splade"))
    assert exact["ndcg@10"] == pytest.approx(result["dev"]["best"], abs=1e-6)
    sparsity = exact["sparsity"]
    assert sparsity["mean_nonzeros_per_document"] > 0 and len(sparsity["top_terms"]) == 3
    seismic = evaluate_model(model, str(beir_task), "dev", EncodeConfig(precision="no"),
                             SearchConfig(metrics=["ndcg@10"], representation="splade",
                                          sparse=SparseSearchConfig(index="seismic", threads=1)))
    assert abs(seismic["ndcg@10"] - exact["ndcg@10"]) < 0.05
    report = seismic["sparsity"]
    assert report["exact"]["ndcg@10"] == pytest.approx(exact["ndcg@10"], abs=1e-9), "the same vectors, exact search"
    assert report["seismic_recall@10_vs_exact"] >= 0.9
    mined = tmp_path / "mined.jsonl"
    mine_negatives(model, str(beir_task), str(mined), "train", EncodeConfig(precision="no"),
                   MineConfig(depth=5, representation="splade"))
    for line in mined.read_text().splitlines():
        record = json.loads(line)
        assert not set(record["negative_ids"]) & set(record["positive_ids"])


def test_a_study_of_sparse_arms_pretrains_lexmae_and_splade_fine_tunes_from_its_head(tiny_model, corpus_file,
                                                                                      beir_task, tmp_path):
    """A study whose arms are SPLADE-fine-tuned and evaluated by sparse search: the LexMAE arm's fine-tuning starts
    from the MLM head LexMAE trained (model/pretraining/heads.safetensors), the control's from the checkpoint's."""
    import safetensors.torch

    from conftest import tiny_config
    from retromae.config import dump_yaml
    from retromae.study import load_study, run_study

    pretrain = tmp_path / "pretrain.yaml"
    dump_yaml(tiny_config(tiny_model, corpus_file, tmp_path / "unused", train={"max_steps": 1, "lr": 1e-2}), pretrain)
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(json.dumps({
        "data": {"train": str(beir_task), "group_size": 1, "query_max_len": 24, "passage_max_len": 32},
        "loss": {"representation": "splade"},
        "train": {"per_device_batch_size": 8, "max_steps": 1, "lr": 1e-12, "report_to": "none", "cpu": True,
                  "mixed_precision": "no"}}))
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\ndata_root: {beir_task.parent}\ndatasets: [{beir_task.name}]\n"
                     "search:\n  metrics: [ndcg@10]\n  representation: splade\nencode:\n  precision: 'no'\n")
    study = tmp_path / "study.yaml"
    study.write_text(json.dumps({
        "name": "sparse", "output_dir": str(tmp_path / "out"), "model": str(tiny_model), "seeds": [1],
        "pretrain": str(pretrain), "budget_tokens": 8 * 64, "finetune": str(finetune), "suite": str(suite),
        "baselines": ["bm25"], "arms": [{"name": "control", "objective": None},
                                        {"name": "lexmae", "objective": {"name": "lexmae"}}]}))
    report = run_study(load_study(str(study)))
    assert set(report["arms"]) == {"control", "lexmae"} and "bm25" in report["references"]
    out = tmp_path / "out"
    heads = safetensors.torch.load_file(str(out / "lexmae" / "seed1" / "pretrain" / "model" / "pretraining" /
                                            "heads.safetensors"))
    tuned = safetensors.torch.load_file(str(out / "lexmae" / "seed1" / "model" / "model.safetensors"))
    key = "cls.predictions.transform.dense.weight"
    original = safetensors.torch.load_file(str(tiny_model / "model.safetensors"))[key]
    assert not torch.allclose(heads["encoder." + key], original), "LexMAE moved the head"
    torch.testing.assert_close(tuned[key], heads["encoder." + key], atol=1e-6, rtol=0), "fine-tuning started there"
