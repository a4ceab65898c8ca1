"""Inputs that gave a traceback or a silent wrong result (issue 19): each now gives one line naming what is wrong,
before any step; a tokenizer that cannot read the corpus is warned about with the share it measured."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retromae.cli import main

ROOT = Path(__file__).resolve().parents[1]


def recipe(tmp_path, model, corpus, name="r", **data) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({
        "model": {"name_or_path": str(model)},
        "data": {"corpus": [str(corpus)], "max_len": 48, "cache_dir": str(tmp_path / "cache"), **data},
        "train": {"per_device_batch_size": 4, "max_steps": 1, "report_to": "none", "mixed_precision": "no",
                  "output_dir": str(tmp_path / "runs" / name)}}))
    return str(path)


@pytest.fixture
def no_tokenizer(tiny_model, tmp_path) -> Path:
    """The tiny model's weights and config, without its tokenizer files."""
    folder = tmp_path / "weights_only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, folder / name)
    return folder


def test_model_folder_without_tokenizer_is_refused_before_loading(no_tokenizer, tiny_model, corpus_file, beir_task,
                                                                  tmp_path, capsys):
    assert main(["pretrain", recipe(tmp_path, no_tokenizer, corpus_file)]) == 2
    err = capsys.readouterr().err
    assert f"model.name_or_path='{no_tokenizer}': the folder {no_tokenizer} holds no tokenizer" in err
    assert not (tmp_path / "runs" / "r").exists(), "refused before the output folder is made"
    # evaluate used to score it with every word turned into [UNK]
    assert main(["evaluate", "--model", str(no_tokenizer), "--dataset", str(beir_task), "--precision", "no"]) == 2
    assert f"--model='{no_tokenizer}': the folder {no_tokenizer} holds no tokenizer" in capsys.readouterr().err
    # a separate tokenizer (model.tokenizer) makes the folder usable
    from retromae.pretrain import load_config, preflight

    preflight(load_config(recipe(tmp_path, no_tokenizer, corpus_file, "ok"), [f"model.tokenizer={tiny_model}"]))


def test_lengths_beyond_the_position_table_are_refused(tiny_model, corpus_file, beir_task, tmp_path, capsys):
    # the tiny model has 128 positions
    assert main(["pretrain", recipe(tmp_path, tiny_model, corpus_file), "data.max_len=129"]) == 2
    assert ("data.max_len=129 is more than the 128 positions of model " in capsys.readouterr().err)
    from retromae.pretrain import load_config, preflight

    preflight(load_config(recipe(tmp_path, tiny_model, corpus_file, "edge"), ["data.max_len=128"]))  # the limit: fine
    assert main(["evaluate", "--model", str(tiny_model), "--dataset", str(beir_task), "--passage-max-len", "2048"]) == 2
    assert "--passage-max-len=2048 is more than the 128 positions" in capsys.readouterr().err
    finetune = tmp_path / "f.yaml"
    finetune.write_text(json.dumps({"model": {"name_or_path": str(tiny_model)},
                                    "data": {"train": str(beir_task), "query_max_len": 200},
                                    "train": {"output_dir": str(tmp_path / "ft"), "report_to": "none",
                                              "mixed_precision": "no"}}))
    assert main(["finetune", str(finetune)]) == 2
    assert "data.query_max_len=200 is more than the 128 positions" in capsys.readouterr().err


def test_position_limit_of_models_that_count_from_the_padding_index():
    from transformers import BertConfig, RobertaConfig

    from retromae.inputs import position_limit

    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
    # RoBERTa: positions start at padding_idx + 1 = 2, so 514 rows hold 512 positions
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512


def test_a_folder_as_corpus_names_the_file_to_give(beir_task, tmp_path):
    from retromae.data.corpus import CorpusError, TextFields, check_sources

    with pytest.raises(CorpusError, match=rf"{beir_task}: is a folder, not a corpus file; give the corpus file in "
                                          rf"it: data.corpus=\[{beir_task / 'corpus.jsonl'}\]"):
        check_sources([str(beir_task)])
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": ["a text", "another"]}).save_to_disk(str(saved))
    with pytest.raises(CorpusError, match=r"saved row 0: no 'text' field \(fields: body\); set data.text_field"):
        check_sources([str(saved)], "auto", TextFields())
    check_sources([str(saved)], "auto", TextFields(text_field="body"))  # the right field: accepted


def test_zero_width_space_lines_are_empty_text(tmp_path):
    from retromae.data.corpus import BOUNDARY, CorpusError, TextFields, read_rows

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "\u200b\u200b \u200b"}) + "\n")
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: empty text \(only invisible characters such as zero-width "
                                          r"spaces\); remove it, or set data.skip_empty=true"):
        list(read_rows(str(jsonl), "jsonl", TextFields()))
    assert [t for t, _ in read_rows(str(jsonl), "jsonl", TextFields(skip_empty=True))] == ["fine"]
    tsv = tmp_path / "c.tsv"
    tsv.write_text("1\tfine\n2\t\ufeff\u200b\n")
    with pytest.raises(CorpusError, match=r"c\.tsv:2: empty text"):
        list(read_rows(str(tsv), "tsv", TextFields()))
    # in plain text a blank line separates documents; one of zero-width spaces is a blank line, not a text
    txt = tmp_path / "c.txt"
    txt.write_text("one\n\u200b\ntwo\n")
    assert list(read_rows(str(txt), "text", TextFields())) == [("one", None), BOUNDARY, ("two", None)]


