"""Two processes (gloo, on the CPU) compute the same losses, gradients and weights as one process holding the same
global batch, also when each accumulates two micro-batches, and when the two processes are two "machines"
(`accelerate launch --num_machines 2 --machine_rank ...` on localhost): masks are seeded per example and every
named loss is a global token mean. And a run killed with SIGKILL, once halfway through a checkpoint and once at a
random moment, resumes to the weights of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import accelerate_launch, free_port

PROBE = Path(__file__).resolve().parent / "helpers" / "ddp_probe.py"
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def one_process(tiny_model, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    done = subprocess.run([sys.executable, str(PROBE), str(tiny_model), str(corpus_file), str(out), "8"], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return out


def compare(one: Path, two: Path, naive_differs: bool = True, weight_atol: float = 2e-4) -> None:
    first = json.loads((one / "record.json").read_text())
    second = json.loads((two / "record.json").read_text())
    assert (first["num_processes"], second["num_processes"]) == (1, 2)
    worst_ours, worst_naive = 0.0, 0.0
    for s1, s2 in zip(first["steps"], second["steps"]):
        assert s2["local_counts"][0] != s2["local_counts"][1], "processes should hold different token counts"
        for name in s1["means"]:
            worst_ours = max(worst_ours, abs(s2["means"][name] - s1["means"][name]))
            worst_naive = max(worst_naive, abs(s2["naive"][name] - s1["means"][name]))
    assert worst_ours < 5e-6, f"2-process global token means differ from 1 process by {worst_ours}"
    if naive_differs:  # averaging per-process means instead would be off by far more than float noise
        assert worst_naive > 10 * max(worst_ours, 1e-6), (worst_naive, worst_ours)
    t1 = safetensors.torch.load_file(str(one / "tensors.safetensors"))
    t2 = safetensors.torch.load_file(str(two / "tensors.safetensors"))
    assert t1.keys() == t2.keys() and any(k.startswith("grad.") for k in t1)
    for k in t1:
        # Gradients to float tolerance. Weights after 3 AdamW steps at lr 2e-2 (each moves up to 6e-2): Adam divides
        # by sqrt(v), which turns float noise in near-zero gradients into ~1e-5 differences; 2e-4 is 0.3% of a move.
        atol = 1e-5 if k.startswith("grad.") else weight_atol
        assert torch.allclose(t1[k], t2[k], atol=atol, rtol=1e-4), f"{k}: max diff {(t1[k] - t2[k]).abs().max()}"


@pytest.mark.slow
def test_two_processes_accumulating_two_micro_batches_equal_one(one_process, tiny_model, corpus_file, tmp_path):
    """1 process x 8 texts x 1 micro-batch == 2 processes x 2 texts x 2 micro-batches."""
    done = accelerate_launch([str(PROBE), str(tiny_model), str(corpus_file), str(tmp_path / "two"), "2", "2"],
                             cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # gradients as strictly as ever; the weights after 3 AdamW steps within 2% of the largest move (3 x lr 2e-2):
    # summing four micro-batches in another order leaves ~1e-9 differences in gradients near Adam's epsilon, and
    # g / sqrt(v) turns those into up to ~4e-4 (measured) on a few such weights
    compare(one_process, tmp_path / "two", weight_atol=1.2e-3)


def launch_machines(args: list[str], cwds: list[Path], logs: Path, timeout: float = 600) -> tuple[list[int], list[str]]:
    """The README's multi-node launch as 2 "machines" x 1 process on localhost, each started in its own folder:
    (exit codes, the end of each machine's log). A machine still running at `timeout` is killed (code None)."""
    machines, port = [], str(free_port())
    for rank, cwd in enumerate(cwds):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
        # each machine's output goes to a file: a pipe read only after the other machine is done could fill up and
        # stall this machine in its next write, and with it the other machine in their next collective
        log = open(logs / f"machine{rank}.log", "w")
        machines.append((subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                          start_new_session=True), log))
    deadline = time.monotonic() + timeout
    while any(m.poll() is None for m, _ in machines) and time.monotonic() < deadline:
        if any(m.poll() not in (None, 0) for m, _ in machines):
            time.sleep(5)  # one machine failed: give the other a moment to say why, then stop it
            break
        time.sleep(0.2)
    codes = []
    for machine, log in machines:
        if machine.poll() is None:
            os.killpg(machine.pid, signal.SIGKILL)
            machine.wait()
            codes.append(None)
        else:
            codes.append(machine.returncode)
        log.close()
    return codes, [(logs / f"machine{rank}.log").read_text()[-3000:] for rank in range(len(cwds))]


@pytest.mark.slow
def test_two_machines_equal_one_process(one_process, tiny_model, corpus_file, tmp_path):
    """The README's multi-node launch, as 2 machines x 1 process on localhost."""
    codes, logs = launch_machines([str(PROBE), str(tiny_model), str(corpus_file), str(tmp_path / "nodes"), "4"],
                                  [tmp_path, tmp_path], tmp_path)
    assert codes == [0, 0], logs
    compare(one_process, tmp_path / "nodes")


