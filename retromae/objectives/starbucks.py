"""Starbucks SMAE pretraining, 2D Matryoshka masked auto-encoding (Zhuang et al., 2024; methods.md §1.11).

Every (layer, dim) pair of `pairs` ((2,32) (4,64) (6,128) (8,256) (10,512) (12,768) for BERT-base) trains the first
`dim` coordinates of layer `layer`'s states to work on their own:
- MLM from the truncated states: the encoder's MLM head with its first dense weight sliced to its first `dim` input
  columns, predicting the encoder-masked tokens (loss "mlm_<layer>x<dim>");
- MAE: a one-layer decoder, initialised from the pretrained model's layer 0 (a copy, trained on its own; plain
  self-attention over the real tokens), reads embeddings(decoder-masked text) with position 0 replaced by the
  truncated [CLS] mapped back to the full width by the head's (sliced) transform, and predicts the decoder-masked
  tokens through the full MLM head (loss "mae_<layer>x<dim>").
Masks are nested whole-word masks: the encoder's (`mask_ratio` 0.2) is the first part of the decoder's
(`decoder_mask_ratio` 0.4), the same word order cut at two lengths; both inputs get 80/10/10 replacement.
L = mean over pairs of (MLM + MAE) / 2: each named loss has weight 1 / (2 x pairs).

Our defaults where the paper leaves it open: one decoder shared by all pairs; 80/10/10 on both inputs. Any family:
a layer's states are read as the MLM head reads them (a pre-norm encoder's final norm applied,
`Encoder.layer_states`); the truncated [CLS] goes through the head's transform with its first weight sliced, or, for
a head without a transform (EuroBERT), is padded with zeros to full width (the same as slicing an identity); a head
whose transform leads to a narrower embedding space (ELECTRA) is brought back to the layers' width by the encoder's
own projection; the decoder copy of layer 0 runs through the family's adapter with its own masks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from retromae.architectures import MLMHead
from retromae.config import ConfigError
from retromae.masking import (
    DECODER_RANDOM_IDS,
    DECODER_REPLACE,
    ENCODER_RANDOM_IDS,
    ENCODER_REPLACE,
    corrupt,
    maskable_positions,
    whole_word_mask,
    word_index,
)
from retromae.objectives.base import masked_lm_loss_sum, maybe_recomputed, register
from retromae.objectives.mlm import MaskedLM, MLMConfig

NESTED_MASK = 121  # random stream of the nested masks (one word order, cut at two lengths)
PAPER_PAIRS = ((2, 32), (4, 64), (6, 128), (8, 256), (10, 512), (12, 768))  # BERT-base's six (layer, dim) pairs


@dataclass
class StarbucksConfig(MLMConfig):
    name: str = "starbucks"  # which objective
    mask_ratio: float = 0.2  # share of ordinary tokens masked in the encoder input (whole words; the paper: 0.2)
    decoder_mask_ratio: float = 0.4  # share masked in the decoder input, containing the encoder's (the paper: 0.4)
    pairs: list[list[int]] = field(default_factory=lambda: [list(p) for p in PAPER_PAIRS])  # [layer, dim] pairs trained
    pair_checkpointing: bool = True  # recompute each pair's heads and decoder in the backward pass (saves memory)

    def validate(self) -> None:
        super().validate()
        if not self.mask_ratio <= self.decoder_mask_ratio < 1:
            raise ConfigError("objective.decoder_mask_ratio must be in [objective.mask_ratio, 1): the encoder's mask "
                              "is nested inside the decoder's", key="decoder_mask_ratio")
        if not self.pairs or any(len(p) != 2 or min(p) < 1 for p in self.pairs):
            raise ConfigError(f"objective.pairs={self.pairs}: give [layer, dim] pairs of positive integers",
                              key="pairs")
        if len({tuple(p) for p in self.pairs}) != len(self.pairs):
            raise ConfigError(f"objective.pairs={self.pairs} lists a pair twice", key="pairs")

    def loss_names(self) -> list[tuple[str, str]]:
        return [(f"mlm_{layer}x{dim}", f"mae_{layer}x{dim}") for layer, dim in self.pairs]


class TruncatedInput(nn.Module):
    """`module` run on inputs of `dim` features: its linear layer `linear` uses the first `dim` input columns of its
    weight (the same parameter, sliced: gradients reach those columns only)."""

    def __init__(self, module: nn.Module, linear: str, dim: int):
        super().__init__()
        self.module, self.linear, self.dim = module, linear, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.module.get_submodule(self.linear).weight
        return torch.func.functional_call(self.module, {f"{self.linear}.weight": weight[:, : self.dim]}, (x,))


class SlicedProjection(nn.Module):
    """A vocabulary projection reading only the first `dim` features: its weight's first `dim` columns (the same
    parameter, sliced)."""

    def __init__(self, projection: nn.Module, dim: int):
        super().__init__()
        self.projection, self.dim = projection, dim

    @property
    def weight(self) -> torch.Tensor:
        return self.projection.weight[:, : self.dim]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.projection.bias

    @property
    def out_features(self) -> int:
        return self.projection.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def first_linear(module: nn.Module) -> str | None:
    """The name of the first linear layer of `module` (the MLM head's dense transform), None if it has none."""
    return next((name for name, m in module.named_modules() if isinstance(m, nn.Linear)), None)


@register
class Starbucks(MaskedLM):
    name = "starbucks"
    Config = StarbucksConfig

    def __init__(self, encoder, tokenizer, config: StarbucksConfig):
        super().__init__(encoder, tokenizer, config)
        layers, hidden = self.arch.num_layers, self.arch.hidden_size
        wrong = [p for p in config.pairs if p[0] > layers or p[1] > hidden]
        if wrong:
            raise ConfigError(f"objective.pairs: {wrong} do not fit the model ({layers} layers of {hidden} dimensions);"
                              " every [layer, dim] needs layer <= layers and dim <= hidden size", key="pairs")
        # initialised from layer 0, then trained on its own; it shares the model's config (attention implementation)
        first = self.arch.layers[0]
        self.decoder = copy.deepcopy(first, {id(encoder.config): encoder.config})
        share = 1.0 / (2 * len(config.pairs))
        self.loss_weights = {name: share for pair in config.loss_names() for name in pair}

    def prepare(self, batch: dict) -> dict:
        ids, attention, seeds = batch["input_ids"], batch["attention_mask"], batch["seeds"]
        cfg, tables = self.config, self.tables
        words = word_index(ids, maskable_positions(ids, attention, tables), tables)
        decoder_mask = whole_word_mask(words, cfg.decoder_mask_ratio, seeds, NESTED_MASK)
        encoder_mask = whole_word_mask(words, cfg.mask_ratio, seeds, NESTED_MASK)  # same order, shorter: nested
        return {**batch, "words": words, "encoder_mask": encoder_mask, "decoder_mask": decoder_mask,
                "encoder_input_ids": corrupt(ids, encoder_mask, seeds, tables, (ENCODER_REPLACE, ENCODER_RANDOM_IDS),
                                             cfg.mask_token_prob, cfg.random_token_prob),
                "decoder_input_ids": corrupt(ids, decoder_mask, seeds, tables, (DECODER_REPLACE, DECODER_RANDOM_IDS),
                                             cfg.mask_token_prob, cfg.random_token_prob)}

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        items = {}
        for mlm, mae in self.config.loss_names():
            items[mlm], items[mae] = batch["encoder_mask"].sum(), batch["decoder_mask"].sum()
        return items

    def decode(self, cls: torch.Tensor, embedded: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder over [cls ; embedded[:, 1:]] (B, L, D), as the head reads states."""
        x = torch.cat([cls.unsqueeze(1), embedded[:, 1:]], dim=1)
        visible = attention_mask.bool()[:, None, :].expand(-1, x.shape[1], -1)
        return self.arch.final_norm(self.arch.run_layer(self.decoder, x, visible))

    def truncated_cls(self, cls: torch.Tensor, dim: int) -> torch.Tensor:
        """The first `dim` coordinates of a [CLS] state mapped back to the layers' width through the head's transform
        (its first weight sliced to `dim` input columns)."""
        transform = self.arch.head.transform
        if first_linear(transform) is None:  # no transform: slicing an identity is padding with zeros
            return torch.nn.functional.pad(cls, (0, self.arch.hidden_size - dim))
        return self.arch.from_embedding_space(TruncatedInput(transform, first_linear(transform), dim)(cls))

    def truncated_head(self, dim: int) -> MLMHead:
        """The MLM head reading `dim` features: its first linear layer's weight cut to its first `dim` columns (the
        projection's, for a head without a transform)."""
        head = self.arch.head
        linear = first_linear(head.transform)
        if linear is None:
            return MLMHead(head.transform, SlicedProjection(head.projection, dim))
        return MLMHead(TruncatedInput(head.transform, linear, dim), head.projection)

    def pair_losses(self, states: torch.Tensor, dim: int, embedded: torch.Tensor,
                    batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed MLM, summed MAE) of one pair, from its layer's states cut to their first `dim` coordinates."""
        head = self.arch.head
        truncated = states[..., :dim]
        mlm = masked_lm_loss_sum(self.truncated_head(dim), truncated, batch["input_ids"], batch["encoder_mask"])
        decoded = self.decode(self.truncated_cls(truncated[:, 0], dim), embedded, batch["attention_mask"])
        return mlm, masked_lm_loss_sum(head, decoded, batch["input_ids"], batch["decoder_mask"])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        states = self.arch.layer_states(batch["encoder_input_ids"], batch["attention_mask"])
        embedded = self.arch.embed(batch["decoder_input_ids"])
        # Six pairs each keep their vocabulary logits and a decoder pass for the backward pass: 1.6x MLM's peak at
        # BERT-base 4 x 512 (measured). Under checkpointing a pair keeps only its inputs (shared by all pairs) and is
        # recomputed in the backward pass, with the same dropout masks (the checkpoint restores the random state).
        losses = {}
        for (layer, dim), (mlm, mae) in zip(self.config.pairs, self.config.loss_names()):
            losses[mlm], losses[mae] = maybe_recomputed(self.config.pair_checkpointing, self.pair_losses,
                                                        states[layer], dim, embedded, batch)
        return losses
