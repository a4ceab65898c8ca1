"""The demo's closing lines: each pipeline's gain over the model as it ships, the better one named, and a headline
gain= that is RetroMAE's own (it credited the best row, the control, to RetroMAE); how to reach `retromae` after
`make demo`."""

import os
import sys
from pathlib import Path

import pytest

from retromae.demo import gain_lines, path_hint


def test_gain_line_credits_each_pipeline_with_its_own_gain():
    # the README's run: off the shelf 0.4422, RetroMAE + fine-tuning 0.5037, fine-tuning only 0.5199
    gains = gain_lines(0.4422, 0.5037, 0.5199, 1200)
    assert gains["best"] == "control"
    assert (gains["retromae"], gains["control"]) == (pytest.approx(0.0615), pytest.approx(0.0777))
    text = "\n".join(gains["lines"])
    assert "  RetroMAE pretraining + fine-tuning     +0.0615\n" in text + "\n"
    assert "  fine-tuning only (the control)         +0.0777   <- best" in text
    assert "best: fine-tuning only (the control); RetroMAE pretraining cost 0.0162 in this run" in text
    assert gains["lines"][-1].startswith("gain=0.0615 (RetroMAE pretraining + fine-tuning over the model as it ships;"
                                         " fine-tuning alone: +0.0777)")
    # and when pretraining does help, it is named the better one
    assert "RetroMAE pretraining added 0.0100" in "\n".join(gain_lines(0.40, 0.46, 0.45, 10)["lines"])


def test_path_hint_when_retromae_is_not_on_path(monkeypatch, tmp_path):
    bin_dir = Path(sys.executable).parent
    monkeypatch.setenv("PATH", str(tmp_path))  # as after `make demo`: .venv/bin is not on PATH
    hint = path_hint()
    shown = os.path.relpath(bin_dir)
    shown = str(bin_dir) if shown.startswith("..") else shown if shown.startswith(".") else f"./{shown}"
    assert f"`source {shown}/activate` puts `retromae` on your PATH (or call {shown}/retromae)" in hint
    (tmp_path / "retromae").write_text("#!/bin/sh\n")
    (tmp_path / "retromae").chmod(0o755)  # another retromae on PATH is not the one the demo ran with
    assert "source" in path_hint()
    if (bin_dir / "retromae").is_file():
        monkeypatch.setenv("PATH", str(bin_dir))
        assert "source" not in path_hint() and "Your own data" in path_hint()


def test_path_hint_names_a_venv_in_the_current_folder_relatively(monkeypatch, tmp_path):
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", "/nowhere")
    monkeypatch.chdir(tmp_path)
    assert path_hint().startswith("next: `source .venv/bin/activate` puts `retromae` on your PATH (or call "
                                  ".venv/bin/retromae)")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # outside the current folder: its absolute path, not ../.venv/bin
    assert f"`source {venv_bin}/activate`" in path_hint()
