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
decoder's output goes through the encoder's MLM head (its transform and tied vocabulary matrix); a final LayerNorm
closes the pre-norm stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from retromae.config import ConfigError
from retromae.modeling import mlm_head, token_embeddings
from retromae.objectives.base import masked_lm_loss_sum, register
from retromae.objectives.mlm import MaskedLM, MLMConfig
from retromae.objectives.retromae import _activation


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


class MultiHeadAttention(nn.Module):
    """Multi-head attention of `query` (B, Lq, D) over `context` (B, Lk, D) with a boolean visibility mask
    (B, Lq, Lk) (or anything broadcasting to it); torch's fused kernel does the softmax."""

    def __init__(self, config):
        super().__init__()
        hidden, self.heads = config.hidden_size, config.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.output = nn.Linear(hidden, hidden)
        self.dropout = config.attention_probs_dropout_prob

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
        attended = F.scaled_dot_product_attention(
            self._split(self.query(query)), self._split(self.key(context)), self._split(self.value(context)),
            attn_mask=None if visible is None else visible.unsqueeze(1),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.output(attended.transpose(1, 2).reshape(query.shape))


class PreNormDecoderLayer(nn.Module):
    """x + SelfAttn(LN x) -> x + CrossAttn(LN x, context) -> x + FFN(LN x)."""

    def __init__(self, config):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.self_attention, self.cross_attention = MultiHeadAttention(config), MultiHeadAttention(config)
        self.self_norm, self.cross_norm, self.ffn_norm = (nn.LayerNorm(hidden, eps=eps) for _ in range(3))
        self.ffn = nn.Sequential(nn.Linear(hidden, config.intermediate_size),
                                 _activation(getattr(config, "hidden_act", "gelu")),
                                 nn.Linear(config.intermediate_size, hidden))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, visible: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        normed = self.self_norm(x)
        x = x + self.dropout(self.self_attention(normed, normed, visible))
        x = x + self.dropout(self.cross_attention(self.cross_norm(x), context, None))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def window_visibility(attention_mask: torch.Tensor, window: int) -> torch.Tensor:
    """(B, L, L): row i sees columns i-window+1 .. i and column 0, never padding. Column 0 (BOS) is always a real
    token, so no row is left without a column."""
    length = attention_mask.shape[1]
    i = torch.arange(length, device=attention_mask.device)[:, None]
    j = torch.arange(length, device=attention_mask.device)[None, :]
    band = ((j <= i) & (j > i - window)) | (j == 0)
    return band[None] & attention_mask.bool()[:, None, :]


def init_linear_layers(module: nn.Module, config) -> None:
    """BERT's initialisation for a randomly initialised head: normal(0, initializer_range) weights, zero biases."""
    std = getattr(config, "initializer_range", 0.02)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)


@register
class SEEDEncoder(MaskedLM):
    name = "seed"
    Config = SEEDConfig

    def __init__(self, encoder, tokenizer, config: SEEDConfig):
        super().__init__(encoder, tokenizer, config)
        self.decoder_layers = nn.ModuleList(PreNormDecoderLayer(encoder.config) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(encoder.config.hidden_size, eps=encoder.config.layer_norm_eps)
        init_linear_layers(self.decoder_layers, encoder.config)
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
        x = token_embeddings(self.encoder, batch["input_ids"][:, :-1])
        context = h.unsqueeze(1)  # the single key/value of every cross-attention
        for layer in self.decoder_layers:
            x = layer(x, batch["decoder_visible"], context)
        return self.decoder_norm(x)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        hidden = self.encode(batch)
        decoded = self.decode(hidden[:, 0], batch)
        next_tokens = batch["input_ids"][:, 1:]
        return {"mlm": self.mlm_loss(hidden, batch),
                "decoder": masked_lm_loss_sum(mlm_head(self.encoder), decoded, next_tokens, batch["decoder_targets"])}
