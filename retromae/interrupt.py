"""Stopping a run on SIGTERM or SIGINT (Ctrl-C) without losing it: clusters preempt jobs with SIGTERM and a grace
period, and a user presses Ctrl-C; either used to lose the work since the last checkpoint, with a long traceback.

While `Trainer.train` runs, both signals are only noted (`StopSignals`). At the end of every optimizer step the
processes vote (`StopVote`: an all-reduce of the signal each has seen), so that all of them stop after the same step,
even when only one was signalled (a node's processes can be signalled at different moments, or one alone). They
then save a checkpoint together and the run ends with `TrainingInterrupted`, which the command line turns into one
line saying how to resume, and exit status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell
reports a process a signal ended. The save must fit in the grace period (`accelerate launch` kills its workers 30 s
after passing a signal on; Slurm's KillWait is 30 s by default).
"""

from __future__ import annotations

import os
import signal
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """A run stopped by a signal after saving the checkpoint of `step` (on every process)."""

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: str):
        self.signum, self.step, self.total_steps, self.checkpoint = signum, step, total_steps, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of {total_steps}; its "
                         f"checkpoint is {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Within the block, SIGTERM and SIGINT set `received` (the first one's number) instead of ending the process.

    Only this process notes them: DataLoader workers forked inside the block inherit the handler and ignore the
    signals (their process group gets Ctrl-C's SIGINT too; dying, they would fail the step being finished). On the
    main process the first signal is acknowledged at once on stderr, with os.write (a signal handler may run in the
    middle of a print)."""

    def __init__(self, announce: bool = True):
        self.received = 0
        self.announce = announce
        self._previous: dict = {}
        self._pid = os.getpid()

    def _note(self, signum, frame) -> None:
        if os.getpid() != self._pid or self.received:
            return  # a forked worker, or a repeated signal (accelerate's launcher passes Ctrl-C on once more)
        self.received = signum
        if self.announce:
            os.write(2, f"\n{signal.Signals(signum).name} received: stopping after this step, with a "
                        "checkpoint\n".encode())

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from there
            for s in SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # ignored on entry (`cmd &`, nohup): left ignored
                    self._previous[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class StopVote:
    """After each step, whether any process has received a stop signal: the same answer on every process for the
    same step.

    One all-reduce (MAX) of a single number per step. On GPUs its result is read one step late, from a copy into
    pinned memory behind a CUDA event, so that the vote never makes the host wait for the step in flight (reading a
    device value at once would synchronise every step); every process reads the vote of the same step, so they
    still agree. On CPUs, or with one process, the answer is immediate. `deferred` forces either way (tests)."""

    def __init__(self, accelerator, signals: StopSignals, deferred: bool | None = None):
        self.accelerator, self.signals = accelerator, signals
        self.device = accelerator.device
        self.deferred = (accelerator.num_processes > 1 and self.device.type == "cuda") if deferred is None else deferred
        self._pending = None  # (host copy, event) of the last step's vote, when deferred

    def __call__(self) -> int:
        """The signal number to stop for (0: go on); call it on every process at every step boundary."""
        if self.accelerator.num_processes == 1:
            return self.signals.received
        import torch.distributed as dist

        # torch.full, not torch.tensor: a fill on the device, where a copy from the host would wait for the stream
        flag = torch.full((1,), self.signals.received, dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not self.deferred:
            return int(flag.item())
        previous, self._pending = self._pending, self._copy_to_host(flag)
        if previous is None:
            return 0
        host, done = previous
        done.synchronize()  # the step before this one: finished by now
        return int(host.item())

    def _copy_to_host(self, flag: torch.Tensor):
        if flag.device.type != "cuda":
            return flag.clone(), _Done()
        host = torch.empty(1, dtype=torch.int64, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event


class _Done:
    """An event that has happened (the host copy of a CPU tensor is complete at once)."""

    def synchronize(self) -> None:
        pass