@pytest.mark.slow
@pytest.mark.parametrize("unshared", ["train.output_dir", "data.cache_dir"])
def test_machines_that_see_different_folders_are_refused(tiny_model, corpus_file, tmp_path, unshared):
    """Two "machines" started in different folders with a relative folder setting see two different folders. The
    output folder: machine 0 resumed its checkpoint while machine 1 started afresh, and DDP averaged the gradients
    of different weights, silently. The example cache: each machine waited for the other's shards in its own
    folder, for 10 hours. Now the launch stops at once, saying which folder the machines do not share."""
    homes = [tmp_path / "m0", tmp_path / "m1"]
    for home in homes:
        home.mkdir()
    shared = {"train.output_dir": str(tmp_path / "out"), "data.cache_dir": str(tmp_path / "cache")}
    shared[unshared] = "local"
    recipe = str(Path(__file__).resolve().parents[1] / "pretrain" / "retromae_nfcorpus_small.yaml")
    args = [f"model.name_or_path={tiny_model}", f"data.corpus=[{corpus_file}]", "data.max_len=64",
            "train.per_device_batch_size=4", "train.max_steps=6", "train.save_steps=2", "train.logging_steps=1",
            "train.report_to=none", *[f"{k}={v}" for k, v in shared.items()]]
    if unshared == "train.output_dir":  # machine 0 has a checkpoint to resume, machine 1 has none
        first = accelerate_launch(["-m", "retromae", "pretrain", recipe, *args, "train.stop_at_step=2"], cwd=homes[0])
        assert first.returncode == 0, first.stderr[-3000:]
        args.append("train.resume=latest")
    codes, logs = launch_machines(["-m", "retromae", "pretrain", recipe, *args], homes, tmp_path, timeout=240)
    assert codes[0] not in (0, None) and codes[1] not in (0, None), (codes, logs)
    assert f"{unshared}=local" in logs[0] and "do not see the same folder" in logs[0], logs[0]


def pretrain(tiny_model, corpus_file, out: Path, *extra: str, fault: str | None = None, popen=False):
    args = ["-m", "retromae", "pretrain", str(Path(__file__).resolve().parents[1] / "pretrain" /
                                             "retromae_nfcorpus_small.yaml"),
            f"model.name_or_path={tiny_model}", f"data.corpus=[{corpus_file}]", "data.max_len=64",
            f"data.cache_dir={out.parent / 'cache'}", "model.dropout=0.1", "train.per_device_batch_size=4",
            "train.max_steps=30", "train.save_steps=5", "train.save_total_limit=8", "train.logging_steps=1",
            f"train.output_dir={out}", *extra]
    env = {**ENV, **({"RETROMAE_FAULT": fault} if fault else {})}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), *args]
    if popen:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def modernbert_model(docstrings, tmp_path_factory):
    """A tiny ModernBERT (rotary, pre-norm, sliding windows: another encoder and decoder shape than BERT's)."""
    from retromae.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_modernbert"), [d["text"] for d in docstrings],
                           family="modernbert")


@pytest.fixture(params=["bert", "modernbert"])
def family_model(request, tiny_model):
    return tiny_model if request.param == "bert" else request.getfixturevalue("modernbert_model")


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_weights(family_model, corpus_file, tmp_path):
    tiny_model = family_model
    straight = pretrain(tiny_model, corpus_file, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-4000:]
    out = tmp_path / "killed"
    # 1. SIGKILL halfway through writing checkpoint 10 (the state is saved, nothing renamed yet)
    first = pretrain(tiny_model, corpus_file, out, fault="checkpoint:10")
    assert first.returncode != 0 and (out / "checkpoints" / ".checkpoint-10.tmp").is_dir()
    assert not (out / "checkpoints" / "checkpoint-10").exists()
    # 2. resumed from checkpoint 5, then SIGKILL (the launcher and both processes) at a random moment after
    #    checkpoint 15, well before the end
    run = pretrain(tiny_model, corpus_file, out, "train.resume=latest", popen=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "checkpoint-15").is_dir() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (out / "checkpoints" / "checkpoint-15").is_dir(), "the resumed run reached checkpoint 15"
    delay = random.Random(os.getpid()).uniform(0.0, 0.3)
    print(f"killing {delay:.3f} s after checkpoint 15")  # shown by pytest if the test fails, to reproduce it
    time.sleep(delay)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    assert not (out / "model").exists(), "the run was killed before its end"
    # 3. resumed to the end
    last = pretrain(tiny_model, corpus_file, out, "train.resume=latest")
    assert last.returncode == 0, last.stderr[-4000:]
    a = safetensors.torch.load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = safetensors.torch.load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: the resumed run's weights differ"
    assert not list(out.rglob(".*.tmp")), "the killed runs' debris is gone"


@pytest.mark.slow
@pytest.mark.parametrize("objective", [{"name": "retromae"},
                                       {"name": "cocondenser", "skip_from": 1, "head_layers": 1, "span_tokens": 12}],
                         ids=["retromae", "cocondenser"])
def test_two_processes_equal_one_on_modernbert(modernbert_model, corpus_file, tmp_path, objective):
    """ModernBERT's decoders (rotary, pre-norm) and coCondenser's spans gathered across processes: 2 processes x 4
    texts compute 1 process x 8 texts' losses and gradients."""
    family_model = modernbert_model
    spec = json.dumps(objective)
    done = subprocess.run([sys.executable, str(PROBE), str(family_model), str(corpus_file), str(tmp_path / "one"), "8",
                           "1", spec], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    done = accelerate_launch([str(PROBE), str(family_model), str(corpus_file), str(tmp_path / "two"), "4", "1", spec],
                             cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # losses and gradients as strictly as for BERT; weights after 3 AdamW steps within 2% of the largest move: Adam's
    # g / sqrt(v) turns float noise in near-zero gradients into up to 2.2e-4 here (measured, coCondenser)
    compare(tmp_path / "one", tmp_path / "two", weight_atol=1e-3)
