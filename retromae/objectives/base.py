"""The contract every pretraining objective follows, and the registry that finds them by name.

An objective owns the encoder it trains (`self.encoder`, a Hugging Face masked-LM model, seen through
`self.arch`, its `retromae.architectures.Encoder` adapter: objectives never reach into a family's internals), its
own heads (built to match the encoder, `retromae.decoders`), and its batch preparation; the trainer, data streaming, checkpointing and export are shared. To add one, write
one module in `retromae/objectives/` with a `Config` dataclass (subclassing `ObjectiveConfig`) and an
`Objective` subclass decorated with `@register`, plus a recipe in `pretrain/`. Nothing else changes.

Objectives whose losses compare items across the global batch (contrastive ones) name them in their config's
`batch_wide_losses()`; gradient accumulation is refused for them, since it would shrink their negatives to one
micro-batch (the trainer's sums are exact across accumulation steps only for per-item losses).

The three methods the trainer calls:
- `prepare(batch)`: the collated batch (`input_ids`, `attention_mask`, per-example `seeds`) -> model inputs.
  Runs on the training device, vectorised; randomness comes from the seeds (see `retromae.rng`).
- `num_items(batch)`: for each named loss, how many items (masked tokens, texts ...) it averages over in this
  batch. The trainer sums these over processes and accumulation steps before the backward pass, so every
  named loss is the mean over the whole global batch, however it is split.
- `forward(batch)`: for each named loss, the *sum* of its per-item losses over this batch.
Each named loss enters the total with weight `loss_weights.get(name, 1.0)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from retromae.config import ConfigError, build
from retromae.architectures import encoder_of
from retromae.masking import TokenTables


@dataclass
class ObjectiveConfig:
    name: str = "retromae"  # which objective (a name registered in retromae/objectives)

    def batch_wide_losses(self) -> list[str]:
        """Losses that compare each item with the other items of the global batch (contrastive negatives).

        Such a loss is not a sum of per-micro-batch terms: with gradient accumulation its negatives would come
        from one micro-batch only, so the trainer refuses accumulation for objectives that have one (see
        `check_accumulation`)."""
        return []


def check_accumulation(config: ObjectiveConfig, accumulation_steps: int) -> None:
    """Refuse gradient accumulation for an objective whose batch-wide losses it would change."""
    wide = config.batch_wide_losses()
    if accumulation_steps > 1 and wide:
        raise ConfigError(
            f"objective {config.name!r} compares every text with the rest of the global batch (loss "
            f"{', '.join(repr(w) for w in wide)}); with train.gradient_accumulation_steps={accumulation_steps} its "
            "negatives would come from one micro-batch only, which is not the global batch the recipe describes. "
            "Set train.gradient_accumulation_steps=1 and reach the batch with train.per_device_batch_size and more "
            "processes (model.gradient_checkpointing=true saves memory)",
            key="gradient_accumulation_steps",
        )


class Objective(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type[ObjectiveConfig]]

    def __init__(self, encoder: nn.Module, tokenizer, config: ObjectiveConfig):
        super().__init__()
        self.encoder = encoder
        self.arch = encoder_of(encoder)  # what the objective needs of the encoder, for any family
        self.config = config
        self.loss_weights: dict[str, float] = {}
        tables = TokenTables.from_tokenizer(tokenizer, vocab_size=encoder.config.vocab_size)
        # Buffers, so the tables follow the module to its device; not saved (they come from the tokenizer).
        self.register_buffer("_special", tables.special, persistent=False)
        self.register_buffer("_continuation", tables.continuation, persistent=False)
        self.register_buffer("_replacement_ids", tables.replacement_ids, persistent=False)
        self._mask_id, self._pad_id = tables.mask_id, tables.pad_id

    @property
    def tables(self) -> TokenTables:
        return TokenTables(self._special, self._continuation, self._replacement_ids, self._mask_id, self._pad_id)

    def prepare(self, batch: dict) -> dict:
        raise NotImplementedError

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight except the encoder body's (MLM head, decoders, projectors): what continuing pretraining
        needs beside the exported encoder. Weights tied to the body (the head's decoder matrix) are left out."""
        body = self.arch.body
        body_storage = {p.data_ptr() for p in body.parameters()}
        body_names = {f"encoder.{self.encoder.base_model_prefix}.{k}" for k in body.state_dict()}
        heads, seen = {}, set(body_storage)
        for k, v in self.state_dict().items():
            if k in body_names or v.data_ptr() in seen:
                continue  # the body's, or another name for a tensor already kept (tied biases)
            seen.add(v.data_ptr())
            heads[k] = v.detach().cpu().contiguous()
        return heads

    def load_heads(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load weights saved by `heads_state_dict`; returns (heads not found in `state`, unused entries)."""
        own = self.heads_state_dict()
        missing = sorted(k for k in own if k not in state)
        unexpected = sorted(k for k in state if k not in own)
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return missing, unexpected


def maybe_recomputed(enabled: bool, function, *args):
    """function(*args), under activation checkpointing when `enabled` and gradients are on: only the inputs are
    kept for the backward pass, which runs `function` again with the same random state (same dropout masks)."""
    if not (enabled and torch.is_grad_enabled()):
        return function(*args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (autocast) up to fp32 for softmaxes and losses; fp32 / fp64 left as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# Vocabulary logits held at once (rows x vocabulary) by the fused cross-entropy and max-pooling below, whose chunks
# live ~11 bytes a logit (fp32 logits and softmax, their bf16 copies): 2^23 is ~90 MB, and their products stay large
# (275 rows x hidden x 30,522 words for BERT).
LOGIT_BUDGET = 1 << 23


def masked_lm_loss_sum(head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the MLM head (`retromae.architectures.MLMHead`: transform, then the vocabulary
    projection) predicting `input_ids` at the positions `where` (bool, B x L) only.

    Computing logits only where there is a label (not at every position, as `BertForMaskedLM` does) is what keeps
    a vocabulary-sized projection from dominating the step. The projection and its cross-entropy are fused
    (`LinearCrossEntropySum`): a chunk of rows at a time, and never kept for the backward pass."""
    positions = where.nonzero(as_tuple=True)  # one device sync, shared by the states and the labels
    if positions[0].numel() == 0:
        return hidden.sum() * 0.0
    rows, targets = hidden[positions], input_ids[positions]
    projection = head.projection
    return linear_cross_entropy_sum(head.transform(rows), projection.weight, projection.bias, targets)


def linear_cross_entropy_sum(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor) -> torch.Tensor:
    """sum_i CE(x_i W^T + b, y_i), x (N, D), W (V, D): the logits `LOGIT_BUDGET` at a time, never all at once."""
    chunk = max(1, LOGIT_BUDGET // weight.shape[0])
    return LinearCrossEntropySum.apply(x, weight, bias, targets, chunk)


class LinearCrossEntropySum(torch.autograd.Function):
    """A vocabulary projection and its summed cross-entropy, with the gradients computed as each chunk's logits are
    made (softmax - one-hot is the gradient of the logits) and only those kept: (N, D) for x, (V, D) for W, (V,)
    for b, scaled in the backward pass by the upstream gradient (the loss is a sum, so that is a scalar).

    Written by hand because autograd keeps what a cross-entropy needs for its backward pass, the (N, V) logits and
    their log-softmax: RetroMAE's decoder predicts every token, 32 x 512 x 30,522 logits are 2 GB in fp32, and on a
    long text (8,192 tokens) they are most of the step. Checkpointed chunks (what this replaces) bounded that too, at
    the cost of a second pass through the projection; here there is none. Under autocast the products run in its
    precision, softmax and sums in fp32, as F.cross_entropy under autocast does."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk):
        wants = ctx.needs_input_grad
        exact = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)  # fp32, or fp64
        total = torch.zeros((), dtype=exact, device=x.device)
        grad_x = torch.empty_like(x) if wants[0] else None
        grad_w = torch.zeros(weight.shape, dtype=exact, device=x.device) if wants[1] else None
        grad_b = torch.zeros(weight.shape[0], dtype=exact, device=x.device) if wants[2] else None
        for start in range(0, x.shape[0], chunk):
            rows, labels = x[start : start + chunk], targets[start : start + chunk]
            logits = torch.nn.functional.linear(rows, weight, bias).to(exact)
            log_norm = logits.logsumexp(-1)
            total = total + (log_norm - logits.gather(1, labels[:, None]).squeeze(1)).sum()
            if not any(wants[:3]):
                continue
            probabilities = (logits - log_norm[:, None]).exp_()  # the logits' gradient: softmax - one-hot
            probabilities[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
            grad = probabilities.to(logits.dtype if not torch.is_autocast_enabled(x.device.type)
                                    else torch.get_autocast_dtype(x.device.type))
            if grad_x is not None:
                grad_x[start : start + chunk] = (grad @ weight.to(grad.dtype)).to(x.dtype)
            if grad_w is not None:
                grad_w += (grad.T @ rows.to(grad.dtype)).to(exact)
            if grad_b is not None:
                grad_b += probabilities.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, upstream):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        scale = lambda g, dtype: None if g is None else (g * upstream).to(dtype)  # noqa: E731
        return scale(grad_x, x_dtype), scale(grad_w, w_dtype), scale(grad_b, b_dtype), None, None


def max_pooled_logits(head: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """mu: the MLM head's logits max-pooled over the `positions` (B, L) of each text -> (B, V), in fp32 (-inf for a
    text with no position).

    The (B, L, V) logits (1 GB in bf16 at 32 x 512 for BERT; at 8,192 tokens, 0.5 GB per text) never exist at once:
    `MaxPooledProjection` runs a block of positions at a time and keeps, for the backward pass, only which position
    won each (text, word) (a max passes its gradient to its argmax alone)."""
    batch, length = positions.shape
    projection = head.projection
    block = max(1, LOGIT_BUDGET // max(1, batch * projection.weight.shape[0]))
    pooled = MaxPooledProjection.apply(head.transform(hidden), projection.weight, projection.bias, positions, block)
    return full_precision(pooled)


class MaxPooledProjection(torch.autograd.Function):
    """mu[b, v] = max over the positions l of text b of (x[b, l] W^T + bias)[v], a block of positions at a time.

    Written by hand because autograd would keep, for every block, its (B, V) argmax and the (B, V) operands of each
    running maximum: with blocks small enough for a long text, that is as much as the logits. Here the forward
    pass keeps the winning position of each (text, word), and the backward pass sends each mu's gradient to that
    position's logit, a block at a time: grad x = G W, grad W = G^T x, grad bias = sum of G."""

    @staticmethod
    def forward(ctx, x, weight, bias, positions, block):
        batch, length, _ = x.shape
        pooled, winner = None, None
        for start in range(0, length, block):
            logits = torch.nn.functional.linear(x[:, start : start + block], weight, bias)
            logits = logits.masked_fill(~positions[:, start : start + block, None], float("-inf"))
            values, where = logits.max(dim=1)
            if pooled is None:
                pooled, winner = values, where
            else:
                better = values > pooled
                pooled, winner = torch.where(better, values, pooled), torch.where(better, where + start, winner)
        winner = winner.masked_fill(torch.isinf(pooled), -1)  # a text with no position passes no gradient
        ctx.save_for_backward(x, weight, winner)
        ctx.block, ctx.has_bias, ctx.dtype = block, bias is not None, pooled.dtype
        return pooled

    @staticmethod
    def backward(ctx, grad):
        x, weight, winner = ctx.saved_tensors
        wants = ctx.needs_input_grad
        dtype = ctx.dtype  # the forward pass's product precision (bf16 under autocast)
        grad = grad.to(dtype)
        grad_x = torch.zeros_like(x) if wants[0] else None
        exact = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=exact, device=x.device) if wants[1] else None
        for start in range(0, x.shape[1], ctx.block):
            rows = torch.arange(start, min(start + ctx.block, x.shape[1]), device=x.device)
            spread = (winner[:, None, :] == rows[None, :, None]).to(dtype) * grad[:, None, :]  # (B, block, V)
            if grad_x is not None:
                grad_x[:, rows] = (spread @ weight.to(dtype)).to(x.dtype)
            if grad_w is not None:
                grad_w += torch.einsum("blv,bld->vd", spread, x[:, rows].to(dtype)).to(exact)
        grad_b = (grad * (winner >= 0)).sum(0).to(weight.dtype) if ctx.has_bias and wants[2] else None
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), grad_b, None, None


