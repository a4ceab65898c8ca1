"""MAE-LM (Meng et al., ICLR 2024; methods.md §1.10): an encoder that never sees [MASK].

Masked positions (whole words, `mask_ratio` 0.15) are REMOVED from the encoder's input: the kept tokens are packed
to the left and keep their original position ids, so no [MASK] token (and no 80/10/10 replacement) ever enters the
encoder. A shallow decoder (`decoder_layers`, 4) takes the full-length sequence: the encoder's outputs at the kept
positions, the [MASK] embedding (the encoder's embedding layer applied to [MASK] at that position) at the removed
ones, with plain self-attention over the real tokens, and predicts the removed tokens through the encoder's MLM
head (cross-entropy on removed tokens only).

The same encoder side serves RetroMAE with `encoder_masking: remove` (`encode_kept`, `ReinsertionDecoder`).
Our defaults where the paper leaves it open: the decoder layers are RetroMAE's post-LN decoder layer, randomly
initialised; masks are whole-word, as everywhere in this toolkit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from retromae.config import ConfigError
from retromae.masking import ENCODER_MASK, kept_layout, maskable_positions, whole_word_mask, word_index
from retromae.modeling import base_model, mlm_head, token_embeddings
from retromae.objectives.base import Objective, ObjectiveConfig, masked_lm_loss_sum, register
from retromae.objectives.retromae import DecoderLayer


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


def position_offset(mlm) -> int:
    """The position id of the first token: 0 for BERT-likes, padding_idx + 1 for RoBERTa-likes."""
    padding_idx = getattr(base_model(mlm).embeddings, "padding_idx", None)
    return 0 if padding_idx is None else padding_idx + 1


def encode_kept(mlm, input_ids: torch.Tensor, attention_mask: torch.Tensor, removed: torch.Tensor,
                pad_id: int) -> torch.Tensor:
    """Final-layer states (B, L, D) of the encoder run on the kept tokens only (`removed` and padding left out),
    packed to the left with their original position ids; scattered back to their positions, zeros elsewhere."""
    keep = attention_mask.bool() & ~removed
    index, valid = kept_layout(keep)
    kept_ids = input_ids.gather(1, index).masked_fill(~valid, pad_id)  # the removed tokens do not even pad the rows
    states = base_model(mlm)(input_ids=kept_ids, attention_mask=valid.long(),
                             position_ids=index + position_offset(mlm)).last_hidden_state
    states = states * valid.unsqueeze(-1).to(states.dtype)
    full = states.new_zeros(*input_ids.shape, states.shape[-1])
    return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, states.shape[-1]), states)


class ReinsertionDecoder(nn.Module):
    """MAE-LM's shallow decoder: encoder states at kept positions, [MASK] embeddings at removed ones, plain
    self-attention over the real tokens."""

    def __init__(self, config, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(layers))

    def forward(self, mlm, states: torch.Tensor, removed: torch.Tensor, attention_mask: torch.Tensor,
                mask_id: int) -> torch.Tensor:
        mask_embeddings = token_embeddings(mlm, torch.full_like(attention_mask, mask_id))
        x = torch.where(removed.unsqueeze(-1), mask_embeddings, states)
        visible = attention_mask.bool()[:, None, :].expand(-1, x.shape[1], -1)
        for layer in self.layers:
            x = layer(x, x, visible)
        return x


@register
class MAELM(Objective):
    name = "maelm"
    Config = MAELMConfig

    def __init__(self, encoder, tokenizer, config: MAELMConfig):
        super().__init__(encoder, tokenizer, config)
        self.decoder = ReinsertionDecoder(encoder.config, config.decoder_layers)

    def prepare(self, batch: dict) -> dict:
        ids, attention, seeds = batch["input_ids"], batch["attention_mask"], batch["seeds"]
        words = word_index(ids, maskable_positions(ids, attention, self.tables), self.tables)
        return {**batch, "words": words, "removed": whole_word_mask(words, self.config.mask_ratio, seeds, ENCODER_MASK)}

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"mlm": batch["removed"].sum()}

    def encode(self, batch: dict) -> torch.Tensor:
        return encode_kept(self.encoder, batch["input_ids"], batch["attention_mask"], batch["removed"], self._pad_id)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        states = self.encode(batch)
        decoded = self.decoder(self.encoder, states, batch["removed"], batch["attention_mask"], self._mask_id)
        return {"mlm": masked_lm_loss_sum(mlm_head(self.encoder), decoded, batch["input_ids"], batch["removed"])}
