"""SEED-Encoder (Lu et al., EMNLP 2021; methods.md §1.6): MLM plus a deliberately weak autoregressive decoder, so
that the encoder must put the text into h rather than let the decoder lean on its own language model.

The decoder: `decoder_layers` pre-norm transformer layers. Self-attention is causal AND restricted: row i sees the
tokens i-k+1 .. i and column 0 (the [CLS] that starts the shifted text, the BOS), nothing else. Cross-attention has
a single key/value: h, the encoder's final [CLS] state. Input: the original (unmasked) text shifted right (teacher
forcing); target: the next token, at every real position after the first ([SEP] included: it plays end of text).
Token embeddings are the encoder's embedding layer and the output projection is the encoder's MLM head, whose
vocabulary matrix is tied to those embeddings. L = mlm_weight * MLM + decoder_weight * L_dec.

Stacked windowed layers see further than one window: after n layers, position i depends on tokens
i - n(k-1) .. i (and column 0); the per-layer window is the paper's rule.

Our defaults where the paper released nothing (config fields): whole-word MLM 0.15, loss weights 0.5 / 0.5; the
decoder's output goes through the encoder's MLM head (its transform and tied vocabulary matrix); a final norm closes
the pre-norm stack; the layers take the encoder's norm, feed-forward form and positions (`retromae.decoders`: on a
rotary encoder, the decoder's self-attention is rotary too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retromae.architectures import with_prenorm
from retromae.config import ConfigError
from retromae.decoders import DecoderStack
from retromae.objectives.base import masked_lm_loss_sum, register
from retromae.objectives.mlm import MaskedLM, MLMConfig


@dataclass
class SEEDConfig(MLMConfig):
    name: str = "seed"  # which objective
    mask_ratio: float = 0.15  # share of ordinary tokens masked in the encoder input (whole words; our default)
    decoder_layers: int = 3  # pre-norm decoder layers (the paper's main setting: 3)
    attention_window: int = 2  # k: decoder row i sees tokens i-k+1 .. i plus column 0 (the paper: k = 2)
    mlm_weight: float = 0.5  # weight of the encoder MLM loss (our default)
    decoder_weight: float = 0.5  # weight of the decoder's next-token loss (our default)

    def validate(self) -> None:
        super().validate()
        if self.decoder_layers < 1 or self.attention_window < 1:
            raise ConfigError("objective.decoder_layers and objective.attention_window must be >= 1")


def window_visibility(attention_mask: torch.Tensor, window: int) -> torch.Tensor:
    """(B, L, L): row i sees columns i-window+1 .. i and column 0, never padding. Column 0 (BOS) is always a real
    token, so no row is left without a column."""
    length = attention_mask.shape[1]
    i = torch.arange(length, device=attention_mask.device)[:, None]
    j = torch.arange(length, device=attention_mask.device)[None, :]
    band = ((j <= i) & (j > i - window)) | (j == 0)
    return band[None] & attention_mask.bool()[:, None, :]


@register
class SEEDEncoder(MaskedLM):
    name = "seed"
    Config = SEEDConfig

    def __init__(self, encoder, tokenizer, config: SEEDConfig):
        super().__init__(encoder, tokenizer, config)
        # pre-norm whatever the encoder (the paper's decoder), in the encoder's norm, feed-forward and positions
        self.decoder = DecoderStack(with_prenorm(self.arch.decoder_spec()), config.decoder_layers, cross_attention=True)
        self.loss_weights = {"mlm": config.mlm_weight, "decoder": config.decoder_weight}

    def prepare(self, batch: dict) -> dict:
        batch = super().prepare(batch)
        # teacher forcing: the decoder reads tokens 0 .. L-2 and predicts tokens 1 .. L-1
        batch["decoder_visible"] = window_visibility(batch["attention_mask"][:, :-1], self.config.attention_window)
        batch["decoder_targets"] = batch["attention_mask"][:, 1:].bool()
        return batch

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"mlm": batch["encoder_mask"].sum(), "decoder": batch["decoder_targets"].sum()}

    def decode(self, h: torch.Tensor, batch: dict) -> torch.Tensor:
        """Decoder states (B, L-1, D) of the shifted text, given the sentence embedding h (B, D)."""
        x = self.arch.embed(batch["input_ids"][:, :-1])
        positions = torch.arange(x.shape[1], device=x.device) if self.decoder.layers[0].attention.rotary else None
        # h is the single key/value of every cross-attention
        return self.decoder(x, batch["decoder_visible"], positions, memory=h.unsqueeze(1))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        hidden = self.encode(batch)
        decoded = self.decode(hidden[:, 0], batch)
        next_tokens = batch["input_ids"][:, 1:]
        return {"mlm": self.mlm_loss(hidden, batch),
                "decoder": masked_lm_loss_sum(self.arch.head, decoded, next_tokens, batch["decoder_targets"])}
