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

Where the authors' code differs, it is a choice. Their decoder has learned positions of its own and a plain tied
projection (logits = states @ W_e^T, no transform, no bias): `decoder_positions: own`, `decoder_projection: tied`.
Ours by default (`encoder`, `mlm_head`): methods.md §1.6 asks for the decoder's token embeddings and output
projection to be the encoder's, and the decoder is meant to be weak: giving it the encoder's embedding layer
(positions and norm included) and the encoder's whole MLM head adds no parameters the decoder could learn a
language model in, and keeps one vocabulary read-out for both losses, as in every other objective here. `tied`
needs word embeddings as wide as the layers (ELECTRA's are narrower: refused in one line).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from retromae.architectures import MLMHead, TiedProjection, with_prenorm
from retromae.config import ConfigError
from retromae.decoders import DecoderStack
from retromae.objectives.base import masked_lm_loss_sum, register
from retromae.objectives.mlm import MaskedLM, MLMConfig


DECODER_POSITIONS = ("encoder", "own")
DECODER_PROJECTIONS = ("mlm_head", "tied")


@dataclass
class SEEDConfig(MLMConfig):
    name: str = "seed"  # which objective
    mask_ratio: float = 0.15  # share of ordinary tokens masked in the encoder input (whole words; our default)
    decoder_layers: int = 3  # pre-norm decoder layers (the paper's main setting: 3)
    attention_window: int = 2  # k: decoder row i sees tokens i-k+1 .. i plus column 0 (the paper: k = 2)
    mlm_weight: float = 0.5  # weight of the encoder MLM loss (our default)
    decoder_weight: float = 0.5  # weight of the decoder's next-token loss (our default)
    decoder_positions: str = "encoder"  # encoder: the decoder reads the encoder's embedding layer | own: word embeddings + a learned position table of its own (the authors' code)
    decoder_projection: str = "mlm_head"  # mlm_head: the encoder's MLM head (transform + tied matrix) | tied: states @ W_e^T only (the authors' code)

    def validate(self) -> None:
        super().validate()
        if self.decoder_layers < 1 or self.attention_window < 1:
            raise ConfigError("objective.decoder_layers and objective.attention_window must be >= 1")
        if self.decoder_positions not in DECODER_POSITIONS:
            raise ConfigError(f"objective.decoder_positions={self.decoder_positions!r} is not one of "
                              f"{', '.join(DECODER_POSITIONS)}", key="decoder_positions")
        if self.decoder_projection not in DECODER_PROJECTIONS:
            raise ConfigError(f"objective.decoder_projection={self.decoder_projection!r} is not one of "
                              f"{', '.join(DECODER_PROJECTIONS)}", key="decoder_projection")


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
        spec = with_prenorm(self.arch.decoder_spec())
        self.position_table = None
        if config.decoder_positions == "own":  # the authors' code: positions come from the table, not from rotary
            spec = replace(spec, rotary_theta=None)
            self.position_table = nn.Embedding(getattr(encoder.config, "max_position_embeddings", 512) or 512,
                                               self.arch.hidden_size)
            nn.init.normal_(self.position_table.weight, std=spec.init_std)
        if config.decoder_projection == "tied" and self.arch.word_embeddings.embedding_dim != self.arch.hidden_size:
            raise ConfigError(f"objective.decoder_projection=tied needs word embeddings as wide as the layers "
                              f"({self.arch.word_embeddings.embedding_dim} != {self.arch.hidden_size})",
                              key="decoder_projection")
        self.decoder = DecoderStack(spec, config.decoder_layers, cross_attention=True)
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
        ids = batch["input_ids"][:, :-1]
        if self.position_table is None:
            x = self.arch.embed(ids)
        else:
            words = self.arch.from_embedding_space(self.arch.word_embeddings(ids))  # ELECTRA: to the layers' width
            x = words + self.position_table(torch.arange(ids.shape[1], device=ids.device))
        positions = torch.arange(x.shape[1], device=x.device) if self.decoder.layers[0].attention.rotary else None
        # h is the single key/value of every cross-attention
        return self.decoder(x, batch["decoder_visible"], positions, memory=h.unsqueeze(1))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        hidden = self.encode(batch)
        decoded = self.decode(hidden[:, 0], batch)
        next_tokens = batch["input_ids"][:, 1:]
        return {"mlm": self.mlm_loss(hidden, batch),
                "decoder": masked_lm_loss_sum(self.decoder_head(), decoded, next_tokens, batch["decoder_targets"])}

    def decoder_head(self) -> MLMHead:
        """The read-out of the decoder's states: the encoder's MLM head, or the bare tied word embeddings."""
        if self.config.decoder_projection == "mlm_head":
            return self.arch.head
        return MLMHead(nn.Identity(), TiedProjection(self.arch.word_embeddings, None))
