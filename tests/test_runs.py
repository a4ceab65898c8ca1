"""Runs a user can trust: the shipped recipes under a 2-process launch, one run per output folder, a lock, resume
only of the same run, no debris, outputs that follow the umask, exports that encode as evaluate does."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import accelerate_launch, tiny_config
from retromae.cli import main
from retromae.config import ConfigError
from retromae.pretrain import run

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its content hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_traceback(done) -> str:
    text = done.stdout + done.stderr
    assert "Traceback" not in text, text[-4000:]
    return text


@pytest.mark.slow
def test_shipped_recipes_run_under_a_two_process_launch(tiny_model, corpus_file, beir_task, tmp_path):
    """pretrain, mine and finetune as a user launches them: the recipes' own settings (TensorBoard logging, bf16 where
    the CPU has it, checkpoints), only the model, data and length made small."""
    out = tmp_path / "pretrain"
    done = accelerate_launch(["-m", "retromae", "pretrain", str(ROOT / "pretrain" / "retromae_nfcorpus_small.yaml"),
                              f"model.name_or_path={tiny_model}", f"data.corpus=[{corpus_file}]", "data.max_len=64",
                              f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=4", "train.save_steps=2",
                              "train.per_device_batch_size=4", f"train.output_dir={out}"], port=None)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    no_traceback(done)
    assert (out / "model" / "model.safetensors").is_file() and (out / "checkpoints" / "checkpoint-4").is_dir()
    assert list((out / "logs" / "pretrain").glob("events.out.tfevents.*")), "TensorBoard logs under logs/pretrain"
    assert not [p for p in out.rglob(".*.tmp")], "nothing half-written is left"

    mined = tmp_path / "mined.jsonl"
    done = accelerate_launch(["-m", "retromae", "mine", "--model", str(out / "model"), "--data", str(beir_task),
                              "--output", str(mined), "--depth", "8"], port=None)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert no_traceback(done).count("mined ") == 1, "the summary is printed once"
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    assert rows and all(len(r["negative_ids"]) == 8 for r in rows)

    tuned = tmp_path / "finetune"
    done = accelerate_launch(["-m", "retromae", "finetune", str(ROOT / "finetune" / "nfcorpus_small.yaml"),
                              f"model.name_or_path={out / 'model'}", f"data.train={mined}", f"data.corpus={beir_task}",
                              "data.passage_max_len=48", "train.max_steps=4", "train.per_device_batch_size=8",
                              f"train.output_dir={tuned}", f"dev.dataset={beir_task}", "dev.every_steps=2"],
                             port=None)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    text = no_traceback(done)
    assert "exporting the weights of step" in text, "dev selection says which step it exported"
    assert (tuned / "model" / "model.safetensors").is_file() and not list(tuned.glob(".model.*"))
    assert list((tuned / "logs" / "finetune").glob("events.out.tfevents.*")), "fine-tuning logs under logs/finetune"


def short_run(tiny_model, corpus_file, out, **train):
    return tiny_config(tiny_model, corpus_file, out, train={"max_steps": 2, "save_steps": 1, **train})


def test_a_second_run_into_a_used_folder_stops_before_touching_it(tiny_model, corpus_file, tmp_path, capsys):
    run(short_run(tiny_model, corpus_file, tmp_path))
    before = snapshot(tmp_path)
    cfg = short_run(tiny_model, corpus_file, tmp_path, max_steps=3)
    from retromae.config import dump_yaml

    recipe = tmp_path.parent / f"{tmp_path.name}-recipe.yaml"
    dump_yaml(cfg, recipe)
    assert main(["pretrain", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "holds another run (checkpoints up to step 2, an exported model)" in err
    assert "train.resume=latest" in err and "train.overwrite=true" in err
    assert snapshot(tmp_path) == before, "no file of the first run changed"
    # overwrite replaces it: the old checkpoints are gone, the new run's are there
    run(short_run(tiny_model, corpus_file, tmp_path, max_steps=3, overwrite=True, save_steps=3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-3"]


def test_resume_names_the_settings_that_differ(tiny_model, corpus_file, tmp_path):
    run(short_run(tiny_model, corpus_file, tmp_path))
    changed = tiny_config(tiny_model, corpus_file, tmp_path, objective={"mask_ratio": 0.4},
                          train={"max_steps": 2, "save_steps": 1, "resume": "latest", "seed": 7, "logging_steps": 5})
    with pytest.raises(ConfigError) as err:
        run(changed)
    message = str(err.value)
    assert "objective.mask_ratio: 0.3 -> 0.4" in message and "train.seed: 42 -> 7" in message
    assert "logging_steps" not in message, "operational settings may change on resume"


def test_a_locked_folder_names_the_holder(tiny_model, corpus_file, tmp_path):
    from retromae.runs import _lock, _sign

    tmp_path.mkdir(exist_ok=True)
    holder = _lock(tmp_path)  # another run holds the folder
    _sign(holder)
    try:
        with pytest.raises(ConfigError, match=rf"is in use by another run \(process {os.getpid()} on "):
            run(short_run(tiny_model, corpus_file, tmp_path))
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.close()
    run(short_run(tiny_model, corpus_file, tmp_path))  # released: the folder can be used


def test_debris_of_a_killed_run_is_removed_on_resume(tiny_model, corpus_file, tmp_path):
    run(short_run(tiny_model, corpus_file, tmp_path, stop_at_step=1))
    debris = [tmp_path / "checkpoints" / ".checkpoint-2.tmp", tmp_path / ".model.abc123.tmp"]
    for path in debris:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"partial")
    result = run(short_run(tiny_model, corpus_file, tmp_path, resume="latest"))
    assert result["steps"] == 2 and not any(p.exists() for p in debris)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_follow_the_umask(tiny_model, corpus_file, tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        model = Path(run(short_run(tiny_model, corpus_file, tmp_path))["model_dir"])
        from retromae.io import atomic_write_text

        atomic_write_text(tmp_path / "result.json", "{}")
    finally:
        os.umask(old)
    assert model.stat().st_mode & 0o777 == dir_mode
    assert (model / "model.safetensors").stat().st_mode & 0o777 == file_mode
    assert (model / "pretraining" / "heads.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "model.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == file_mode


def test_yaml_no_and_override_errors_point_at_the_override(tmp_path):
    from retromae.pretrain import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n  lr: 1.0e-4\n")
    assert load_config(str(recipe)).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"^command-line override 'train.lr=-1': train.lr=-1.0 must be > 0"):
        load_config(str(recipe), ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"r\.yaml:3: train.lr=-2.0 must be > 0"):
        recipe.write_text("train:\n  mixed_precision: no\n  lr: -2\n")
        load_config(str(recipe))
    with pytest.raises(ConfigError, match=r"Did you mean 'cosine'\?"):
        load_config(str(recipe), ["train.lr=1e-4", "train.scheduler=cosin"])


def test_exports_encode_as_evaluate_does(tiny_model, corpus_file, beir_task, tmp_path):
    """SentenceTransformer(path).encode_query / encode_document give the vectors `retromae evaluate` scores, under
    defaults, for a pretrained export (CLS, dot) and a fine-tuned one (mean, cosine, prefixes, passage length)."""
    from sentence_transformers import SentenceTransformer

    from retromae.finetune.run import load_finetune_config
    from retromae.finetune.run import run as finetune
    from retromae.retrieval.encoder import EncodeConfig, TextEncoder

    pretrained = run(short_run(tiny_model, corpus_file, tmp_path / "p"))["model_dir"]
    overrides = {"model.name_or_path": pretrained, "data.train": str(beir_task), "data.group_size": 1,
                 "data.query_max_len": 12, "data.passage_max_len": 40, "data.query_prefix": "query: ",
                 "data.passage_prefix": "passage: ", "loss.similarity": "cosine", "loss.temperature": 0.05,
                 "loss.pooling": "mean", "train.per_device_batch_size": 8, "train.max_steps": 2,
                 "train.report_to": "none", "train.cpu": True, "train.mixed_precision": "no",
                 "train.output_dir": str(tmp_path / "f")}
    tuned = finetune(load_finetune_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))["model_dir"]
    texts = [d["text"] for d in json.loads("[" + ",".join((beir_task / "corpus.jsonl").read_text().splitlines()[:24])
                                              + "]")]
    queries = [q["text"] for q in map(json.loads, (beir_task / "queries.jsonl").read_text().splitlines()[:24])]
    long_query = " ".join(texts[:3])  # longer than the training query length: evaluate must not cut it shorter
    for path, similarity in ((pretrained, "dot"), (tuned, "cosine")):
        st = SentenceTransformer(path, device="cpu")
        assert st.similarity_fn_name == similarity
        ours = TextEncoder(path, EncodeConfig(precision="no"), device="cpu")
        docs = ours.encode(texts, "passage", show_progress=False)
        qs = ours.encode(queries + [long_query], "query", show_progress=False)
        assert np.allclose(st.encode_document(texts), docs, atol=1e-5)
        assert np.allclose(st.encode_query(queries + [long_query]), qs, atol=1e-5)
    settings = TextEncoder(tuned, EncodeConfig(precision="no"), device="cpu").settings()
    assert settings["query_prefix"] == "query: " and settings["passage_prefix"] == "passage: "
    assert settings["passage_max_len"] == settings["query_max_len"] == 40 and settings["normalize"]


def test_every_known_bad_input_gives_one_clear_line():
    """scripts/bad_inputs.py: every case of the bad-input catalogue (docs/bad_inputs.md) passes."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bad_inputs.py")], capture_output=True, text=True,
                          timeout=600)
    assert done.stdout.strip().splitlines()[-1] == "failed=0", done.stdout[-6000:] + done.stderr[-3000:]


