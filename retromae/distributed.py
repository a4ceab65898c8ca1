"""The launch's process layout, for code that needs no Accelerator (encoding, evaluation), and the ways processes
wait for each other.

Two ways to wait, for two kinds of step:
- a collective (a barrier, a broadcast) for steps that take every process about as long: it gives up after the
  process group's timeout, `train.timeout_minutes` or `--timeout-minutes` (30 by default), not NCCL's 10 minutes;
- `run_on_main` for a step only the main process does, however long (BM25 over 8.8M passages, writing a report):
  the others wait on the launch's key-value store, not in a collective, so no watchdog kills them, and they give
  up only when the main process has stopped signalling that it is alive for the timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MINUTES = 30.0  # as TrainConfig.timeout_minutes
_timeout_minutes: float | None = None
_calls = 0  # run_on_main calls so far: every process makes them in the same order, so the count names them


def configure_timeout(minutes: float | None) -> None:
    """How long a process waits for the others (collectives, `run_on_main`) in this launch; set before the process
    group is made (the first `process_state`), which fixes it for the rest of the process."""
    global _timeout_minutes
    if minutes is not None:
        if not minutes > 0:
            from retromae.config import ConfigError

            raise ConfigError(f"timeout_minutes={minutes} must be > 0")
        _timeout_minutes = float(minutes)


def timeout_minutes() -> float:
    return _timeout_minutes or float(os.environ.get("RETROMAE_TIMEOUT_MINUTES", DEFAULT_TIMEOUT_MINUTES))


def process_state():
    """accelerate's PartialState, on the CPU (gloo) when asked with ACCELERATE_USE_CPU or when there is no GPU, with
    the configured timeout for its process group (without one NCCL gives up after 10 minutes).

    PartialState does not read ACCELERATE_USE_CPU itself (only AcceleratorState does), and without `cpu=True`
    a multi-process CPU launch would come up as independent single processes.
    """
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu, timeout=datetime.timedelta(minutes=timeout_minutes()))


def world() -> tuple[int, int]:
    """(this process's rank, number of processes) of the initialised process group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_decision(value):
    """The main process's `value` (any picklable object), on every process: the others' own values are ignored.
    For decisions that must be the same everywhere (which checkpoint, which stages are done)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return value
    box = [value if world()[0] == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value) -> list:
    """Every process's `value`, in rank order, on every process."""
    import torch.distributed as dist

    if world()[1] == 1:
        return [value]
    out = [None] * world()[1]
    dist.all_gather_object(out, value)
    return out


def run_on_main(name: str, step: Callable[[], object], minutes: float | None = None):
    """Run `step` on the main process only; the others wait for it without a collective (see the module docstring)
    and get its result, or raise its error. `minutes`: how long the main process may stay silent (default: the
    configured timeout); it signals every few seconds while it works."""
    global _calls
    rank, size = world()
    if size == 1:
        return step()
    _calls += 1
    key = f"retromae/run_on_main/{_calls}/{name}"
    store = _store()
    patience = (minutes or timeout_minutes()) * 60
    if rank == 0:
        return _run_and_publish(store, key, step, min(5.0, patience / 4))
    return _wait_for_main(store, key, name, patience)


def _store():
    import torch.distributed.distributed_c10d as c10d

    return c10d._get_default_store()  # the launch's rendezvous store: every process of every machine reaches it


def _run_and_publish(store, key: str, step, every: float):
    done = threading.Event()

    def heartbeat():
        while not done.wait(every):
            store.add(f"{key}/alive", 1)

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        result = step()
    except Exception as err:
        done.set()
        beating.join()
        store.set(f"{key}/result", pickle.dumps(("error", type(err).__name__, str(err))))
        raise
    done.set()
    beating.join()
    store.set(f"{key}/result", pickle.dumps(("ok", result)))
    return result


def _wait_for_main(store, key: str, name: str, patience: float):
    last_beat, last_change = -1, time.monotonic()
    while True:
        try:
            if store.check([f"{key}/result"]):
                break
            beat = store.add(f"{key}/alive", 0)
        except Exception as err:  # the store went away with the process that hosted it
            raise RuntimeError(f"process 0 ended while running {name} ({err})") from None
        if beat != last_beat:
            last_beat, last_change = beat, time.monotonic()
        elif time.monotonic() - last_change > patience:
            raise RuntimeError(f"process 0 gave no sign of life for {patience / 60:.1f} min while running {name}; "
                               "it may have died (the timeout is train.timeout_minutes or --timeout-minutes)")
        time.sleep(0.5)
    outcome = pickle.loads(store.get(f"{key}/result"))
    if outcome[0] == "ok":
        return outcome[1]
    _, kind, message = outcome
    from retromae.config import ConfigError
    from retromae.data.corpus import CorpusError

    raise {"ConfigError": ConfigError, "CorpusError": CorpusError}.get(kind, RuntimeError)(message)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated along dim 0 (rank order), keeping the autograd graph: the gradient
    that reaches another process's slice is sent back to it (torch.distributed.nn's all_gather). Tensors must
    have the same shape on every process."""
    if world()[1] == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated along dim 0, without gradient."""
    import torch.distributed as dist

    if world()[1] == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
