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
import torch.nn.functional as F
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


# Vocabulary logits held at once by the losses below (rows x vocabulary): 2^26 is 128 MB in bf16, 256 MB in fp32.
LOGIT_BUDGET = 1 << 26


def masked_lm_loss_sum(head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the MLM head predicting `input_ids` at the positions `where` (bool, B x L) only.

    Computing logits only where there is a label (not at every position, as `BertForMaskedLM` does) is what
    keeps a vocabulary-sized projection from dominating the step. When there are many labels (RetroMAE's decoder
    predicts every token: 32 x 512 x 30,522 logits are 2 GB in fp32, and autograd would keep them and their
    log-softmax for the backward pass), the rows go through the head in chunks, each under activation
    checkpointing: only the hidden rows are kept, and each chunk's logits are recomputed in the backward pass.
    """
    positions = where.nonzero(as_tuple=True)  # one device sync, shared by the states and the labels
    if positions[0].numel() == 0:
        return hidden.sum() * 0.0
    rows, targets = hidden[positions], input_ids[positions]
    chunk = max(256, LOGIT_BUDGET // _vocabulary(head, rows))
    if rows.shape[0] <= chunk or not torch.is_grad_enabled():
        return _cross_entropy_sum(head, rows, targets)
    from torch.utils.checkpoint import checkpoint

    return sum(checkpoint(_cross_entropy_sum, head, rows[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
               for i in range(0, rows.shape[0], chunk))


def _cross_entropy_sum(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(full_precision(head(rows)), targets, reduction="sum")


def _vocabulary(head: nn.Module, rows: torch.Tensor) -> int:
    """The head's output size, without running it (its vocab_size, else the largest out_features of its linear
    layers)."""
    if getattr(head, "vocab_size", None):
        return head.vocab_size
    sizes = [m.out_features for m in head.modules() if isinstance(m, nn.Linear)]
    return max(sizes) if sizes else rows.shape[-1]


def max_pooled_logits(head: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """mu: the head's logits max-pooled over the `positions` (B, L) of each text -> (B, V), in fp32.

    Computed a block of positions at a time, in the activations' precision (a max is exact in any precision),
    and only the pooled (B, V) result is cast: the (B, L, V) logits, 1 GB in bf16 at 32 x 512 for BERT, never exist
    at once, and autograd keeps only each block's argmax.
    """
    batch, length = positions.shape
    block = max(1, LOGIT_BUDGET // max(1, batch * _vocabulary(head, hidden)))
    pooled = None
    for start in range(0, length, block):
        logits = head(hidden[:, start : start + block])
        logits = logits.masked_fill(~positions[:, start : start + block, None], float("-inf")).max(dim=1).values
        pooled = logits if pooled is None else torch.maximum(pooled, logits)
    return full_precision(pooled)


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
