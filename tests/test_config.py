"""Configs: YAML onto dataclasses, overrides, and errors that name the file, the line and the key."""

import pytest

from retromae.config import ConfigError, field_docs
from retromae.data.examples import DataConfig
from retromae.modeling import ModelConfig
from retromae.pretrain import PretrainConfig, load_config
from retromae.trainer import TrainConfig


def test_recipe_loads_with_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  name_or_path: some/model\nobjective:\n  name: retromae\n  decoding: basic\ntrain:\n  lr: 1e-4\n")
    cfg = load_config(str(p), ["train.lr=2e-5", "objective.decoder_mask_ratio=0.4", "data.corpus=[a.jsonl, b.txt]"])
    assert cfg.train.lr == 2e-5 and cfg.objective.decoding == "basic" and cfg.objective.decoder_mask_ratio == 0.4
    assert cfg.data.corpus == ["a.jsonl", "b.txt"] and cfg.model.name_or_path == "some/model"
    assert type(cfg.objective).__name__ == "RetroMAEConfig"


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  name_or_path: x\ntrain:\n  lr: 1.0e-4\n  lerning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:5: unknown key 'train.lerning_rate'\..*Known keys in train: .*lr"):
        load_config(str(p))
    p.write_text("modle:\n  name_or_path: x\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:1: unknown key 'modle'\. Did you mean 'model'\?"):
        load_config(str(p))


def test_bad_values_are_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  per_device_batch_size: many\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:2: 'train.per_device_batch_size' must be an integer"):
        load_config(str(p))
    p.write_text("train:\n  mixed_precision: fp8\n")
    with pytest.raises(ConfigError, match="mixed_precision='fp8'"):
        load_config(str(p))
    p.write_text("objective:\n  name: dupmea\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:2: objective.name='dupmea' is not a known objective"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:2: not valid YAML"):
        load_config(str(p))


def test_every_field_has_a_default_and_a_doc():
    for cls in (PretrainConfig, ModelConfig, DataConfig, TrainConfig):
        docs = field_docs(cls)
        import dataclasses

        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no one-line doc"
    from retromae.objectives import objective_class

    for name in ("mlm", "retromae"):
        cls = objective_class(name).Config
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name) or f.name in field_docs(cls.__mro__[1]), f"{cls.__name__}.{f.name}"


def test_shipped_recipes_are_valid():
    from pathlib import Path

    from retromae.finetune.run import load_finetune_config
    from retromae.retrieval.evaluate import load_suite

    root = Path(__file__).resolve().parents[1]
    recipes = sorted((root / "pretrain").glob("*.yaml"))
    assert len(recipes) >= 8
    for recipe in recipes:
        load_config(str(recipe))
    for recipe in sorted((root / "finetune").glob("*.yaml")):
        load_finetune_config(str(recipe))
    for suite in sorted((root / "eval").glob("*.yaml")):
        assert load_suite(str(suite)).datasets
