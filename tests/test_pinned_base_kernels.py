"""The shared kernels of retromae/objectives/base.py pinned from the mutation run's survivors: the fused projection +
cross-entropy (`LinearCrossEntropySum`) and the block-wise max-pooled projection (`MaxPooledProjection`) by hand on
tiny inputs (values and the gradients of x, W and b, every chunk / block size, ties, a text with no position, frozen
inputs, bf16, autocast, the input's device), the chunk and block sizes the logit budget gives, `masked_lm_loss_sum`
on one and on no position, `full_precision` and `maybe_recomputed`.

Hand values use W (5 words x 3 dims) = [e0, e1, e2, -e0, 0]: the logits of a row x are [x0, x1, x2, -x0, 0] (+ b)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import retromae.objectives.base as base
from retromae.objectives.base import (LinearCrossEntropySum, MaxPooledProjection, full_precision,
                                      linear_cross_entropy_sum, masked_lm_loss_sum, max_pooled_logits,
                                      maybe_recomputed)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread

LN2 = math.log(2.0)


def hand_weight(dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, 0, 0]], dtype=dtype)


def leaves(*tensors, grad=True):
    return [None if t is None else t.clone().requires_grad_(grad) for t in tensors]


# ----- LinearCrossEntropySum by hand --------------------------------------------------------------------------------

# Three rows, bias 0:
#   x1 = [ln2, 0, 0], target 0: logits [ln2, 0, 0, -ln2, 0], exp [2, 1, 1, 1/2, 1] (sum 11/2),
#        p = [4, 2, 2, 1, 2] / 11, CE = ln(11/4), g1 = p - onehot = [-7, 2, 2, 1, 2] / 11
#   x2 = [0, 0, 0], target 4: p = 1/5 each, CE = ln 5, g2 = [1, 1, 1, 1, -4] / 5
#   x3 = [0, ln2, 0], target 1: exp [1, 2, 1, 1, 1] (sum 6), CE = ln 3, g3 = [1, -4, 1, 1, 1] / 6
# total ln(11/4 * 5 * 3) = ln(165/4); grad x_i = g_i W = [g0 - g3, g1, g2]; grad W = sum_i g_i^T x_i; grad b = sum g_i
HAND_X = [[LN2, 0, 0], [0, 0, 0], [0, LN2, 0]]
HAND_TARGETS = [0, 4, 1]
G1, G2, G3 = [-7 / 11, 2 / 11, 2 / 11, 1 / 11, 2 / 11], [1 / 5, 1 / 5, 1 / 5, 1 / 5, -4 / 5], [1 / 6, -4 / 6, 1 / 6, 1 / 6, 1 / 6]
HAND_LOSS = math.log(165 / 4)
HAND_GRAD_X = [[-7 / 11 - 1 / 11, 2 / 11, 2 / 11], [1 / 5 - 1 / 5, 1 / 5, 1 / 5], [1 / 6 - 1 / 6, -4 / 6, 1 / 6]]
HAND_GRAD_W = [[LN2 * G1[v], LN2 * G3[v], 0.0] for v in range(5)]  # x1 has only dim 0, x3 only dim 1
HAND_GRAD_B = [G1[v] + G2[v] + G3[v] for v in range(5)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 50])  # one row a time, a chunk that does not divide 3, all, more than all
def test_fused_cross_entropy_by_hand(chunk):
    x, weight, bias = leaves(torch.tensor(HAND_X, dtype=torch.float64), hand_weight(), torch.zeros(5, dtype=torch.float64))
    loss = LinearCrossEntropySum.apply(x, weight, bias, torch.tensor(HAND_TARGETS), chunk)
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(HAND_LOSS, rel=1e-14)
    (2.0 * loss).backward()  # the upstream gradient scales every gradient
    torch.testing.assert_close(x.grad, 2 * torch.tensor(HAND_GRAD_X, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(weight.grad, 2 * torch.tensor(HAND_GRAD_W, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(bias.grad, 2 * torch.tensor(HAND_GRAD_B, dtype=torch.float64), rtol=1e-14, atol=1e-15)


def test_fused_cross_entropy_without_gradients_sums_every_chunk():
    """Nothing needs a gradient (evaluation): still every chunk's cross-entropy, not the first one's only."""
    x, weight = torch.tensor(HAND_X, dtype=torch.float64), hand_weight()
    loss = LinearCrossEntropySum.apply(x, weight, None, torch.tensor(HAND_TARGETS), 1)
    assert loss.item() == pytest.approx(HAND_LOSS, rel=1e-14)
    with torch.no_grad():
        assert linear_cross_entropy_sum(x, weight, None, torch.tensor(HAND_TARGETS)).item() == pytest.approx(HAND_LOSS)


def test_fused_cross_entropy_of_no_rows_is_an_exact_zero():
    x, weight, bias = leaves(torch.zeros(0, 3, dtype=torch.float64), hand_weight(), torch.zeros(5, dtype=torch.float64))
    loss = LinearCrossEntropySum.apply(x, weight, bias, torch.zeros(0, dtype=torch.long), 2)
    assert loss.dtype == torch.float64 and loss.item() == 0.0  # the sum is taken in the inputs' precision (fp64)
    loss.backward()
    assert x.grad.shape == (0, 3) and not weight.grad.any() and not bias.grad.any()


@pytest.mark.parametrize("frozen", ["x", "weight", "bias"])
def test_fused_cross_entropy_gives_and_keeps_only_the_gradients_asked_for(frozen):
    """A frozen input (a frozen projection, say) gets no gradient and none is kept for it between the passes (a V x D
    matrix for W); the others still get theirs (the hand values above)."""
    x, weight, bias = leaves(torch.tensor(HAND_X, dtype=torch.float64), hand_weight(), torch.zeros(5, dtype=torch.float64))
    names = ["x", "weight", "bias"]
    tensors = dict(zip(names, (x, weight, bias)))
    tensors[frozen].requires_grad_(False)
    loss = LinearCrossEntropySum.apply(x, weight, bias, torch.tensor(HAND_TARGETS), 2)
    kept = loss.grad_fn.saved_tensors  # what lives until the backward pass: (grad x, grad W, grad b)
    for name, saved in zip(names, kept):
        assert (saved is None) == (name == frozen), name
    loss.backward()
    expected = {"x": HAND_GRAD_X, "weight": HAND_GRAD_W, "bias": HAND_GRAD_B}
    for name, t in tensors.items():
        if name == frozen:
            assert t.grad is None
        else:
            torch.testing.assert_close(t.grad, torch.tensor(expected[name], dtype=torch.float64), rtol=1e-14, atol=1e-15)


def test_fused_cross_entropy_of_a_bf16_model_without_autocast():
    """bf16 parameters and activations, no autocast: the loss in fp32, the gradients in bf16, close to the fp64
    values (the products mix no dtypes)."""
    torch.manual_seed(0)
    x64, w64, b64 = torch.randn(7, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    targets = torch.tensor([0, 5, 2, 2, 1, 3, 4])
    x, weight, bias = leaves(x64.bfloat16(), w64.bfloat16(), b64.bfloat16())
    loss = LinearCrossEntropySum.apply(x, weight, bias, targets, 3)
    assert loss.dtype == torch.float32
    loss.backward()
    rx, rw, rb = leaves(x.detach().double(), weight.detach().double(), bias.detach().double())
    F.cross_entropy(F.linear(rx, rw, rb), targets, reduction="sum").backward()  # the unfused formula, in fp64
    assert loss.item() == pytest.approx(F.cross_entropy(F.linear(rx, rw, rb), targets, reduction="sum").item(), rel=1e-3)  # bf16 logits
    for ours, reference in ((x, rx), (weight, rw), (bias, rb)):
        assert ours.grad.dtype == torch.bfloat16
        torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=2e-2, atol=2e-2)


def bf16_exact(t: torch.Tensor) -> bool:
    return torch.equal(t, t.bfloat16().to(t.dtype))


def test_fused_cross_entropy_under_autocast_multiplies_in_bf16():
    """Under autocast the gradient products run in bf16 (as F.linear's backward under autocast does): the x and W
    gradients are bf16 numbers (one chunk, so no fp32 sum across chunks), stored in fp32, close to fp64's."""
    torch.manual_seed(1)
    x, weight = leaves(torch.randn(6, 4), torch.randn(7, 4))
    targets = torch.tensor([0, 6, 3, 3, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy_sum(x, weight, None, targets)
    assert loss.dtype == torch.float32
    loss.backward()
    rx, rw = leaves(x.detach().double(), weight.detach().double())
    F.cross_entropy(F.linear(rx, rw), targets, reduction="sum").backward()
    for ours, reference in ((x, rx), (weight, rw)):
        assert ours.grad.dtype == torch.float32 and bf16_exact(ours.grad)
        torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=3e-2, atol=3e-2)


# ----- MaxPooledProjection by hand -----------------------------------------------------------------------------------

# W = [[1, 0], [0, 1], [1, 1]], b = [0, 0, 0.5]; three texts of three positions:
#   text 0: x = [1, 2], [3, 0], [2, 2], positions 0 and 1: logits [1, 2, 3.5], [3, 0, 3.5] (position 2 masked)
#           mu = [3 (pos 1), 2 (pos 0), 3.5 (a tie of pos 0 and 1: the first, pos 0)]
#   text 1: no position: mu = -inf, no gradient
#   text 2: x = [0, 1], [1, 0], [0, 0], positions 1 and 2: logits [1, 0, 1.5], [0, 0, 0.5]
#           mu = [1, 0 (a tie of pos 1 and 2: pos 1), 1.5], all from pos 1
# Upstream G = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]: grad x[b, l] = sum_v G[b, v] W[v] over the words l won:
#   x[0, 0] = 2 [0, 1] + 3 [1, 1] = [3, 5], x[0, 1] = 1 [1, 0] = [1, 0], x[2, 1] = 7 [1, 0] + 8 [0, 1] + 9 [1, 1] = [16, 17]
#   grad W[v] = sum_b G[b, v] x[b, winner]: W0 = 1 [3, 0] + 7 [1, 0] = [10, 0], W1 = 2 [1, 2] + 8 [1, 0] = [10, 4],
#   W2 = 3 [1, 2] + 9 [1, 0] = [12, 6]; grad b = G[0] + G[2] = [8, 10, 12] (text 1 has no position)
POOL_X = [[[1, 2], [3, 0], [2, 2]], [[5, 5], [6, 6], [7, 7]], [[0, 1], [1, 0], [0, 0]]]
POOL_POSITIONS = [[True, True, False], [False, False, False], [False, True, True]]
POOL_W = [[1, 0], [0, 1], [1, 1]]
POOL_B = [0, 0, 0.5]
POOL_G = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
INF = float("inf")
POOL_MU = [[3, 2, 3.5], [-INF, -INF, -INF], [1, 0, 1.5]]
POOL_GRAD_X = [[[3, 5], [1, 0], [0, 0]], [[0, 0], [0, 0], [0, 0]], [[0, 0], [16, 17], [0, 0]]]
POOL_GRAD_W = [[10, 0], [10, 4], [12, 6]]
POOL_GRAD_B = [8, 10, 12]


def pool_inputs(with_bias=True):
    d = torch.float64
    return (*leaves(torch.tensor(POOL_X, dtype=d), torch.tensor(POOL_W, dtype=d)),
            leaves(torch.tensor(POOL_B, dtype=d))[0] if with_bias else None)


@pytest.mark.parametrize("block", [1, 2, 3, 5])  # a position a time (ties across blocks), not dividing 3, all, more
def test_max_pooled_projection_by_hand(block):
    x, weight, bias = pool_inputs()
    mu = MaxPooledProjection.apply(x, weight, bias, torch.tensor(POOL_POSITIONS), block)
    assert torch.equal(mu, torch.tensor(POOL_MU, dtype=torch.float64))
    mu.backward(torch.tensor(POOL_G, dtype=torch.float64))  # a gradient reaches the -inf row too: it must stop there
    assert torch.equal(x.grad, torch.tensor(POOL_GRAD_X, dtype=torch.float64)), "ties: the first position wins"
    assert torch.equal(weight.grad, torch.tensor(POOL_GRAD_W, dtype=torch.float64))
    assert torch.equal(bias.grad, torch.tensor(POOL_GRAD_B, dtype=torch.float64))


def test_max_pooled_projection_without_bias_and_with_a_frozen_weight():
    """No bias: the logits lose b (the same winners here, the tie of text 0's word 2 now 3 = 3), and W still gets its
    gradient; a frozen W: x still gets its gradient."""
    x, weight, _ = pool_inputs(with_bias=False)
    positions, upstream = torch.tensor(POOL_POSITIONS), torch.tensor(POOL_G, dtype=torch.float64)
    mu = MaxPooledProjection.apply(x, weight, None, positions, 2)
    assert torch.equal(mu, torch.tensor([[3, 2, 3], [-INF] * 3, [1, 0, 1]], dtype=torch.float64))
    mu.backward(upstream)
    assert torch.equal(x.grad, torch.tensor(POOL_GRAD_X, dtype=torch.float64))
    assert torch.equal(weight.grad, torch.tensor(POOL_GRAD_W, dtype=torch.float64))
    x, weight, bias = pool_inputs()
    weight.requires_grad_(False)
    MaxPooledProjection.apply(x, weight, bias, positions, 2).backward(upstream)
    assert weight.grad is None and torch.equal(x.grad, torch.tensor(POOL_GRAD_X, dtype=torch.float64))
    assert torch.equal(bias.grad, torch.tensor(POOL_GRAD_B, dtype=torch.float64))


class MatrixProducts(TorchDispatchMode):
    """Counts the matrix products run under it (the cost of the max-pool's backward pass: B x block x V x D each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "bmm", "addmm", "baddbmm", "matmul", "dot"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_max_pooled_backward_makes_no_product_for_a_frozen_x_or_weight():
    """Only the bias trained (x and W frozen): the backward pass makes none of the (B, block, V) products, whose
    gradients nobody asked for; with x trainable it does."""
    x, weight, bias = pool_inputs()
    x.requires_grad_(False)
    weight.requires_grad_(False)
    mu = MaxPooledProjection.apply(x, weight, bias, torch.tensor(POOL_POSITIONS), 2)
    with MatrixProducts() as products:
        mu.backward(torch.tensor(POOL_G, dtype=torch.float64))
    assert products.count == 0 and torch.equal(bias.grad, torch.tensor(POOL_GRAD_B, dtype=torch.float64))
    x.requires_grad_(True)
    mu = MaxPooledProjection.apply(x, weight, bias, torch.tensor(POOL_POSITIONS), 2)
    with MatrixProducts() as products:
        mu.backward(torch.tensor(POOL_G, dtype=torch.float64))
    assert products.count > 0 and torch.equal(x.grad, torch.tensor(POOL_GRAD_X, dtype=torch.float64))


def linear_head(weight, bias) -> SimpleNamespace:
    """An MLM head (retromae.architectures.MLMHead's two parts): no transform, then the vocabulary projection."""
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        projection.weight.copy_(weight)
        if bias is not None:
            projection.bias.copy_(bias)
    return SimpleNamespace(transform=nn.Identity(), projection=projection)


def test_max_pooled_logits_uses_the_heads_bias():
    x, weight, bias = pool_inputs()
    mu = max_pooled_logits(linear_head(weight.detach(), bias.detach()), x, torch.tensor(POOL_POSITIONS))
    assert torch.equal(mu, torch.tensor(POOL_MU, dtype=torch.float64))  # fp64 stays fp64


def test_max_pooled_logits_under_autocast():
    """Under autocast: mu in fp32 (from bf16 logits), and the backward pass (outside autocast, as the trainer runs
    it) multiplies in bf16 too: x's gradient is bf16 numbers, stored in fp32; all close to fp64's."""
    torch.manual_seed(2)
    x = torch.randn(2, 5, 4, requires_grad=True)
    head = linear_head(torch.randn(6, 4), torch.randn(6))
    positions = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]])
    upstream = torch.randn(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu = max_pooled_logits(head, x, positions)
    assert mu.dtype == torch.float32 and bf16_exact(mu)
    mu.backward(upstream)
    assert x.grad.dtype == torch.float32 and bf16_exact(x.grad)
    assert head.projection.weight.grad.dtype == torch.float32 and head.projection.bias.grad.dtype == torch.float32
    rx = x.detach().double().requires_grad_()
    rw, rb = (p.detach().double().requires_grad_() for p in (head.projection.weight, head.projection.bias))
    reference = F.linear(rx, rw, rb).masked_fill(~positions[..., None], -INF).max(dim=1).values
    reference.backward(upstream.double())
    torch.testing.assert_close(mu.double(), reference.detach(), rtol=2e-2, atol=2e-2)
    for ours, theirs in ((x, rx), (head.projection.weight, rw), (head.projection.bias, rb)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=3e-2, atol=3e-2)


# ----- the budget: chunk and block sizes ---------------------------------------------------------------------------


class LogitShapes:
    """Wraps F.linear: records the shape of each block of logits the kernels make."""

    def __init__(self, monkeypatch):
        self.shapes, real = [], F.linear
        monkeypatch.setattr(torch.nn.functional, "linear", self)
        self.real = real

    def __call__(self, *args):
        out = self.real(*args)
        self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("budget, rows", [
    (5, [1] * 7),  # 5 logits: one row of 5 words a time
    (9, [1] * 7),  # not two
    (10, [2, 2, 2, 1]),  # two rows (the hidden size, 3, plays no part: not 3 rows)
    (3, [1] * 7),  # under one row: still one row a time
    (100, [7]),  # 20 rows allowed: all 7 at once
])
def test_fused_cross_entropy_chunks_are_the_rows_the_budget_holds(monkeypatch, budget, rows):
    monkeypatch.setattr(base, "LOGIT_BUDGET", budget)
    shapes = LogitShapes(monkeypatch)
    torch.manual_seed(3)
    x, weight = torch.randn(7, 3), torch.randn(5, 3)
    loss = linear_cross_entropy_sum(x, weight, None, torch.tensor([0, 1, 2, 3, 4, 0, 1]))
    assert [s[0] for s in shapes.shapes] == rows and all(s[1] == 5 for s in shapes.shapes)
    expected = F.cross_entropy(x @ weight.T, torch.tensor([0, 1, 2, 3, 4, 0, 1]), reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("texts, words, budget, blocks", [
    (2, 5, 10, [1] * 7),  # 2 texts x 5 words: one position a time
    (2, 5, 19, [1] * 7),  # not two
    (2, 5, 30, [3, 3, 1]),  # three positions (texts x words, not texts / words nor texts x hidden size)
    (1, 1, 4, [4, 3]),  # one text, one word: four positions a time
    (2, 5, 3, [1] * 7),  # under one position: still one a time
])
def test_max_pooled_blocks_are_the_positions_the_budget_holds(monkeypatch, texts, words, budget, blocks):
    monkeypatch.setattr(base, "LOGIT_BUDGET", budget)
    shapes = LogitShapes(monkeypatch)
    torch.manual_seed(4)
    hidden, head = torch.randn(texts, 7, 3), linear_head(torch.randn(words, 3), torch.randn(words))
    positions = torch.rand(texts, 7) > 0.3
    positions[:, 0] = True
    mu = max_pooled_logits(head, hidden, positions)
    assert [s[1] for s in shapes.shapes] == blocks and all(s[0] == texts and s[2] == words for s in shapes.shapes)
    with torch.no_grad():
        expected = shapes.real(hidden, head.projection.weight, head.projection.bias)
    assert torch.allclose(mu, expected.masked_fill(~positions[..., None], -INF).max(dim=1).values, atol=1e-6)


# ----- devices --------------------------------------------------------------------------------------------------------


class TensorsMadeOffDevice(TorchDispatchMode):
    """Records every op whose result is not on `device` (an accumulator or an index made on the CPU by default)."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.elsewhere = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type != self.device:
                self.elsewhere.append(f"{func} -> {t.device}")
        return out


def test_kernels_keep_every_tensor_on_the_inputs_device(monkeypatch):
    """On another device than the CPU (torch's meta device, shapes only) the loss, mu, every gradient and every
    tensor made on the way stay on it: nothing is made on the CPU by default (a CPU accumulator would fail or cost a
    copy on a GPU, a CPU index a host-to-device copy per chunk)."""
    real = torch.is_autocast_enabled
    # autocast knows no meta device; the kernel's only question to it (is autocast on?) is answered: no
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: False if args == ("meta",) else real(*args))
    meta = dict(device="meta")
    x, weight, bias = (torch.empty(*shape, **meta, requires_grad=True) for shape in ((4, 3), (5, 3), (5,)))
    with TensorsMadeOffDevice("meta") as watch:
        loss = LinearCrossEntropySum.apply(x, weight, bias, torch.zeros(4, dtype=torch.long, **meta), 3)
    assert watch.elsewhere == [] and loss.device.type == "meta"
    loss.backward()
    assert all(t.grad.device.type == "meta" for t in (x, weight, bias))
    empty = LinearCrossEntropySum.apply(torch.empty(0, 3, **meta), weight.detach(), None,
                                        torch.zeros(0, dtype=torch.long, **meta), 3)
    assert empty.device.type == "meta"
    x, weight, bias = (torch.empty(*shape, **meta, requires_grad=True) for shape in ((2, 4, 3), (5, 3), (5,)))
    with TensorsMadeOffDevice("meta") as watch:
        mu = MaxPooledProjection.apply(x, weight, bias, torch.ones(2, 4, dtype=torch.bool, **meta), 3)
        mu.backward(torch.empty(2, 5, **meta))
    assert watch.elsewhere == [] and mu.device.type == "meta"
    assert all(t.grad.device.type == "meta" for t in (x, weight, bias))


# ----- masked_lm_loss_sum -------------------------------------------------------------------------------------------


def test_masked_lm_loss_on_a_single_position_with_the_heads_bias():
    """One labelled position (text 1, position 2), hidden 0 there, b = [ln 4, 0, 0, 0, 0], target 0: logits = b,
    exp [4, 1, 1, 1, 1] (sum 8), CE = ln(8/4) = ln 2; the logits' gradient [-1/2, 1/8, 1/8, 1/8, 1/8] times W gives
    hidden [1, 2] the gradient [-1/2 - 1/8, 1/8, 1/8] and every other position none."""
    hidden = torch.ones(2, 3, 3, dtype=torch.float64)
    hidden[1, 2] = 0
    hidden.requires_grad_()
    head = linear_head(hand_weight(), torch.tensor([math.log(4), 0, 0, 0, 0], dtype=torch.float64))
    where = torch.zeros(2, 3, dtype=torch.bool)
    where[1, 2] = True
    input_ids = torch.full((2, 3), 3)
    input_ids[1, 2] = 0
    loss = masked_lm_loss_sum(head, hidden, input_ids, where)
    assert loss.item() == pytest.approx(LN2, rel=1e-14)
    loss.backward()
    expected = torch.zeros(2, 3, 3, dtype=torch.float64)
    expected[1, 2] = torch.tensor([-1 / 2 - 1 / 8, 1 / 8, 1 / 8])
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-14, atol=1e-15)


def test_masked_lm_loss_on_no_position_is_a_zero_connected_to_the_graph():
    hidden = torch.ones(2, 3, 3, requires_grad=True)
    head = linear_head(hand_weight(torch.float32), torch.zeros(5))
    loss = masked_lm_loss_sum(head, hidden, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()  # every process runs the backward pass, even one whose micro-batch has no label
    assert torch.equal(hidden.grad, torch.zeros(2, 3, 3))


# ----- full_precision and maybe_recomputed ---------------------------------------------------------------------------


def test_full_precision_lifts_half_precision_to_fp32_only():
    for half in (torch.float16, torch.bfloat16):
        assert full_precision(torch.tensor([1.5], dtype=half)).dtype == torch.float32
    for exact in (torch.float32, torch.float64):
        t = torch.tensor([1.5], dtype=exact)
        assert full_precision(t) is t


def test_maybe_recomputed_runs_the_function_again_in_the_backward_pass_only_when_enabled():
    """Checkpointing (enabled, gradients on): the function runs twice, once more in the backward pass; disabled, or
    without gradients: once. The gradient is the same (d/dt sum t^2 = 2t)."""
    calls = []

    def square_sum(t):
        calls.append(1)
        return (t * t).sum()

    for enabled, runs in ((False, 1), (True, 2)):
        calls.clear()
        t = torch.tensor([1.0, 2.0], requires_grad=True)
        maybe_recomputed(enabled, square_sum, t).backward()
        assert len(calls) == runs, enabled
        assert torch.equal(t.grad, torch.tensor([2.0, 4.0]))
    calls.clear()
    with torch.no_grad():
        assert maybe_recomputed(True, square_sum, torch.tensor([1.0, 2.0])).item() == 5.0
    assert len(calls) == 1
