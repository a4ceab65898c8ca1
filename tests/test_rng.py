"""The counter-based RNG: exact arithmetic, independence from batch composition, usable statistics."""

import torch

from retromae.rng import example_seeds, mix32, to_int32, uniform


def reference_mix32(x: int) -> int:
    """lowbias32 on Python integers (no overflow possible)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_int32_mixer_equals_exact_integer_arithmetic():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF] + list(range(1000, 1100))
    got = mix32(to_int32(torch.tensor(values, dtype=torch.int64))).to(torch.int64) & 0xFFFFFFFF
    assert got.tolist() == [reference_mix32(v) for v in values]


def test_uniform_depends_only_on_seed_stream_and_counter():
    seeds = example_seeds(7, 0, torch.tensor([3, 9, 4]))
    counters = torch.arange(50)[None]
    full = uniform(seeds, 5, counters)
    # The same example alone, or in another batch order, gets the same numbers.
    alone = uniform(seeds[1:2], 5, counters)
    reordered = uniform(seeds.flip(0), 5, counters)
    assert torch.equal(full[1], alone[0])
    assert torch.equal(full, reordered.flip(0))
    # Other streams, seeds and epochs differ.
    assert not torch.equal(full, uniform(seeds, 6, counters))
    assert not torch.equal(seeds, example_seeds(8, 0, torch.tensor([3, 9, 4])))
    assert not torch.equal(seeds, example_seeds(7, 1, torch.tensor([3, 9, 4])))


def test_uniform_statistics():
    seeds = example_seeds(1, 0, torch.arange(64))
    u = uniform(seeds, 1, torch.arange(4096)[None])
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    histogram = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (histogram - 0.1).abs().max() < 0.005
    # Neighbouring counters and neighbouring examples are uncorrelated.
    a, b = u[:, :-1].flatten(), u[:, 1:].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.02
    assert abs(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1].item()) < 0.02


def test_scalar_mixer_equals_tensor_mixer():
    from retromae.rng import mix32_int

    values = [0, 5, 2**31 + 7, 2**32 - 1, 123456789]
    tensor = mix32(to_int32(torch.tensor(values))).to(torch.int64) & 0xFFFFFFFF
    assert tensor.tolist() == [mix32_int(v) for v in values] == [reference_mix32(v) for v in values]
