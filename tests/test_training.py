"""The shared loop: losses go down, exact resume, accumulation equals a larger batch, the export loads."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import tiny_config
from retromae.pretrain import build_batches, build_objective, run
from retromae.trainer import Trainer, checkpoint_dirs, make_accelerator


def weights(path: Path) -> dict:
    return safetensors.torch.load_file(str(path / "model.safetensors"))


def test_retromae_loss_goes_down_and_is_logged(tiny_model, corpus_file, tmp_path):
    cfg = tiny_config(tiny_model, corpus_file, tmp_path, train={"max_steps": 30, "lr": 4e-3, "logging_steps": 5,
                                                                   "warmup_ratio": 0.0, "report_to": "tensorboard"})
    history = run(cfg)["history"]
    first, last = history[0], history[-1]
    assert last["loss/mlm"] < first["loss/mlm"] - 0.5
    assert last["loss/decoder"] < first["loss/decoder"] - 0.5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "loss/mlm", "loss/decoder", "lr", "samples_per_second"} <= tags
    logged = [e.value for e in events.Scalars("loss/decoder")]
    assert len(logged) == 6 and logged[-1] == pytest.approx(last["loss/decoder"], rel=1e-6)


@pytest.mark.parametrize("data", [{}, {"num_workers": 2}, {"streaming": True, "num_workers": 2, "shuffle_chunk": 60}],
                         ids=["cached", "cached-workers", "streamed-workers"])
def test_exact_resume_gives_the_same_weights(tiny_model, corpus_file, tmp_path, data):
    common = {"max_steps": 6, "save_steps": 3, "save_total_limit": 3}
    straight = tiny_config(tiny_model, corpus_file, tmp_path / "a", model={"dropout": 0.1}, train=common, data=data)
    run_a = run(straight)
    interrupted = tiny_config(tiny_model, corpus_file, tmp_path / "b", model={"dropout": 0.1},
                              train={**common, "stop_at_step": 3}, data=data)
    assert run(interrupted)["model_dir"] is None, "a stopped run does not export"
    resumed = tiny_config(tiny_model, corpus_file, tmp_path / "b", model={"dropout": 0.1},
                          train={**common, "resume": "latest"}, data=data)
    run_b = run(resumed)
    a, b = weights(tmp_path / "a" / "checkpoints" / "checkpoint-6"), weights(tmp_path / "b" / "checkpoints" / "checkpoint-6")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert run_a["history"][-1]["loss"] == pytest.approx(run_b["history"][-1]["loss"], abs=0)
    # and the interrupted run's checkpoint is what the straight run had at step 3
    a3, b3 = weights(tmp_path / "a" / "checkpoints" / "checkpoint-3"), weights(tmp_path / "b" / "checkpoints" / "checkpoint-3")
    assert all(torch.equal(a3[k], b3[k]) for k in a3)
    state = json.loads((tmp_path / "b" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["config"]["objective"]["name"] == "retromae"
    # nothing half-written is left behind
    assert not [p for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith(".")]


def gradients_after_one_step(cfg):
    accelerator = make_accelerator(cfg.train)
    torch.manual_seed(0)
    objective, tokenizer = build_objective(cfg)
    batches = build_batches(cfg, tokenizer, accelerator)
    trainer = Trainer(objective, batches, cfg.train, accelerator)
    stream = batches.iterate(trainer.position)
    micro = [next(stream)[0] for _ in range(cfg.train.gradient_accumulation_steps)]
    sums, counts = trainer.accumulate_gradients(trainer.prepare_batches(micro))
    grads = {n: p.grad.clone() for n, p in trainer.objective.named_parameters() if p.grad is not None}
    means = {n: (sums[n] / counts[n]).item() for n in sums}
    return grads, means, micro


def test_accumulation_equals_one_larger_batch(tiny_model, corpus_file, tmp_path):
    whole = tiny_config(tiny_model, corpus_file, tmp_path / "a", model={"dropout": 0.0},
                        train={"per_device_batch_size": 8})
    split = tiny_config(tiny_model, corpus_file, tmp_path / "b", model={"dropout": 0.0},
                        train={"per_device_batch_size": 4, "gradient_accumulation_steps": 2})
    g1, m1, micro1 = gradients_after_one_step(whole)
    g2, m2, micro2 = gradients_after_one_step(split)
    # the two halves hold different numbers of masked tokens, so averaging per micro-batch would be wrong
    assert not torch.equal(micro2[0]["seeds"], micro2[1]["seeds"])
    assert m1 == pytest.approx(m2, rel=1e-5)
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-6, rtol=1e-4), k


def test_export_loads_in_sentence_transformers_and_transformers(tiny_model, corpus_file, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    result = run(tiny_config(tiny_model, corpus_file, tmp_path, train={"max_steps": 2}))
    path = Path(result["model_dir"])
    st = SentenceTransformer(str(path), device="cpu")
    texts = ["Return the number of items.", "Open a file and return a stream."]
    st_embeddings = st.encode(texts, convert_to_tensor=True)
    model = AutoModel.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        cls = model(**enc).last_hidden_state[:, 0]
    assert torch.allclose(st_embeddings, cls, atol=1e-5), "sentence-transformers uses CLS pooling of the same weights"
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".model")], "no temporary export left"


def test_pretraining_continues_from_an_export(tiny_model, corpus_file, tmp_path):
    first = run(tiny_config(tiny_model, corpus_file, tmp_path / "a", train={"max_steps": 2}))
    export = Path(first["model_dir"])
    saved = safetensors.torch.load_file(str(export / "pretraining" / "heads.safetensors"))
    assert any(k.startswith("decoder.") for k in saved) and any(k.startswith("encoder.cls.") for k in saved)
    cfg = tiny_config(export, corpus_file, tmp_path / "b")
    objective, _ = build_objective(cfg)
    reloaded = objective.heads_state_dict()
    assert reloaded.keys() == saved.keys()
    for k in saved:
        assert torch.equal(reloaded[k], saved[k]), f"{k} was not restored"
    exported_body = weights(export)
    body = objective.encoder.bert.state_dict()
    assert torch.equal(body["embeddings.word_embeddings.weight"], exported_body["embeddings.word_embeddings.weight"])


def test_checkpoints_are_pruned(tiny_model, corpus_file, tmp_path):
    run(tiny_config(tiny_model, corpus_file, tmp_path, train={"max_steps": 4, "save_steps": 1, "save_total_limit": 2}))
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