def same_document_elsewhere(batch: dict, first_text: int, all_docs: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) bool: global text j (of N, every process's texts when `all_docs` was gathered) comes from the same
    document as local text b but is another text: a false negative for contrastive losses (two packed blocks of one
    article, neighbouring blocks of a stream), to leave out of the softmax. None when the batch has no `doc`."""
    docs = batch.get("doc")
    if docs is None or all_docs is None:
        return None
    ids = first_text + torch.arange(docs.shape[0], device=docs.device)
    others = torch.arange(all_docs.shape[0], device=docs.device)
    return (all_docs[None, :] == docs[:, None]) & (others[None, :] != ids[:, None])


_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    if cls.name in _REGISTRY:
        raise ValueError(f"objective {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def objective_class(name: str) -> type[Objective]:
    from retromae import objectives  # noqa: F401  (imports every objective module, which registers it)

    if name not in _REGISTRY:
        raise ConfigError(f"objective.name={name!r} is not a known objective; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_objective_config(data, source: str = "<config>", lines: dict | None = None, path=("objective",)):
    """The `objective:` section, typed by the `Config` of the objective it names."""
    data = dict(data or {})
    name = data.get("name", ObjectiveConfig.name)
    try:
        cls = objective_class(str(name))
    except ConfigError as err:
        from retromae.config import _where

        raise ConfigError(f"{_where(source, lines or {}, path + ('name',))}: {err}") from None
    return build(cls.Config, data, source, lines, path)
