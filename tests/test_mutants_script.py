"""scripts/mutants.py's bookkeeping (`make mutants`): the table row, the tally, and the --survivors verdict edits,
on hand-made mutmut results (mutmut itself is not needed: its exit-code table is faked)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutants_script", ROOT / "scripts" / "mutants.py")
mutants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutants)


def test_row_counts_timeouts_as_kills_and_a_stopped_run_by_what_it_checked():
    # 6 killed + 1 timeout of 10 non-equivalent, 2 not checked: 7 / 8 = 87.5% of those checked; 2 equivalent apart
    counts = Counter({"killed": 6, "timeout": 1, "survived": 1, "not checked": 2, "equivalent": 2})
    assert mutants.row("m", counts) == ("| m | 12 | 2 | 7 / 8 | **87.5%** of those checked | "
                                        "2 not checked, 1 survived |")
    assert mutants.row("m", Counter({"killed": 3})) == "| m | 3 | 0 | 3 / 3 | **100.0%** | - |"


def test_tally_sets_listed_equivalents_apart_unless_the_tests_kill_them():
    shown = "    a.x_f__mutmut_1: killed\n    a.x_f__mutmut_2: survived\n    a.x_f__mutmut_3: survived\n" \
            "    a.x_f__mutmut_4: killed\n"
    equivalent = {"a.x_f__mutmut_3": "why", "a.x_f__mutmut_4": "stale"}
    assert mutants.tally(shown, equivalent) == Counter({"killed": 2, "survived": 1, "equivalent": 1})


def _fake_mutmut(monkeypatch):
    stats = types.ModuleType("mutmut.stats")
    stats.status_by_exit_code = {1: "killed", 0: "survived", mutants.SKIPPED: "skipped"}
    monkeypatch.setitem(sys.modules, "mutmut", types.ModuleType("mutmut"))
    monkeypatch.setitem(sys.modules, "mutmut.stats", stats)


def _results(tmp_path) -> Path:
    folder = tmp_path / "mutants"
    (folder / "pkg").mkdir(parents=True)
    (folder / "mutmut-stats.json").write_text(json.dumps({"config_fingerprint": "x", "tests": []}))
    meta = folder / "pkg" / "m.py.meta"
    meta.write_text(json.dumps({"exit_code_by_key": {"k": 1, "s": 0, "u": None}}))
    return meta


def test_survivors_reopens_the_not_killed_and_keeps_the_unchecked_for_a_full_run(tmp_path, monkeypatch):
    _fake_mutmut(monkeypatch)
    meta = _results(tmp_path)
    assert mutants.reopen_survivors(tmp_path) == 1
    assert json.loads(meta.read_text())["exit_code_by_key"] == {"k": 1, "s": None, "u": mutants.SKIPPED}
    assert "config_fingerprint" not in json.loads((tmp_path / "mutants" / "mutmut-stats.json").read_text())
    mutants.restore_unchecked(tmp_path)  # after the run: the skipped one is "not checked" again, the list gone
    assert json.loads(meta.read_text())["exit_code_by_key"] == {"k": 1, "s": None, "u": None}
    assert not (tmp_path / "mutants" / mutants.UNCHECKED).exists() and not list(meta.parent.glob("*.tmp"))


def test_survivors_with_unchecked_tests_those_too(tmp_path, monkeypatch):
    _fake_mutmut(monkeypatch)
    meta = _results(tmp_path)
    assert mutants.reopen_survivors(tmp_path, unchecked_too=True) == 2
    assert json.loads(meta.read_text())["exit_code_by_key"] == {"k": 1, "s": None, "u": None}


def test_a_pinned_module_file_split_by_part_joins_its_selection():
    files, tests = mutants.selection("evaluate")
    assert files == ["retromae/retrieval/evaluate.py", "retromae/retrieval/hybrid.py"]
    assert {"tests/test_pinned_evaluate.py", "tests/test_pinned_evaluate_more.py",
            "tests/test_pinned_evaluate_hybrid.py"} <= set(tests)
    assert "tests/test_pinned_base_kernels.py" in mutants.selection("objectives/base")[1]
