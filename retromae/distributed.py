"""The launch's process layout, for code that needs no Accelerator (encoding, evaluation)."""

from __future__ import annotations

import os

import torch


def process_state():
    """accelerate's PartialState, on the CPU (gloo) when asked with ACCELERATE_USE_CPU or when there is no GPU.

    PartialState does not read ACCELERATE_USE_CPU itself (only AcceleratorState does), and without `cpu=True`
    a multi-process CPU launch would come up as independent single processes.
    """
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu)
