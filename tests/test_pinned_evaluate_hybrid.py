"""The rules of `retromae.retrieval.hybrid` (DupMAE's joint dense + sparse search) that tests/test_pinned_evaluate.py
leaves open, pinned on tiny inputs worked out by hand (issue 18: mutation testing): where `HybridEncoder` puts the
model and which lengths and prompts it takes, the batches of `exact_search`, and `pooled_search`'s defaults, GPU
setting and output types."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix

from retromae.config import ConfigError
from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
from retromae.objectives.dupmae import DupMAERepresentation, DupMAERepresentationConfig
from retromae.retrieval.encoder import EncodeConfig
from retromae.retrieval.hybrid import HybridEncoder, HybridVectors, exact_search, pooled_search
from retromae.retrieval.index import faiss_gpus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """A tiny DupMAE representation and its tokenizer, as a model in training hands them over."""
    cfg = ModelConfig(name_or_path=str(tiny_model))
    torch.manual_seed(0)
    rep = DupMAERepresentation(load_masked_lm(cfg), DupMAERepresentationConfig(dense_dim=4, topk=3)).eval()
    return rep, load_tokenizer(cfg)


# ----- HybridEncoder: device, lengths, prompts, errors ----------------------------------------------------------


def test_encoder_device_is_the_one_given_else_cuda_when_there_is_one(loaded, monkeypatch):
    rep, tokenizer = loaded
    assert HybridEncoder(None, representation=rep, tokenizer=tokenizer, device="cpu").device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing runs: only the choice is looked at
    assert HybridEncoder(None, representation=rep, tokenizer=tokenizer).device == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert HybridEncoder(None, representation=rep, tokenizer=tokenizer).device == torch.device("cpu")


def test_encoder_loads_the_model_onto_its_device(tiny_model):
    encoder = HybridEncoder(str(tiny_model), device="meta")  # meta: a device other than the CPU, without memory
    assert encoder.device == torch.device("meta")
    assert {p.device.type for p in encoder.rep.parameters()} == {"meta"}


def test_encoder_names_the_model_key_when_its_tokenizer_cannot_be_had(loaded, tmp_path):
    rep, _ = loaded
    with pytest.raises(ConfigError, match=r"^model='.*nothing': no such folder"):
        HybridEncoder(str(tmp_path / "nothing"), representation=rep)


def test_encoder_takes_the_prompts_and_length_a_folder_declares(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "st")
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "",
                                                      "type": "sentence_transformers.models.Transformer"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 20}))
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "document": "passage: "}}))
    cfg = HybridEncoder(str(folder), EncodeConfig(), device="cpu").cfg
    assert (cfg.query_prefix, cfg.passage_prefix) == ("query: ", "passage: ")
    assert (cfg.query_max_len, cfg.passage_max_len) == (20, 20)
    # what is set in the config wins over what the folder says
    cfg = HybridEncoder(str(folder), EncodeConfig(query_max_len=7, query_prefix=""), device="cpu").cfg
    assert (cfg.query_prefix, cfg.passage_prefix, cfg.query_max_len, cfg.passage_max_len) == ("", "passage: ", 7, 20)


@pytest.mark.parametrize("tokenizer_limit, positions, expected", [
    (40, 64, 40),  # min(512, 40, 64): the tokenizer's limit
    (10 ** 30, 64, 64),  # min(512, 10^30, 64): the position table's
    (10 ** 30, 4096, 512),  # min(512, 10^30, 4096): the cap
])
def test_encoder_lengths_default_to_the_models_own_limit(loaded, monkeypatch, tokenizer_limit, positions, expected):
    rep, tokenizer = loaded
    monkeypatch.setattr(tokenizer, "model_max_length", tokenizer_limit)
    monkeypatch.setattr(rep.mlm.config, "max_position_embeddings", positions)
    cfg = HybridEncoder(None, EncodeConfig(), representation=rep, tokenizer=tokenizer, device="cpu").cfg
    assert (cfg.query_max_len, cfg.passage_max_len) == (expected, expected)


# ----- exact_search ---------------------------------------------------------------------------------------------


def test_exact_search_batches_cover_every_query_whatever_the_dimension():
    # 3 queries of dimension 1 (more queries than dimensions), batches of one query; no sparse part.
    # q = 1, -2, 3 against d0 = 1, d1 = -1: scores q0 1 -1; q1 -2 2; q2 3 -3: best d0, d1, d0
    queries = HybridVectors(np.array([[1], [-2], [3]], np.float32), csr_matrix((3, 2), dtype=np.float32))
    docs = HybridVectors(np.array([[1], [-1]], np.float32), csr_matrix((2, 2), dtype=np.float32))
    scores, positions = exact_search(queries, docs, 1, batch=1)
    assert scores.tolist() == [[1], [2], [3]] and positions.tolist() == [[0], [1], [0]]


# ----- pooled_search --------------------------------------------------------------------------------------------


def test_pooled_search_default_pool_is_a_thousand_documents():
    # 1001 documents, dense d_i = 1001 - i (d0 1001 ... d999 2, d1000 1); the query (dense 1) shares vocabulary
    # entry 0 with d1000 only (sparse 1 x 1500). Default pool 1000: d0 .. d999, floor 2, k-th joint score 1001,
    # margin 1e-3 x 1001 = 1.001: 1001 > 2 + 1.001, bounded; d1000 may reach 2 + 1500 >= 1001 - 1.001: added (1).
    # Its joint score 1 + 1500 = 1501 beats d0's 1001. (A pool of 1001 would hold it without the bound: 0 added.)
    queries = HybridVectors(np.array([[1]], np.float32), csr_matrix(np.array([[1]], np.float32)))
    sparse = np.zeros((1001, 1), np.float32)
    sparse[1000, 0] = 1500
    docs = HybridVectors(np.arange(1001, 0, -1, dtype=np.float32)[:, None], csr_matrix(sparse))
    stats = {}
    scores, positions = pooled_search(queries, docs, 1, use_gpu=False, stats=stats)
    assert positions.tolist() == [[1000]] and scores.tolist() == [[1501]]
    assert stats == {"added_by_bound": 1, "queries_scored_in_full": 0}


def test_pooled_search_returns_float32_scores_and_int64_positions():
    # dense d0 3, d1 2, d2 1; the query (dense 1) shares entry 1 with d2 (sparse 1 x 0.5): joint 3, 2, 1.5
    queries = HybridVectors(np.array([[1]], np.float32), csr_matrix(np.array([[0, 1]], np.float32)))
    docs = HybridVectors(np.array([[3], [2], [1]], np.float32),
                         csr_matrix(np.array([[0, 0], [0, 0], [0, 0.5]], np.float32)))
    scores, positions = pooled_search(queries, docs, 3, pool=3, use_gpu=False)
    assert scores.dtype == np.float32 and positions.dtype == np.int64
    assert scores.tolist() == [[3, 2, 1.5]] and positions.tolist() == [[0, 1, 2]]


@pytest.mark.skipif(faiss_gpus() > 0, reason="this faiss has GPUs: use_gpu=True is then honoured, not refused")
def test_pooled_search_hands_its_gpu_setting_to_the_index():
    # use_gpu=True on a faiss without GPU support: the index refuses (rather than the search quietly using the CPU)
    queries = HybridVectors(np.array([[1]], np.float32), csr_matrix((1, 2), dtype=np.float32))
    docs = HybridVectors(np.array([[3], [2]], np.float32), csr_matrix((2, 2), dtype=np.float32))
    with pytest.raises(RuntimeError, match="use_gpu=True but this faiss has no GPU support"):
        pooled_search(queries, docs, 1, use_gpu=True)


class FakePoolIndex:
    """A `DenseIndex` whose search returns set pools (as an approximate index may: fewer hits than asked)."""

    pools: tuple = ()

    def __init__(self, dimension, factory, use_gpu):
        pass

    def add(self, vectors, ids=None):
        pass

    def search(self, queries, k):
        scores, hits = self.pools
        return np.array(scores, np.float32), hits


@pytest.mark.parametrize("pools, scored_in_full", [
    (([[3, -3.4e38], [3, 2]], [["0"], ["0", "1"]]), 1),
    (([[3, -3.4e38], [3, -3.4e38]], [["0"], ["0"]]), 2),  # both short: both scored in full, counted 2 (not set to 1)
])
def test_pooled_search_scores_in_full_a_query_given_fewer_than_k_candidates(monkeypatch, pools, scored_in_full):
    # dense d0 3, d1 2, d2 1; sparse d0 {0: 1, 1: 1}, d1 {0: 1}; both queries dense 1.
    # qA sparse {1: 1}: joint d0 3 + 1 = 4, d1 2, d2 1.  qB sparse {0: 1}: joint d0 4, d1 2 + 1 = 3, d2 1.
    # k = 2. qA's pool holds d0 alone (fewer than k): scored in full: d0 4, d1 2 (not d0 then a padding row).
    # qB's pool d0 d1 (exactly k): k-th joint score 3 > floor 2 + margin 0.003: bounded; d0 d1 may reach
    # 1 + 2 >= 2.997 but are in already: nothing added. Its top 2: d0 4, d1 3.
    # With both pools d0 alone, qB is scored in full too: the same top 2.
    from retromae.retrieval import index

    FakePoolIndex.pools = pools
    monkeypatch.setattr(index, "DenseIndex", FakePoolIndex)
    queries = HybridVectors(np.array([[1], [1]], np.float32), csr_matrix(np.array([[0, 1], [1, 0]], np.float32)))
    docs = HybridVectors(np.array([[3], [2], [1]], np.float32),
                         csr_matrix(np.array([[1, 1], [1, 0], [0, 0]], np.float32)))
    stats = {}
    scores, positions = pooled_search(queries, docs, 2, pool=2, use_gpu=False, stats=stats)
    assert positions.tolist() == [[0, 1], [0, 1]] and scores.tolist() == [[4, 2], [4, 3]]
    assert stats == {"added_by_bound": 0, "queries_scored_in_full": scored_in_full}


def test_pooled_search_on_an_ivf_index_short_of_k_hits_equals_exact():
    # 64 documents in 64 lists, 32 of them probed: a query gets about 32 hits, fewer than k = 40; the pooled top 40
    # is then the exact one (exact_search, pinned by hand in tests/test_pinned_evaluate.py), not padded with d0
    from retromae.retrieval.index import DenseIndex

    rng = np.random.default_rng(0)
    docs = HybridVectors(rng.standard_normal((64, 4)).astype(np.float32), csr_matrix((64, 3), dtype=np.float32))
    queries = HybridVectors(rng.standard_normal((2, 4)).astype(np.float32), csr_matrix((2, 3), dtype=np.float32))
    index = DenseIndex(4, "IVF64,Flat", use_gpu=False)
    index.add(docs.dense)
    assert min(len(row) for row in index.search(queries.dense, 40)[1]) < 40, "the case needs a short pool"
    pooled = pooled_search(queries, docs, 40, pool=10, index_factory="IVF64,Flat", use_gpu=False)[1]
    assert pooled.tolist() == exact_search(queries, docs, 40)[1].tolist()