def test_unknown_token_share_by_hand_and_the_warning(tmp_path, caplog):
    from transformers import BertTokenizerFast

    from retromae.inputs import unknown_share, warn_if_unreadable

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat"]) + "\n")
    tokenizer = BertTokenizerFast(str(vocab))
    # "the cat the dog" -> the, cat, the, [UNK]: 1 of 4; "cat" -> 0 of 1; special tokens not counted
    assert unknown_share(tokenizer, ["the cat the dog", "cat"]) == (pytest.approx(1 / 5), 2)
    with caplog.at_level(logging.WARNING, logger="retromae.inputs"):
        assert warn_if_unreadable(tokenizer, ["the cat the dog"], "my.txt") == pytest.approx(0.25)
    assert "my.txt: 25.0% of the tokens of 1 sampled texts are [UNK]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retromae.inputs"):
        warn_if_unreadable(tokenizer, ["the cat"] * 30 + ["dog"], "fine.txt")  # 1 of 61 tokens: 1.6%
    assert caplog.text == ""


def test_pretraining_and_evaluation_warn_on_a_corpus_the_tokenizer_cannot_read(tiny_model, beir_task, tmp_path,
                                                                               caplog):
    greek = tmp_path / "greek.txt"
    greek.write_text("Η γρήγορη καφέ αλεπού πηδάει πάνω από το τεμπέλικο σκυλί\n" * 20)
    from retromae.pretrain import check_corpus_is_readable, load_config
    from retromae.modeling import load_tokenizer

    cfg = load_config(recipe(tmp_path, tiny_model, greek))
    with caplog.at_level(logging.WARNING, logger="retromae.inputs"):
        check_corpus_is_readable(cfg.data, load_tokenizer(cfg.model))
    assert f"{greek}: " in caplog.text and "% of the tokens of 20 sampled texts are [UNK]" in caplog.text
    caplog.clear()
    from retromae.retrieval.encoder import EncodeConfig
    from retromae.retrieval.evaluate import evaluate_model

    with caplog.at_level(logging.WARNING, logger="retromae.inputs"):
        evaluate_model(str(tiny_model), str(beir_task), "test", EncodeConfig(precision="no"))
    assert "[UNK]" not in caplog.text, "the docstrings the tokenizer was trained on read fine"


def test_judgements_that_name_no_document_of_the_corpus_are_an_error(beir_task, tmp_path, caplog):
    from retromae.data.corpus import CorpusError
    from retromae.retrieval.data import load_dataset

    task = tmp_path / "task"
    shutil.copytree(beir_task, task)
    (task / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tMED-1\t1\nq1\tMED-2\t1\n")
    with pytest.raises(CorpusError, match=r"test\.tsv:2: none of the 2 judgements names a document of the corpus "
                                          r"\(e\.g\. 'MED-1'\), so every score would be 0"):
        load_dataset(str(task))
    # some missing (ArguAna has a few): kept, with a warning
    (task / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tMED-1\t1\nq1\tdoc1\t1\n")
    with caplog.at_level(logging.WARNING):
        assert load_dataset(str(task)).qrels == {"q0": {"MED-1": 1}, "q1": {"doc1": 1}}
    assert "1 of 2 judgements name documents that are not in the corpus" in caplog.text


def test_the_export_declares_the_length_it_was_pretrained_at(tiny_model, corpus_file, tmp_path):
    from conftest import tiny_config
    from retromae.pretrain import run

    # the tiny model reads 128 tokens; pretrained at 48, its export says 48 (it said 128 before)
    cfg = tiny_config(tiny_model, corpus_file, tmp_path, data={"max_len": 48}, train={"max_steps": 1})
    model = run(cfg)["model_dir"]
    from sentence_transformers import SentenceTransformer

    from retromae.retrieval.encoder import EncodeConfig, TextEncoder

    assert SentenceTransformer(model, device="cpu").max_seq_length == 48
    encoder = TextEncoder(model, EncodeConfig(precision="no"), device="cpu")
    assert (encoder.cfg.query_max_len, encoder.cfg.passage_max_len) == (48, 48), "what `evaluate` encodes with"


def test_bm25_prints_no_debug_line(beir_task):
    done = subprocess.run([sys.executable, "-m", "retromae", "evaluate", "--model", "bm25", "--dataset",
                           str(beir_task)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DEBUG" not in done.stderr + done.stdout and "| docstrings |" in done.stdout


def test_pyproject_licence_gives_setuptools_no_warning(tmp_path):
    import warnings

    pytest.importorskip("setuptools", minversion="77")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "retromae").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), str(tmp_path / "pyproject.toml"))
    assert not [str(w.message) for w in caught if "license" in str(w.message).lower()]


@pytest.mark.parametrize("vocabulary", ["tokenizer.json", "vocab.txt", "vocab.json", "spm.model",
                                        "sentencepiece.bpe.model", "tokenizer.model"])
def test_any_vocabulary_file_makes_a_tokenizer_folder(tmp_path, vocabulary):
    from retromae.config import ConfigError
    from retromae.inputs import check_tokenizer_files

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        check_tokenizer_files(str(tmp_path), "--model")  # a tokenizer_config.json alone holds no vocabulary
    (tmp_path / vocabulary).write_text("x")
    check_tokenizer_files(str(tmp_path), "--model")
