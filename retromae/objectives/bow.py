"""Bag-of-words decoders (methods.md §1.5).

- BoW prediction (Ma et al., SIGIR 2024): decoder-free; the encoder's MLM head applied to h gives a word
  distribution, trained by cross-entropy against the text's bag of words, plus MLM: `views: 1,
  decoder: mlm_head, contrast_weight: 0`.
- Contrastive MLP bag-of-words decoder (Ma et al., CIKM 2022; no code released): two independently masked views
  of each text; a light MLP decoder maps each view's h to a word distribution; each view gets the bag-of-words
  loss, and an InfoNCE loss pulls the two views' log-distributions together and pushes them from the other texts'
  (in the batch and on other processes), which suppresses common words. Our defaults (config fields):
  MLP = Linear(d, d) -> GELU -> LayerNorm -> Linear(d, V) tied to the word embeddings; cosine similarity of the
  log-distributions, tau = 0.05, symmetric over the two views; L = MLM + BoW(view 1) + BoW(view 2) + lambda
  contrast, lambda = 1. MLM is computed on both views' masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from retromae.config import ConfigError
from retromae.distributed import gather, gather_with_grad, world
from retromae.masking import ENCODER_MASK, ENCODER_RANDOM_IDS, ENCODER_REPLACE, corrupt, whole_word_mask
from retromae.objectives.base import (full_precision, masked_lm_loss_sum, maybe_recomputed, register,
                                      same_document_elsewhere)
from retromae.objectives.dupmae import bag_of_words, bag_of_words_loss_sum
from retromae.objectives.mlm import MaskedLM, MLMConfig

SECOND_VIEW_STREAMS = (ENCODER_MASK + 40, ENCODER_REPLACE + 40, ENCODER_RANDOM_IDS + 40)


@dataclass
class BoWConfig(MLMConfig):
    name: str = "bow"  # which objective
    views: int = 2  # 1: one masked view (BoW prediction) | 2: two masked views (contrastive decoder)
    decoder: str = "mlp"  # mlp: Linear-GELU-LayerNorm-Linear tied to the word embeddings | mlm_head: the encoder's
    contrast_weight: float = 1.0  # lambda, the weight of the InfoNCE between the views (needs views: 2)
    temperature: float = 0.05  # InfoNCE temperature on cosine similarities of the log-distributions
    cross_process: bool = True  # other processes' views are negatives too
    view_checkpointing: bool = True  # two views: recompute each view's encoder pass in backward (memory of one view)

    def batch_wide_losses(self) -> list[str]:
        return ["contrast"] if self.views == 2 else []

    def validate(self) -> None:
        super().validate()
        if self.views not in (1, 2):
            raise ConfigError(f"objective.views={self.views} must be 1 or 2")
        if self.decoder not in ("mlp", "mlm_head"):
            raise ConfigError(f"objective.decoder={self.decoder!r} must be 'mlp' or 'mlm_head'")
        if self.contrast_weight > 0 and self.views != 2:
            raise ConfigError("objective.contrast_weight > 0 needs objective.views: 2 (set contrast_weight: 0)")


class MLPDecoder(nn.Module):
    """h -> vocabulary logits: Linear(d, d) -> GELU -> LayerNorm -> Linear(d, V), the last tied to the embeddings."""

    def __init__(self, hidden: int, word_embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        width = word_embeddings.embedding_dim  # the embedding space (narrower than the layers in ELECTRA)
        self.dense = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.word_embeddings = word_embeddings  # shared, not copied
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h))) @ self.word_embeddings.weight.T + self.bias


def symmetric_infonce_sum(a: torch.Tensor, b: torch.Tensor, temperature: float, cross_process: bool,
                          batch: dict | None = None) -> torch.Tensor:
    """sum over local texts of (CE(a_i vs all b) + CE(b_i vs all a)) / 2 with cosine similarities; `all` spans
    every process when `cross_process` (gathered with gradients). Texts of the batch's own documents (`doc`)
    are left out of each other's negatives."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    rank, size = world()
    offset = 0
    all_a, all_b = a, b
    docs = (batch or {}).get("doc")
    if cross_process and size > 1:
        all_a, all_b = gather_with_grad(a), gather_with_grad(b)
        offset = rank * a.shape[0]
        docs = gather(docs) if docs is not None else None
    targets = offset + torch.arange(a.shape[0], device=a.device)
    excluded = same_document_elsewhere(batch or {}, offset, docs)
    forward, backward = a @ all_b.T / temperature, b @ all_a.T / temperature
    if excluded is not None:
        forward, backward = forward.masked_fill(excluded, float("-inf")), backward.masked_fill(excluded, float("-inf"))
    return (F.cross_entropy(forward, targets, reduction="sum") + F.cross_entropy(backward, targets, reduction="sum")) / 2


