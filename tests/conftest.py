"""Shared fixtures: a tiny random BERT with a WordPiece tokenizer trained here, and corpora built here.

Nothing is downloaded and no shipped data is needed: the texts are standard-library docstrings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# caches of collections, token ids and sampled negatives: one fresh folder per test session, not the user's
os.environ.setdefault("RETROMAE_CACHE", __import__("tempfile").mkdtemp(prefix="retromae-test-cache-"))

from retromae.tiny import make_tiny_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BEIR = SHARED / "data" / "beir"
# the recipes' ${RETROMAE_DATA}: the project's machines keep the local collections in ../shared/data
if (SHARED / "data").is_dir():
    os.environ.setdefault("RETROMAE_DATA", str(SHARED / "data"))


@pytest.fixture(scope="session")
def docstrings() -> list[dict]:
    from retromae.demo import docstring_corpus

    return docstring_corpus(limit=800)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, docstrings) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"), [d["text"] for d in docstrings])


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, docstrings):
    """tiny_family("roberta"): a tiny random model of that family (retromae.tiny.FAMILIES), built once a session."""
    from retromae.matrix import tiny_family_model

    built = {}

    def model(family: str) -> Path:
        if family not in built:
            built[family] = tiny_family_model(tmp_path_factory.mktemp(f"tiny_{family}"), family,
                                              [d["text"] for d in docstrings[:160]])
        return built[family]

    return model


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, docstrings) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docstrings[:300]))
    return path


@pytest.fixture(scope="session")
def beir_task(tmp_path_factory):
    """A docstring retrieval task in BEIR layout, with the same judgements as train, dev and test splits."""
    from retromae.demo import docstring_corpus, write_retrieval_task

    folder = tmp_path_factory.mktemp("beir") / "docstrings"
    write_retrieval_task(docstring_corpus(limit=500), folder)
    (folder / "qrels" / "train.tsv").write_text((folder / "qrels" / "test.tsv").read_text())
    (folder / "qrels" / "dev.tsv").write_text((folder / "qrels" / "test.tsv").read_text())
    return folder


@pytest.fixture(scope="session")
def st_model(tmp_path_factory, tiny_model):
    """The tiny BERT exported as a sentence-transformers folder with mean pooling and normalisation."""
    from sentence_transformers import SentenceTransformer, models

    path = tmp_path_factory.mktemp("st") / "tiny-st"
    transformer = models.Transformer(str(tiny_model), max_seq_length=64)
    SentenceTransformer(modules=[transformer, models.Pooling(32, pooling_mode="mean"), models.Normalize()],
                        device="cpu").save(str(path))
    return path


def free_port() -> int:
    """A TCP port nothing listens on now, for a launch's rendezvous (a fixed port can still be held by an earlier
    launch's store, or by another program on the CI machine). Drawn below the kernel's ephemeral range (32768 and
    up): a client that connects to an ephemeral port before its server listens can be handed that same port as
    its own source port and end up connected to itself."""
    import random
    import socket

    for _ in range(100):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in 20000-32000")


def accelerate_launch(args: list[str], processes: int = 2, port: int | None = None, cwd=None, timeout: int = 600,
                      extra: list[str] = ()):
    """`accelerate launch --multi_gpu --num_processes N ...` on the CPU (gloo), as a user runs it; the result of
    subprocess.run. `args` follow the launcher (e.g. ["-m", "retromae", "pretrain", ...])."""
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port or free_port()), *extra, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each test starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


def tiny_config(model_dir, corpus, output_dir, **sections):
    """A PretrainConfig for fast CPU runs on the tiny model; `sections` override by section."""
    from retromae.pretrain import load_config

    overrides = {
        "model.name_or_path": str(model_dir),
        "data.corpus": [str(corpus)],
        "data.max_len": 64,
        "data.cache_dir": str(Path(output_dir) / "cache"),
        "train.output_dir": str(output_dir),
        "train.per_device_batch_size": 8,
        "train.max_steps": 4,
        "train.mixed_precision": "no",
        "train.report_to": "none",
        "train.logging_steps": 1,
        "train.cpu": True,
    }
    for section, values in sections.items():
        for k, v in values.items():
            overrides[f"{section}.{k}"] = v
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: torch's intra-op threads only contend there (20x slower runs). A test
    module takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
