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


def world() -> tuple[int, int]:
    """(this process's rank, number of processes) of the initialised process group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
