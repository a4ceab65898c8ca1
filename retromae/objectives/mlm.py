"""Masked language modelling (methods.md §1.1): the baseline every paper compares against, and the encoder
loss that RetroMAE and its relatives keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retromae.config import ConfigError
from retromae.masking import (
    ENCODER_MASK,
    ENCODER_RANDOM_IDS,
    ENCODER_REPLACE,
    corrupt,
    maskable_positions,
    whole_word_mask,
    word_index,
)
from retromae.objectives.base import Objective, ObjectiveConfig, masked_lm_loss_sum, register


@dataclass
class MLMConfig(ObjectiveConfig):
    name: str = "mlm"  # which objective
    mask_ratio: float = 0.3  # share of ordinary tokens masked in the encoder input (whole words)
    mask_token_prob: float = 0.8  # masked tokens replaced by the mask token
    random_token_prob: float = 0.1  # masked tokens replaced by a random token (the rest are kept)

    def validate(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"objective.mask_ratio={self.mask_ratio} must be in (0, 1)")
        if self.mask_token_prob < 0 or self.random_token_prob < 0 or self.mask_token_prob + self.random_token_prob > 1:
            raise ConfigError("objective.mask_token_prob + objective.random_token_prob must be within [0, 1]")


@register
class MaskedLM(Objective):
    name = "mlm"
    Config = MLMConfig

    def prepare(self, batch: dict) -> dict:
        ids, attention, seeds = batch["input_ids"], batch["attention_mask"], batch["seeds"]
        tables = self.tables
        words = word_index(ids, maskable_positions(ids, attention, tables), tables)
        mask = whole_word_mask(words, self.config.mask_ratio, seeds, ENCODER_MASK)
        corrupted = corrupt(
            ids, mask, seeds, tables, (ENCODER_REPLACE, ENCODER_RANDOM_IDS),
            self.config.mask_token_prob, self.config.random_token_prob,
        )
        return {**batch, "words": words, "encoder_input_ids": corrupted, "encoder_mask": mask}

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"mlm": batch["encoder_mask"].sum()}

    def encode(self, batch: dict) -> torch.Tensor:
        """Encoder states of the corrupted input, (B, L, D)."""
        return self.arch.forward(batch["encoder_input_ids"], batch["attention_mask"])

    def mlm_loss(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        return masked_lm_loss_sum(self.arch.head, hidden, batch["input_ids"], batch["encoder_mask"])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"mlm": self.mlm_loss(self.encode(batch), batch)}
