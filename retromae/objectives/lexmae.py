"""LexMAE, lexicon-bottlenecked masked autoencoder (Shen et al., ICLR 2023; methods.md §1.13): the masked-autoencoder
family's pretraining for learned sparse retrieval (SPLADE), written against the encoder adapter so it runs on
every family.

- Encoder E with its MLM head: the text masked at `mask_ratio` 0.30, exactly ceil(0.30 n) of its n ordinary tokens
  (token-level, as the released command runs; `whole_word: true` masks whole words at that ratio instead), 80/10/10
  replacement; L_enc = cross-entropy on the masked positions (loss "mlm").
- Lexicon-importance distribution: a = softmax(max_i S_i) in R^V, S_i = E's MLM logits on the *masked* input at
  every position that is neither special ([CLS] / [SEP]) nor padding, [MASK] positions included; a plain softmax
  (no temperature, no ReLU / log). The max runs over bounded blocks of positions (`max_pooled_logits`), so the
  (B, L, V) logits never exist at once.
- Bottleneck: b = a W_e, W_e = E's input word-embedding matrix under stop-gradient (no gradient reaches W_e through
  b); no normalisation. On a family whose word embeddings are narrower than its layers (ELECTRA) b is taken to the
  layers' width by the encoder's own projection (`from_embedding_space`).
- Weakened decoder D: `decoder_layers` (2) new, randomly initialised layers shaped like the encoder's
  (retromae.decoders), plain self-attention over the real tokens, reading E's embedding layer on the original text
  re-masked at `decoder_mask_ratio` 0.5 overall: E's masked positions plus fresh ones, each remaining ordinary token
  with probability (0.5 - 0.3) / (1 - 0.3), 80/10/10 drawn again; position 0 ([CLS]) replaced by b, with no position
  embedding added. Its head: a new transform (dense, activation, LayerNorm, to the embedding width) and the output
  matrix tied to W_e (with a bias of its own). L_dec = cross-entropy on the decoder-masked positions (loss
  "decoder", weight `decoder_weight` 1). D is not exported.
L = L_enc + L_dec; every loss is a sum over its own tokens, so it is exact across processes and accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from retromae.architectures import MLMHead, TiedProjection
from retromae.config import ConfigError
from retromae.decoders import DecoderStack, activation, init_linear_layers, padding_visibility
from retromae.masking import (
    DECODER_MASK,
    DECODER_RANDOM_IDS,
    DECODER_REPLACE,
    ENCODER_MASK,
    ENCODER_RANDOM_IDS,
    ENCODER_REPLACE,
    choose_words,
    corrupt,
    maskable_positions,
    whole_word_mask,
    word_index,
    word_lengths,
)
from retromae.objectives.base import masked_lm_loss_sum, max_pooled_logits, register
from retromae.objectives.mlm import MaskedLM, MLMConfig
from retromae.rng import uniform


@dataclass
class LexMAEConfig(MLMConfig):
    name: str = "lexmae"  # which objective
    mask_ratio: float = 0.3  # share of ordinary tokens masked in the encoder input: exactly ceil(ratio x n)
    whole_word: bool = False  # mask whole words (at mask_ratio) instead of single tokens (the paper's run: tokens)
    decoder_mask_ratio: float = 0.5  # share of ordinary tokens masked in the decoder input, E's masked ones included
    decoder_layers: int = 2  # randomly initialised decoder layers (the paper: 2)
    decoder_weight: float = 1.0  # weight of the decoder loss (the paper: 1)

    def validate(self) -> None:
        super().validate()
        if not self.mask_ratio <= self.decoder_mask_ratio < 1:
            raise ConfigError(f"objective.decoder_mask_ratio={self.decoder_mask_ratio} must be in [mask_ratio, 1): "
                              "the decoder's mask contains the encoder's", key="decoder_mask_ratio")
        if self.decoder_layers < 1:
            raise ConfigError("objective.decoder_layers must be >= 1", key="decoder_layers")


def exact_count_mask(maskable: torch.Tensor, ratio: float, seeds: torch.Tensor, stream: int) -> torch.Tensor:
    """Exactly ceil(ratio x n) of each row's n maskable tokens, chosen uniformly (token-level): bool (B, L)."""
    tokens = (maskable.long().cumsum(-1) - 1).masked_fill(~maskable, -1)  # every token its own "word"
    count = maskable.sum(-1)
    targets = torch.ceil(count.double() * ratio - 1e-9).long()  # - 1e-9: 0.3 x 10 is 3.0000000000000004
    priority = uniform(seeds, stream, torch.arange(maskable.shape[1], device=maskable.device)[None])
    chosen = choose_words(word_lengths(tokens), targets, priority)
    return chosen.gather(-1, tokens.clamp(min=0)) & maskable


