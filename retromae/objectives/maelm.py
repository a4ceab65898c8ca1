"""MAE-LM (Meng et al., ICLR 2024; methods.md §1.10): an encoder that never sees [MASK].

Masked positions (whole words, `mask_ratio` 0.15) are REMOVED from the encoder's input: the kept tokens are packed
to the left and keep their original position ids, so no [MASK] token (and no 80/10/10 replacement) ever enters the
encoder. A shallow decoder (`decoder_layers`, 4) takes the full-length sequence: the encoder's outputs at the kept
positions, the [MASK] embedding (the encoder's embedding layer applied to [MASK] at that position) at the removed
ones, with plain self-attention over the real tokens, and predicts the removed tokens through the encoder's MLM
head (cross-entropy on removed tokens only).

The same encoder side serves RetroMAE with `encoder_masking: remove` (`encode_kept`, `ReinsertionDecoder`).
Our defaults where the paper leaves it open: the decoder layers are shaped like the encoder's (`retromae.decoders`),
randomly initialised; masks are whole-word, as everywhere in this toolkit. On families whose attention reads positions
from the order of the sequence the removed tokens are hidden rather than dropped (`encode_kept`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from retromae.architectures import Encoder
from retromae.config import ConfigError
from retromae.decoders import DecoderSpec, DecoderStack
from retromae.masking import ENCODER_MASK, kept_layout, maskable_positions, whole_word_mask, word_index
from retromae.objectives.base import Objective, ObjectiveConfig, masked_lm_loss_sum, register


@dataclass
class MAELMConfig(ObjectiveConfig):
    name: str = "maelm"  # which objective
    mask_ratio: float = 0.15  # share of ordinary tokens removed from the encoder input (whole words)
    decoder_layers: int = 4  # layers of the shallow decoder that reinserts the removed positions

    def validate(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"objective.mask_ratio={self.mask_ratio} must be in (0, 1)")
        if self.decoder_layers < 1:
            raise ConfigError("objective.decoder_layers must be >= 1")


def encode_kept(arch: Encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, removed: torch.Tensor,
                pad_id: int) -> torch.Tensor:
    """Final-layer states (B, L, D) of the encoder run on the kept tokens only (`removed` and padding left out),
    each at its original position; zeros at the removed positions.

    Where a position id says all there is about a token's place (absolute tables, rotary with global attention:
    `arch.packable`), the kept tokens are packed to the left with their original position ids, and the encoder runs
    on the shorter rows. Where attention reads positions from the order of the sequence (DeBERTa's and MPNet's
    relative attention, ModernBERT's sliding windows), the rows keep their length: removed tokens are replaced by
    padding and hidden from every row by the attention mask, so each kept token sees exactly the kept tokens, at
    their original distances."""
    keep = attention_mask.bool() & ~removed
    if not arch.packable:
        positions = arch.position_ids(input_ids.shape[1], input_ids.device)[None].expand_as(input_ids)
        states = arch.forward(input_ids.masked_fill(~keep, pad_id), keep.long(), positions)
        return states * keep.unsqueeze(-1).to(states.dtype)
    index, valid = kept_layout(keep)
    kept_ids = input_ids.gather(1, index).masked_fill(~valid, pad_id)  # the removed tokens do not even pad the rows
    states = arch.forward(kept_ids, valid.long(), index + arch.position_offset())
    states = states * valid.unsqueeze(-1).to(states.dtype)
    full = states.new_zeros(*input_ids.shape, states.shape[-1])
    return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, states.shape[-1]), states)


class ReinsertionDecoder(nn.Module):
    """MAE-LM's shallow decoder: encoder states at kept positions, [MASK] embeddings at removed ones, plain
    self-attention over the real tokens; layers shaped like the encoder's."""

    def __init__(self, spec: DecoderSpec, layers: int):
        super().__init__()
        self.stack = DecoderStack(spec, layers)

    def forward(self, arch: Encoder, states: torch.Tensor, removed: torch.Tensor, attention_mask: torch.Tensor,
                mask_id: int) -> torch.Tensor:
        mask_embeddings = arch.embed(torch.full_like(attention_mask, mask_id))
        x = torch.where(removed.unsqueeze(-1), mask_embeddings.to(states.dtype), states)
        positions = torch.arange(x.shape[1], device=x.device) if self.stack.layers[0].attention.rotary else None
        return self.stack(x, attention_mask.bool()[:, None, :], positions)


@register
class MAELM(Objective):
    name = "maelm"
    Config = MAELMConfig

    def __init__(self, encoder, tokenizer, config: MAELMConfig):
        super().__init__(encoder, tokenizer, config)
        self.decoder = ReinsertionDecoder(self.arch.decoder_spec(), config.decoder_layers)

    def prepare(self, batch: dict) -> dict:
        ids, attention, seeds = batch["input_ids"], batch["attention_mask"], batch["seeds"]
        words = word_index(ids, maskable_positions(ids, attention, self.tables), self.tables)
        return {**batch, "words": words, "removed": whole_word_mask(words, self.config.mask_ratio, seeds, ENCODER_MASK)}

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"mlm": batch["removed"].sum()}

    def encode(self, batch: dict) -> torch.Tensor:
        return encode_kept(self.arch, batch["input_ids"], batch["attention_mask"], batch["removed"], self._pad_id)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        states = self.encode(batch)
        decoded = self.decoder(self.arch, states, batch["removed"], batch["attention_mask"], self._mask_id)
        return {"mlm": masked_lm_loss_sum(self.arch.head, decoded, batch["input_ids"], batch["removed"])}
