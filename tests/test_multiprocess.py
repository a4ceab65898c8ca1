"""Two processes (gloo, on the CPU) compute the same losses, gradients and weights as one process holding the
same global batch: masks are seeded per example and every named loss is a global token mean."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

PROBE = Path(__file__).resolve().parent / "helpers" / "ddp_probe.py"


def launch(args: list[str], processes: int, tmp_path: Path) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if processes == 1:
        command = [sys.executable, str(PROBE), *args]
    else:
        # `--cpu --num_processes 2` silently starts one process; --multi_gpu with ACCELERATE_USE_CPU starts two (gloo).
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29517", str(PROBE), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, corpus_file, tmp_path):
    launch([str(tiny_model), str(corpus_file), str(tmp_path / "one"), "8"], 1, tmp_path)
    launch([str(tiny_model), str(corpus_file), str(tmp_path / "two"), "4"], 2, tmp_path)
    one = json.loads((tmp_path / "one" / "record.json").read_text())
    two = json.loads((tmp_path / "two" / "record.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    worst_ours, worst_naive = 0.0, 0.0
    for s1, s2 in zip(one["steps"], two["steps"]):
        assert s2["local_counts"][0] != s2["local_counts"][1], "processes should hold different token counts"
        for name in s1["means"]:
            worst_ours = max(worst_ours, abs(s2["means"][name] - s1["means"][name]))
            worst_naive = max(worst_naive, abs(s2["naive"][name] - s1["means"][name]))
    assert worst_ours < 5e-6, f"2-process global token means differ from 1 process by {worst_ours}"
    # Averaging per-process means instead would be off by far more than float noise: the test can tell.
    assert worst_naive > 10 * max(worst_ours, 1e-6), (worst_naive, worst_ours)
    t1 = safetensors.torch.load_file(str(tmp_path / "one" / "tensors.safetensors"))
    t2 = safetensors.torch.load_file(str(tmp_path / "two" / "tensors.safetensors"))
    assert t1.keys() == t2.keys() and any(k.startswith("grad.") for k in t1)
    for k in t1:
        # Gradients to float tolerance. Weights after 3 AdamW steps at lr 2e-2 (each moves up to 6e-2): Adam divides
        # by sqrt(v), which turns float noise in near-zero gradients into ~1e-5 differences; 2e-4 is 0.3% of a move.
        atol = 1e-5 if k.startswith("grad.") else 2e-4
        assert torch.allclose(t1[k], t2[k], atol=atol, rtol=1e-4), f"{k}: max diff {(t1[k] - t2[k]).abs().max()}"