def decoder_remask(encoder_mask: torch.Tensor, maskable: torch.Tensor, encoder_ratio: float, decoder_ratio: float,
                   seeds: torch.Tensor) -> torch.Tensor:
    """The decoder's mask: the encoder's masked positions plus each other maskable token with probability
    (decoder_ratio - encoder_ratio) / (1 - encoder_ratio), so that decoder_ratio of the tokens are masked overall."""
    fresh = (decoder_ratio - encoder_ratio) / (1.0 - encoder_ratio)
    u = uniform(seeds, DECODER_MASK, torch.arange(maskable.shape[1], device=maskable.device)[None])
    return encoder_mask | (maskable & ~encoder_mask & (u < fresh))


def lexicon_importance(pooled_logits: torch.Tensor) -> torch.Tensor:
    """a = softmax(max_i S_i): a plain softmax of the max-pooled logits (a text with no position to pool, all -inf,
    gets the uniform distribution rather than NaNs)."""
    return torch.where(torch.isfinite(pooled_logits), pooled_logits, 0.0).softmax(-1)


@register
class LexMAE(MaskedLM):
    name = "lexmae"
    Config = LexMAEConfig

    def __init__(self, encoder, tokenizer, config: LexMAEConfig):
        super().__init__(encoder, tokenizer, config)
        spec = self.arch.decoder_spec()
        self.decoder = DecoderStack(spec, config.decoder_layers)
        embeddings = self.arch.word_embeddings
        width = embeddings.embedding_dim
        self.decoder_transform = nn.Sequential(nn.Linear(spec.hidden, width), activation(spec.activation),
                                               nn.LayerNorm(width, eps=spec.norm_eps))
        init_linear_layers(self.decoder_transform, spec.init_std)
        self.decoder_bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))
        self.loss_weights = {"decoder": config.decoder_weight}

    @property
    def decoder_head(self) -> MLMHead:
        """The decoder's head: its own transform, the output matrix tied to W_e, its own bias (a view built on use, so
        the word embeddings are not registered a second time under this objective)."""
        return MLMHead(self.decoder_transform, TiedProjection(self.arch.word_embeddings, self.decoder_bias))

    def prepare(self, batch: dict) -> dict:
        ids, attention, seeds = batch["input_ids"], batch["attention_mask"], batch["seeds"]
        tables, cfg = self.tables, self.config
        maskable = maskable_positions(ids, attention, tables)
        words = word_index(ids, maskable, tables)
        if cfg.whole_word:
            mask = whole_word_mask(words, cfg.mask_ratio, seeds, ENCODER_MASK)
        else:
            mask = exact_count_mask(maskable, cfg.mask_ratio, seeds, ENCODER_MASK)
        corrupted = corrupt(ids, mask, seeds, tables, (ENCODER_REPLACE, ENCODER_RANDOM_IDS), cfg.mask_token_prob,
                            cfg.random_token_prob)
        decoder_mask = decoder_remask(mask, maskable, cfg.mask_ratio, cfg.decoder_mask_ratio, seeds)
        decoder_ids = corrupt(ids, decoder_mask, seeds, tables, (DECODER_REPLACE, DECODER_RANDOM_IDS),
                              cfg.mask_token_prob, cfg.random_token_prob)
        return {**batch, "words": words, "encoder_input_ids": corrupted, "encoder_mask": mask,
                "lexicon_positions": maskable, "decoder_input_ids": decoder_ids, "decoder_mask": decoder_mask}

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"mlm": batch["encoder_mask"].sum(), "decoder": batch["decoder_mask"].sum()}

    def bottleneck(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """b = softmax(max over the lexicon positions of the MLM logits) W_e, W_e detached: (B, embedding width)."""
        importance = lexicon_importance(max_pooled_logits(self.arch.head, hidden, batch["lexicon_positions"]))
        weights = self.arch.word_embeddings.weight.detach()
        return importance.to(weights.dtype) @ weights

    def decoder_inputs(self, b: torch.Tensor, batch: dict) -> torch.Tensor:
        """E's embedding layer on the decoder's input, position 0 replaced by b itself (no position embedding)."""
        embedded = self.arch.embed(batch["decoder_input_ids"])
        first = self.arch.from_embedding_space(b).to(embedded.dtype)
        return torch.cat([first[:, None], embedded[:, 1:]], dim=1)

    def decode(self, x: torch.Tensor, batch: dict) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device) if self.decoder.layers[0].attention.rotary else None
        return self.decoder(x, padding_visibility(batch["attention_mask"]), positions)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        hidden = self.encode(batch)
        decoded = self.decode(self.decoder_inputs(self.bottleneck(hidden, batch), batch), batch)
        return {"mlm": self.mlm_loss(hidden, batch),
                "decoder": masked_lm_loss_sum(self.decoder_head, decoded, batch["input_ids"], batch["decoder_mask"])}
