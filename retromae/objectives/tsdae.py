"""TSDAE (Wang et al., Findings of EMNLP 2021; methods.md §1.9): a denoising auto-encoder whose only bridge from
encoder to decoder is the pooled sentence vector.

Noise: each word (whole words, on token ids) is deleted with probability `deletion_ratio` 0.6, at least one word
kept; the kept tokens are packed together as a new, shorter text. The encoder embeds the noisy text; the pooled
vector is its final [CLS] state. The decoder is a causal copy of the encoder's own layers (the same weights: tied)
into which a new cross-attention block is inserted after each self-attention, whose keys and values are ONLY the
pooled vector (one key per text). It reads the clean text shifted right (teacher forcing, through the encoder's
embedding layer) and predicts each next token through the encoder's MLM head (vocabulary matrix tied to the word
embeddings); the loss is that next-token cross-entropy at every real position after the first.

Our defaults where the paper leaves it open: the decoder's output head is the encoder's MLM head itself (the
paper's decoder starts from a copy of the checkpoint's head); the new cross-attention blocks are post-LN, as the
encoder's layers, and randomly initialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from retromae.config import ConfigError
from retromae.masking import delete_words, kept_layout, maskable_positions, word_index
from retromae.modeling import base_model, encoder_hidden, mlm_head, token_embeddings
from retromae.objectives.base import Objective, ObjectiveConfig, masked_lm_loss_sum, maybe_recomputed, register
from retromae.objectives.seed import MultiHeadAttention, init_linear_layers

TSDAE_DELETION = 81  # random stream of the word deletion


@dataclass
class TSDAEConfig(ObjectiveConfig):
    name: str = "tsdae"  # which objective
    deletion_ratio: float = 0.6  # each word of the input is deleted with this probability (the paper: 0.6)
    decoder_checkpointing: bool = True  # recompute the decoder's layers in the backward pass (saves memory)

    def validate(self) -> None:
        if not 0 <= self.deletion_ratio < 1:
            raise ConfigError(f"objective.deletion_ratio={self.deletion_ratio} must be in [0, 1)", key="deletion_ratio")


def encoder_layers(mlm) -> nn.ModuleList:
    """The transformer layers of a BERT-like body, each with `attention`, `intermediate` and `output` parts."""
    layers = getattr(getattr(base_model(mlm), "encoder", None), "layer", None)
    if layers is None or not all(hasattr(layer, part) for layer in layers
                                 for part in ("attention", "intermediate", "output")):
        raise ConfigError(f"{type(mlm).__name__}: this objective reuses the encoder's layers and needs a BERT-like "
                          "body (encoder.layer[i] with attention / intermediate / output)")
    return layers


def attention_implementation(config) -> str:
    """The model's attention kernel, refused unless it takes a 4D mask of our making (sdpa, eager)."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager"):
        raise ConfigError(f"model.attn_implementation={implementation!r}: this objective runs the encoder's layers "
                          "with its own attention masks, which needs sdpa or eager", key="attn_implementation")
    return implementation


def layer_attention_mask(config, visible: torch.Tensor) -> torch.Tensor:
    """A (B, Lq, Lk) visibility mask in the form the model's own attention layers take: boolean for sdpa, additive
    for eager."""
    if attention_implementation(config) == "sdpa":
        return visible.unsqueeze(1)
    zeros = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
    return zeros.masked_fill(~visible, torch.finfo(torch.float32).min).unsqueeze(1)


def causal_visibility(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, L): row i sees the real columns j <= i (column 0 always, so no row is empty)."""
    length = attention_mask.shape[1]
    lower = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return lower[None] & attention_mask.bool()[:, None, :]


def decoder_layer(layer, cross, x: torch.Tensor, mask: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """One decoder layer: the encoder layer's causal self-attention, the cross-attention onto the pooled vector,
    then the encoder layer's feed-forward block."""
    x = layer.attention(x, mask)[0]
    x = cross(x, vector)
    return layer.output(layer.intermediate(x), x)


class VectorCrossAttention(nn.Module):
    """Post-LN cross-attention onto a single key/value per text: x -> LN(x + Attn(x, [vector]))."""

    def __init__(self, config):
        super().__init__()
        self.attention = MultiHeadAttention(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.attention(x, vector.unsqueeze(1), None)))


@register
class TSDAE(Objective):
    name = "tsdae"
    Config = TSDAEConfig

    def __init__(self, encoder, tokenizer, config: TSDAEConfig):
        super().__init__(encoder, tokenizer, config)
        layers = encoder_layers(encoder)
        attention_implementation(encoder.config)  # refused now rather than at the first step
        self.cross_attention = nn.ModuleList(VectorCrossAttention(encoder.config) for _ in layers)
        init_linear_layers(self.cross_attention, encoder.config)

    def prepare(self, batch: dict) -> dict:
        ids, attention = batch["input_ids"], batch["attention_mask"]
        words = word_index(ids, maskable_positions(ids, attention, self.tables), self.tables)
        deleted = delete_words(words, self.config.deletion_ratio, batch["seeds"], TSDAE_DELETION)
        index, valid = kept_layout(attention.bool() & ~deleted)
        return {**batch, "words": words, "deleted": deleted,
                "noisy_input_ids": ids.gather(1, index).masked_fill(~valid, self._pad_id),
                "noisy_attention_mask": valid.long(),
                "decoder_visible": causal_visibility(attention[:, :-1]),
                "decoder_targets": attention[:, 1:].bool()}

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"decoder": batch["decoder_targets"].sum()}

    def pooled(self, batch: dict) -> torch.Tensor:
        """The sentence vector of the noisy text: its final [CLS] state, (B, D)."""
        return encoder_hidden(self.encoder, batch["noisy_input_ids"], batch["noisy_attention_mask"])[:, 0]

    def decode(self, vector: torch.Tensor, batch: dict) -> torch.Tensor:
        """The tied causal decoder over the shifted clean text, (B, L-1, D).

        The decoder is as deep as the encoder and reads the whole clean text, while the encoder reads only the 40%
        of it that survives deletion: kept for the backward pass, its activations would make TSDAE's step 1.6x
        MLM's at 32 x 512 (measured on an H200). Under `decoder_checkpointing` each layer keeps only its input and
        is recomputed in the backward pass (same dropout masks: the checkpoint restores the random state)."""
        x = token_embeddings(self.encoder, batch["input_ids"][:, :-1])
        mask = layer_attention_mask(self.encoder.config, batch["decoder_visible"])
        for layer, cross in zip(encoder_layers(self.encoder), self.cross_attention):
            x = maybe_recomputed(self.config.decoder_checkpointing, decoder_layer, layer, cross, x, mask, vector)
        return x

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        decoded = self.decode(self.pooled(batch), batch)
        return {"decoder": masked_lm_loss_sum(mlm_head(self.encoder), decoded, batch["input_ids"][:, 1:],
                                              batch["decoder_targets"])}
