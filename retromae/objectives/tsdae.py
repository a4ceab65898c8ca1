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
paper's decoder starts from a copy of the checkpoint's head); the new cross-attention blocks take the encoder's norm
and its placement (post-LN on BERT, pre-norm on ModernBERT) and are randomly initialised. Any family: the encoder's
layers are split into their attention and feed-forward blocks by its adapter (`retromae.architectures`), and their
attention takes the causal mask in the form of the model's attention implementation (flash attention, which takes no
such mask, is swapped for sdpa in the decoder's calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from retromae.config import ConfigError
from retromae.decoders import VectorCrossAttention
from retromae.masking import delete_words, kept_layout, maskable_positions, word_index
from retromae.objectives.base import Objective, ObjectiveConfig, masked_lm_loss_sum, maybe_recomputed, register

TSDAE_DELETION = 81  # random stream of the word deletion


@dataclass
class TSDAEConfig(ObjectiveConfig):
    name: str = "tsdae"  # which objective
    deletion_ratio: float = 0.6  # each word of the input is deleted with this probability (the paper: 0.6)
    decoder_checkpointing: bool = True  # recompute the decoder's layers in the backward pass (saves memory)

    def validate(self) -> None:
        if not 0 <= self.deletion_ratio < 1:
            raise ConfigError(f"objective.deletion_ratio={self.deletion_ratio} must be in [0, 1)", key="deletion_ratio")


def causal_visibility(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, L): row i sees the real columns j <= i (column 0 always, so no row is empty)."""
    length = attention_mask.shape[1]
    lower = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return lower[None] & attention_mask.bool()[:, None, :]


@register
class TSDAE(Objective):
    name = "tsdae"
    Config = TSDAEConfig

    def __init__(self, encoder, tokenizer, config: TSDAEConfig):
        super().__init__(encoder, tokenizer, config)
        spec = self.arch.decoder_spec()
        self.cross_attention = nn.ModuleList(VectorCrossAttention(spec) for _ in range(self.arch.num_layers))

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
        return self.arch.forward(batch["noisy_input_ids"], batch["noisy_attention_mask"])[:, 0]

    def decode(self, vector: torch.Tensor, batch: dict) -> torch.Tensor:
        """The tied causal decoder over the shifted clean text, (B, L-1, D): each of the encoder's own layers, its
        attention block under a causal mask, then the cross-attention onto the pooled vector, then its feed-forward
        block (`retromae.architectures` splits the layer for every family); a pre-norm encoder's final norm last.

        The decoder is as deep as the encoder and reads the whole clean text, while the encoder reads only the 40%
        of it that survives deletion: kept for the backward pass, its activations would make TSDAE's step 1.6x
        MLM's at 32 x 512 (measured on an H200). Under `decoder_checkpointing` each layer keeps only its input and
        is recomputed in the backward pass (same dropout masks: the checkpoint restores the random state)."""
        x = self.arch.embed(batch["input_ids"][:, :-1])
        context = self.arch.layer_context(x)
        for layer, cross in zip(self.arch.layers, self.cross_attention):
            x = maybe_recomputed(self.config.decoder_checkpointing, self.decoder_layer, layer, cross, x,
                                 batch["decoder_visible"], context, vector)
        return self.arch.final_norm(x)

    def decoder_layer(self, layer, cross, x: torch.Tensor, visible: torch.Tensor, context, vector: torch.Tensor):
        with self.arch.own_masks():  # inside: a recomputation in the backward pass sees the same masks
            x = self.arch.self_attention(layer, x, self.arch.layer_mask(visible, layer), context)
            return self.arch.feed_forward(layer, cross(x, vector))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        decoded = self.decode(self.pooled(batch), batch)
        return {"decoder": masked_lm_loss_sum(self.arch.head, decoded, batch["input_ids"][:, 1:],
                                              batch["decoder_targets"])}
