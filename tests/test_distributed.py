"""How the processes of a launch wait for each other (2 CPU processes under `accelerate launch`): the configured
timeout reaches the process group that evaluate and mine create, and a step only the main process does is waited
for without a collective, however long it takes, with its error passed on."""

import json
from pathlib import Path

import pytest

from conftest import accelerate_launch

PROBE = Path(__file__).resolve().parent / "helpers" / "wait_probe.py"


@pytest.mark.slow
def test_the_configured_timeout_reaches_the_process_group(tmp_path):
    done = accelerate_launch([str(PROBE), str(tmp_path), "0.05", "collective"], timeout=300)
    records = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)
               if (tmp_path / f"rank{r}.json").is_file()}
    assert 1 in records, done.stdout[-2000:] + done.stderr[-3000:]
    assert records[1]["barrier"] != "passed", "a 3 s timeout: process 1 gives up before process 0 arrives (8 s)"
    assert records[1]["seconds"] < 7.5, records[1]


@pytest.mark.slow
def test_a_main_only_step_is_waited_for_without_a_collective(tmp_path):
    done = accelerate_launch([str(PROBE), str(tmp_path), "0.05", "main-only"], timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["result"] == {"answer": 42}, "process 1 gets the main process's result"
        assert record["error"] == "the main process's step failed: data/x.tsv:3: bad line"
        assert record["seconds"] >= 8, "it waited for the whole step (8 s), beyond the 3 s timeout"
