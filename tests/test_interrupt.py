"""SIGTERM / SIGINT stop a run after the step in progress, with a checkpoint every process agrees on, one line
saying how to resume, and exit status 128 + the signal; resumed, the run ends with the weights of a run never
interrupted."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import free_port, tiny_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(ROOT)}


def weights(path: Path) -> dict:
    return safetensors.torch.load_file(str(path / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: the resumed run's weights differ"


def test_sigint_in_one_process_stops_after_the_step_with_a_checkpoint(tiny_model, corpus_file, tmp_path):
    from retromae.interrupt import TrainingInterrupted
    from retromae.pretrain import build_batches, build_objective, run
    from retromae.trainer import Trainer, make_accelerator

    common = {"max_steps": 6, "save_steps": 0}
    run(tiny_config(tiny_model, corpus_file, tmp_path / "a", model={"dropout": 0.1}, train=common))
    cfg = tiny_config(tiny_model, corpus_file, tmp_path / "b", model={"dropout": 0.1}, train=common)
    accelerator = make_accelerator(cfg.train)
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    objective, tokenizer = build_objective(cfg)
    batches = build_batches(cfg, tokenizer, accelerator)

    def press_ctrl_c(trainer):  # during step 3's callbacks: the signal is seen at step 4's end
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    trainer = Trainer(objective, batches, cfg.train, accelerator, run_config={}, callbacks=[press_ctrl_c])
    # as at a terminal (a background job starts with SIGINT ignored, which training leaves ignored)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            trainer.train()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C means KeyboardInterrupt again"
    finally:
        signal.signal(signal.SIGINT, outside)
    assert (stopped.value.step, stopped.value.exit_code) == (4, 130)
    assert stopped.value.checkpoint == str(tmp_path / "b" / "checkpoints" / "checkpoint-4")
    resumed = tiny_config(tiny_model, corpus_file, tmp_path / "b", model={"dropout": 0.1},
                          train={**common, "resume": "latest"})
    assert run(resumed)["steps"] == 6
    assert_same_weights(weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model"))


def _children_by_rank(pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes a launcher started (read from /proc: their RANK variable)."""
    found = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in open(f"/proc/{pid}/task/{task}/children").read().split():
            env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
            rank = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")), None)
            if rank is not None:
                found[int(rank)] = int(child)
    return found


def _launch(tiny_model, corpus_file, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "-m", "retromae", "pretrain", str(ROOT / "pretrain" / "demo.yaml"),
            f"model.name_or_path={tiny_model}", f"data.corpus=[{corpus_file}]", "data.max_len=64",
            f"data.cache_dir={out.parent / 'cache'}", "train.per_device_batch_size=4", "train.max_steps=60",
            "train.save_steps=0", "train.logging_steps=1", "train.mixed_precision=no", "train.report_to=none",
            "train.timeout_minutes=1",  # a disagreement between the ranks fails in a minute rather than hanging
            f"train.output_dir={out}", *extra]


@pytest.mark.slow
def test_sigterm_to_one_process_of_a_launch_stops_both_and_resumes_exactly(tiny_model, corpus_file, tmp_path):
    straight = subprocess.run(_launch(tiny_model, corpus_file, tmp_path / "straight"), env=ENV, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "stopped"
    run = subprocess.Popen(_launch(tiny_model, corpus_file, out), env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, signalled = [], None
    try:
        deadline = time.monotonic() + 600
        for line in run.stdout:
            lines.append(line)
            if signalled is None and re.search(r"step +3/60", line):
                # rank 1 alone, as when one node's processes get the signal first: rank 0 learns it from the vote
                os.kill(_children_by_rank(run.pid)[1], signal.SIGTERM)
                signalled = time.monotonic()
            assert time.monotonic() < deadline
        run.wait(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    text = "".join(lines)
    assert signalled is not None, text[-3000:]
    stopped = re.findall(r"^retromae: stopped by SIGTERM after step (\d+) of 60; its checkpoint is (\S+)\. To resume, "
                         r"run the same command with train\.resume=latest$", text, re.M)
    assert len(stopped) == 1, text[-3000:]  # one line, from the main process
    step = int(stopped[0][0])
    assert 3 <= step < 60 and stopped[0][1] == str(out / "checkpoints" / f"checkpoint-{step}")
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"checkpoint-{step}"], "both ranks saved one step"
    assert not (out / "model").exists() and "exitcode  : 143" in text
    worker_lines = [line for line in lines if "retromae/" in line and "File " in line]
    assert not worker_lines, "no traceback from our code: " + "".join(worker_lines)
    resumed = subprocess.run(_launch(tiny_model, corpus_file, out, "train.resume=latest"), env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{step}'} at step {step}" in resumed.stderr
    assert_same_weights(weights(tmp_path / "straight" / "model"), weights(out / "model"))


def test_the_vote_agrees_on_the_step_also_when_read_one_step_late(monkeypatch):
    """The GPU form of the vote (read one step late so the host never waits), on the CPU: a signal seen during step
    k stops every process after step k + 1, and the all-reduce's MAX is what decides."""
    import types

    import torch.distributed as dist

    from retromae.interrupt import StopSignals, StopVote

    others = {"signal": 0}  # what the other process contributes to the all-reduce

    def all_reduce(tensor, op):
        assert op == dist.ReduceOp.MAX
        tensor.clamp_(min=others["signal"])

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    accelerator = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    signals = StopSignals(announce=False)
    late, now = StopVote(accelerator, signals, deferred=True), StopVote(accelerator, signals, deferred=False)
    assert [late(), late()] == [0, 0] and now() == 0
    others["signal"] = int(signal.SIGTERM)  # only the other process was signalled, during this step
    assert now() == signal.SIGTERM, "read at once: stop after this step"
    assert late() == 0, "read one step late: this step's vote is not read yet"
    assert late() == signal.SIGTERM, "... and is, after the next step, on every process alike"


def test_a_signal_ignored_on_entry_stays_ignored():
    from retromae.interrupt import StopSignals

    outside = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for `retromae pretrain ... &`
    try:
        with StopSignals(announce=False) as signals:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.received == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outside)
