"""The command line: user errors give one clear line and exit code 2; a run writes its export."""

import json
import subprocess
import sys

import pytest

from conftest import BEIR, tiny_config
from retromae.cli import main


def test_unknown_config_key_is_reported_with_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name_or_path: x\ntrain:\n  per_device_batchsize: 3\n")
    assert main(["pretrain", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "r.yaml:4: unknown key 'train.per_device_batchsize'. Did you mean 'per_device_batch_size'?" in err


def test_bad_corpus_line_is_reported(tmp_path, tiny_model, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"title": "no text here"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model)}, "data": {"corpus": [str(corpus)],
                                  "max_len": 64, "cache_dir": str(tmp_path / "cache")},
                                  "train": {"output_dir": str(tmp_path / "o")}}))
    assert main(["pretrain", str(recipe)]) == 2
    assert "c.jsonl:2: no 'text' field (fields: title); set data.text_field" in capsys.readouterr().err


def test_missing_corpus_file_is_reported(tmp_path, tiny_model, capsys):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# everything from the command line\n")
    assert main(["pretrain", str(recipe), f"model.name_or_path={tiny_model}", f"data.corpus=[{tmp_path}/none.jsonl]",
                 f"data.cache_dir={tmp_path}/cache", f"train.output_dir={tmp_path}/o"]) == 2
    assert "none.jsonl: file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point_runs_a_recipe(tmp_path, tiny_model, corpus_file):
    recipe = tmp_path / "r.yaml"
    cfg = tiny_config(tiny_model, corpus_file, tmp_path / "out")
    from retromae.config import dump_yaml

    dump_yaml(cfg, recipe)
    done = subprocess.run([sys.executable, "-m", "retromae", "pretrain", str(recipe), "train.max_steps=2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step      2/2" in done.stdout + done.stderr
    assert (tmp_path / "out" / "model" / "modules.json").is_file()


@pytest.mark.skipif(not BEIR.is_dir(), reason="../shared/data/beir is not present")
@pytest.mark.parametrize("collection, cut", [("nfcorpus", "passage"), ("cranfield", "packed")])
def test_pretrains_on_a_real_beir_corpus(tmp_path, tiny_model, collection, cut):
    from retromae.pretrain import run

    corpus = BEIR / collection / "corpus.jsonl"
    if not corpus.is_file():
        pytest.skip(f"{corpus} is not present")
    cfg = tiny_config(tiny_model, corpus, tmp_path, data={"cut": cut, "max_len": 96}, train={"max_steps": 3})
    result = run(cfg)
    assert result["steps"] == 3 and all(r["loss"] > 0 for r in result["history"])
    lines = sum(1 for _ in corpus.open())
    from retromae.data.store import build_example_store
    from retromae.modeling import load_tokenizer

    store = build_example_store(cfg.data, load_tokenizer(cfg.model))
    assert (len(store) == lines) if cut == "passage" else (len(store) >= lines)
