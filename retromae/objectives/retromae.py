"""RetroMAE (Xiao et al., EMNLP 2022; methods.md §1.2): encoder MLM plus a one-layer decoder that must rebuild
the text from the sentence embedding h.

Enhanced decoding: the decoder's queries are h + p_i for every position i; its keys and values are the
embeddings of the unmasked text with position 0 replaced by h. Row i attends to a random subset of columns
(a fresh whole-word mask per row hides about half of the words), never to column i itself, and always to
column 0 (h), except row 0. Padding is never visible. Every token but the special ones is predicted through
the encoder's own (tied) MLM head. L = L_enc + L_dec.
Basic decoding (the ablation): the decoder reads [h ; embeddings of the decoder-masked text] with plain
self-attention and predicts the masked tokens.

The (B, L, L) visibility mask is built on the training device from per-example seeds, in a few tensor ops;
the reference implementation builds it per example in Python inside the data collator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from retromae.config import ConfigError
from retromae.masking import (
    DECODER_MASK,
    DECODER_RANDOM_IDS,
    DECODER_REPLACE,
    corrupt,
    per_row_whole_word_masks,
    whole_word_mask,
)
from retromae.modeling import mlm_head, position_embeddings, token_embeddings
from retromae.objectives.base import masked_lm_loss_sum, register
from retromae.objectives.mlm import MaskedLM, MLMConfig


@dataclass
class RetroMAEConfig(MLMConfig):
    name: str = "retromae"  # which objective
    mask_ratio: float = 0.3  # share of ordinary tokens masked in the encoder input (whole words)
    decoder_mask_ratio: float = 0.5  # share of words hidden from each decoder row (basic: masked in its input)
    decoding: str = "enhanced"  # enhanced (two streams, a mask per row) | basic (h + masked text, self-attention)
    decoder_loss_weight: float = 1.0  # weight of the decoder loss in the total (the paper: 1)

    def validate(self) -> None:
        super().validate()
        if self.decoding not in ("enhanced", "basic"):
            raise ConfigError(f"objective.decoding={self.decoding!r} must be 'enhanced' or 'basic'")
        if not 0 <= self.decoder_mask_ratio < 1:
            raise ConfigError(f"objective.decoder_mask_ratio={self.decoder_mask_ratio} must be in [0, 1)")


class DecoderLayer(nn.Module):
    """One post-LayerNorm transformer layer (BERT's layout) whose queries and keys/values may come from different
    streams, with a boolean visibility mask per query row.

    Written here rather than taken from transformers: BERT's cross-attention module changed signature between
    transformers 4 and 5 and takes an additive (B, 1, Lq, Lk) float mask; this layer passes the boolean mask
    straight to torch's fused scaled_dot_product_attention and works with any BERT-like config.
    """

    def __init__(self, config):
        super().__init__()
        hidden, self.heads = config.hidden_size, config.num_attention_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.activation = _activation(getattr(config, "hidden_act", "gelu"))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.attention_probs_dropout_prob
        std = getattr(config, "initializer_range", 0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """query (B, Lq, D), context (B, Lk, D), visible (B, Lq, Lk) bool -> (B, Lq, D)."""
        attended = F.scaled_dot_product_attention(
            self._split(self.query(query)),
            self._split(self.key(context)),
            self._split(self.value(context)),
            attn_mask=visible.unsqueeze(1),
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).reshape(query.shape)
        x = self.attention_norm(query + self.dropout(self.attention_output(attended)))
        return self.output_norm(x + self.dropout(self.output(self.activation(self.intermediate(x)))))


def _activation(name) -> nn.Module:
    if callable(name) and not isinstance(name, str):
        return name
    return {"gelu": nn.GELU(), "gelu_new": nn.GELU(approximate="tanh"), "relu": nn.ReLU(), "silu": nn.SiLU()}.get(
        name, nn.GELU()
    )


def decoder_visibility(words: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Enhanced decoding's (B, L, L) mask; [b, i, j] = row i may attend to column j.

    `hidden` (B, L, L) holds each row's fresh whole-word mask. Row i sees the columns its mask leaves visible
    (special tokens are never masked), never column i, always column 0 (h) unless i = 0, and never padding.
    A row left with nothing to see (only possible for rows that are never predicted: [CLS] of a text with no
    other visible token, or a padding row) is given column 0 so attention stays finite.
    """
    batch, length = words.shape
    eye = torch.eye(length, dtype=torch.bool, device=words.device)
    visible = attention_mask.bool()[:, None, :] & ~hidden & ~eye
    visible[:, 1:, 0] = True
    empty = ~visible.any(-1)
    visible[:, :, 0] |= empty
    return visible


@register
class RetroMAE(MaskedLM):
    name = "retromae"
    Config = RetroMAEConfig

    def __init__(self, encoder, tokenizer, config: RetroMAEConfig):
        super().__init__(encoder, tokenizer, config)
        self.decoder = DecoderLayer(encoder.config)
        self.loss_weights = {"decoder": config.decoder_loss_weight}

    def prepare(self, batch: dict) -> dict:
        batch = super().prepare(batch)
        words, seeds, ratio = batch["words"], batch["seeds"], self.config.decoder_mask_ratio
        if self.config.decoding == "enhanced":
            rows_hidden = per_row_whole_word_masks(words, ratio, seeds, DECODER_MASK)
            batch["decoder_visible"] = decoder_visibility(words, batch["attention_mask"], rows_hidden)
            batch["decoder_targets"] = words >= 0
        else:
            mask = whole_word_mask(words, ratio, seeds, DECODER_MASK)
            batch["decoder_input_ids"] = corrupt(
                batch["input_ids"], mask, seeds, self.tables, (DECODER_REPLACE, DECODER_RANDOM_IDS),
                self.config.mask_token_prob, self.config.random_token_prob,
            )
            batch["decoder_targets"] = mask
        return batch

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"mlm": batch["encoder_mask"].sum(), "decoder": batch["decoder_targets"].sum()}

    def decode(self, h: torch.Tensor, batch: dict) -> torch.Tensor:
        """Decoder states (B, L, D) rebuilt from the sentence embedding h (B, D)."""
        h = h.unsqueeze(1)
        if self.config.decoding == "enhanced":
            ids = batch["input_ids"]
            context = torch.cat([h, token_embeddings(self.encoder, ids)[:, 1:]], dim=1)
            query = h + position_embeddings(self.encoder, ids.shape[1], ids.device).unsqueeze(0)
            return self.decoder(query, context, batch["decoder_visible"])
        ids = batch["decoder_input_ids"]
        context = torch.cat([h, token_embeddings(self.encoder, ids)[:, 1:]], dim=1)
        visible = batch["attention_mask"].bool()[:, None, :].expand(-1, ids.shape[1], -1)
        return self.decoder(context, context, visible)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        hidden = self.encode(batch)
        decoded = self.decode(hidden[:, 0], batch)
        return {
            "mlm": self.mlm_loss(hidden, batch),
            "decoder": masked_lm_loss_sum(mlm_head(self.encoder), decoded, batch["input_ids"], batch["decoder_targets"]),
        }