def test_the_main_process_chooses_the_checkpoint_and_every_process_must_read_it(tmp_path, monkeypatch):
    """Resuming 'latest': process 0 picks the newest checkpoint and the others take its choice, not their own; a
    process that cannot read it (a folder not shared between machines) stops the launch with a message."""
    import retromae.distributed as distributed
    from retromae.trainer import agree_on_checkpoint

    for step in (5, 10):
        (tmp_path / "out" / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "out" / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    main_choice = {}
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "broadcast_decision", lambda value: main_choice.setdefault("path", value))
    monkeypatch.setattr(distributed, "gather_objects", lambda value: [value, True])
    assert agree_on_checkpoint(tmp_path / "out", "latest") == tmp_path / "out" / "checkpoints" / "checkpoint-10"
    # process 1, on a machine whose folder of the same name is empty: it takes process 0's choice and cannot read it
    (tmp_path / "other").mkdir()
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    monkeypatch.setattr(distributed, "gather_objects", lambda value: [True, value])
    monkeypatch.chdir(tmp_path / "other")
    main_choice["path"] = "out/checkpoints/checkpoint-10"  # relative: another folder on this "machine"
    with pytest.raises(ConfigError, match=r"process\(es\) \[1\] cannot read it"):
        agree_on_checkpoint("out", "latest")
