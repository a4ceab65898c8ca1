"""Counter-based random numbers, vectorised and identical on every device.

Masks must depend on the example alone, not on the batch it lands in, the number of processes or the device:
that is what makes a 2-process run equal a 1-process run and a resumed run equal an uninterrupted one.
torch's generators are stateful streams (one per device, consumed in batch order), so they cannot give that.
A hash of (example seed, stream, counter) can: every random number is a pure function of where it is used.

Written by hand because no kept library offers a vectorised, device-agnostic counter-based RNG for torch.
The mixer is Chris Wellons' "lowbias32" integer hash. It runs on int32 tensors holding 32-bit patterns:
multiplication wraps modulo 2**32 (two's complement, on CPU and CUDA alike; a test pins it against an
overflow-free int64 computation) and right shifts are made logical by masking. int32 is ~15x faster than
the int64 formulation on a CPU, which matters for the (B, L, L) decoder masks of RetroMAE.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _signed(c: int) -> int:
    """A 32-bit pattern as the Python int an int32 tensor holds."""
    c &= MASK32
    return c - (1 << 32) if c >= 1 << 31 else c


_M1, _M2 = _signed(0x7FEB352D), _signed(0x846CA68B)
_GOLDEN = _signed(0x9E3779B9)  # Weyl increment: spreads consecutive counters over the 32-bit range


def to_int32(x: torch.Tensor | int, device=None) -> torch.Tensor:
    """Any integer (tensor) reduced to its low 32 bits, held in int32."""
    if not isinstance(x, torch.Tensor):
        return torch.tensor(_signed(int(x)), dtype=torch.int32, device=device)
    if x.dtype == torch.int32:
        return x
    x = x.to(torch.int64) & MASK32
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A well-avalanching bijection on 32-bit patterns (int32 in, int32 out)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def mix32_int(x: int) -> int:
    """`mix32` on a Python integer (for scalars: no tensor, so no host-to-device copy on a GPU)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def example_seeds(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """One 32-bit seed (int32) per example from the run seed, the epoch and the example's index in the corpus."""
    key = _signed(mix32_int(mix32_int(seed) ^ (epoch & MASK32)))
    return mix32(to_int32(indices) * _GOLDEN + key)


def uniform(seeds: torch.Tensor, stream: int, counters: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1): element [b, ...] is a pure function of seeds[b], the stream and counters[b, ...].

    `counters` (integers, leading dimension B or 1) name each number, e.g. a token position, or
    row * stride + word for a matrix; with a fixed stride (not the padded length of the batch) the same
    example gets the same numbers whatever batch, process or device it is in. The result has the shape of
    counters broadcast against (B, 1, ...).
    """
    keys = mix32(to_int32(seeds) ^ _signed(mix32_int(stream)))
    keys = keys.view(-1, *([1] * (counters.dim() - 1)))
    h = mix32(keys + to_int32(counters) * _GOLDEN)
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))