@register
class BagOfWords(MaskedLM):
    name = "bow"
    Config = BoWConfig

    def __init__(self, encoder, tokenizer, config: BoWConfig):
        super().__init__(encoder, tokenizer, config)
        if config.decoder == "mlp":
            self.bow_decoder = MLPDecoder(self.arch.hidden_size, self.arch.word_embeddings,
                                          self.arch.decoder_spec().norm_eps)
        self.loss_weights = {"contrast": config.contrast_weight}

    def decode_words(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from the text representation h, (B, V)."""
        return self.bow_decoder(h) if self.config.decoder == "mlp" else self.arch.head(h)

    def prepare(self, batch: dict) -> dict:
        batch = super().prepare(batch)
        batch["bow_targets"] = bag_of_words(batch["input_ids"], batch["words"] >= 0, self.encoder.config.vocab_size)
        if self.config.views == 2:
            mask = whole_word_mask(batch["words"], self.config.mask_ratio, batch["seeds"], SECOND_VIEW_STREAMS[0])
            batch["second_input_ids"] = corrupt(batch["input_ids"], mask, batch["seeds"], self.tables,
                                                SECOND_VIEW_STREAMS[1:], self.config.mask_token_prob,
                                                self.config.random_token_prob)
            batch["second_mask"] = mask
        return batch

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        texts = batch["bow_targets"].any(-1).sum()
        # "bow" sums both views' losses over the texts: L = MLM + BoW(view 1) + BoW(view 2) + lambda contrast
        # (methods.md 1.5), each view's term a mean over texts, so the count is the texts, not texts x views
        items = {"mlm": batch["encoder_mask"].sum(), "bow": texts}
        if self.config.views == 2:
            items["mlm"] = items["mlm"] + batch["second_mask"].sum()
            items["contrast"] = torch.tensor(float(batch["input_ids"].shape[0]), device=texts.device)
        return items

    def view(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
             masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One masked view: (its summed MLM loss, its word log-distribution (B, V))."""
        hidden = self.arch.forward(input_ids, attention_mask)
        mlm = masked_lm_loss_sum(self.arch.head, hidden, targets, masked)
        return mlm, full_precision(self.decode_words(hidden[:, 0])).log_softmax(-1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = [(batch["encoder_input_ids"], batch["encoder_mask"])]
        if self.config.views == 2:
            views.append((batch["second_input_ids"], batch["second_mask"]))
        # Two encoder passes would hold twice MLM's activations; under checkpointing each view keeps only its
        # outputs and is recomputed in the backward pass, one view's activations alive at a time.
        recompute = self.config.views == 2 and self.config.view_checkpointing
        outputs = [maybe_recomputed(recompute, self.view, ids, batch["attention_mask"], batch["input_ids"], masked)
                   for ids, masked in views]
        log_probs = [lp for _, lp in outputs]
        losses = {"mlm": sum(mlm for mlm, _ in outputs),
                  "bow": sum(bag_of_words_loss_sum(lp, batch["bow_targets"]) for lp in log_probs)}
        if self.config.views == 2:
            losses["contrast"] = symmetric_infonce_sum(log_probs[0], log_probs[1], self.config.temperature,
                                                       self.config.cross_process, batch)
        return losses
