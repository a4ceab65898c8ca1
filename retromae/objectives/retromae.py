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

Two switches beyond the paper (uniform and mask stay the defaults):
- `decoder_masking: pmi`, the challenging decoder (Li et al., 2023; methods.md §1.8): the decoder's words are hidden
  with probability growing with their importance, PMI(w, d) = log(tf(w, d) / |d|) - log(cf(w) / |C|), tf counted
  per example on the device over its ordinary tokens, cf and |C| from the corpus statistics that `retromae pretrain`
  attaches from the example cache (`attach_corpus_statistics`). Our defaults (config fields and rules): a word's score
  is the largest PMI of its pieces (a rare stem keeps a word informative whatever its common suffix) floored at
  `pmi_floor`; a token absent from the statistics counts as seen once. Enhanced decoding: each (row, word) is hidden
  independently with probability proportional to the score, capped at 1 and scaled per text so that the expected
  hidden share stays `decoder_mask_ratio` (the uniform case is the same draw with equal scores). Basic decoding:
  words drawn without replacement in proportion to the score until the ratio is reached.
- `encoder_masking: remove`: MAE-LM's encoder side (methods.md §1.10, `retromae.objectives.maelm`): masked words are
  removed from the encoder input instead of replaced, and L_enc is MAE-LM's shallow decoder predicting them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from retromae.config import ConfigError
from retromae.masking import (
    DECODER_MASK,
    DECODER_RANDOM_IDS,
    DECODER_REPLACE,
    ENCODER_MASK,
    capped_proportional,
    corrupt,
    maskable_positions,
    per_row_whole_word_masks,
    per_row_word_masks,
    weighted_whole_word_mask,
    whole_word_mask,
    word_index,
    word_lengths,
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
    decoder_masking: str = "uniform"  # words the decoder hides: uniform | pmi (by importance; needs corpus statistics)
    pmi_floor: float = 0.1  # decoder_masking pmi: a word's score is max(PMI, pmi_floor), so every word can be hidden
    encoder_masking: str = "mask"  # mask: [MASK] / 80-10-10 in the encoder input | remove: masked words dropped (MAE-LM)
    removal_decoder_layers: int = 4  # encoder_masking remove: layers of MAE-LM's decoder that predicts removed words

    def validate(self) -> None:
        super().validate()
        if self.decoding not in ("enhanced", "basic"):
            raise ConfigError(f"objective.decoding={self.decoding!r} must be 'enhanced' or 'basic'")
        if not 0 <= self.decoder_mask_ratio < 1:
            raise ConfigError(f"objective.decoder_mask_ratio={self.decoder_mask_ratio} must be in [0, 1)")
        if self.decoder_masking not in ("uniform", "pmi"):
            raise ConfigError(f"objective.decoder_masking={self.decoder_masking!r} must be 'uniform' or 'pmi'",
                              key="decoder_masking")
        if not self.pmi_floor > 0:
            raise ConfigError(f"objective.pmi_floor={self.pmi_floor} must be > 0", key="pmi_floor")
        if self.encoder_masking not in ("mask", "remove"):
            raise ConfigError(f"objective.encoder_masking={self.encoder_masking!r} must be 'mask' or 'remove'",
                              key="encoder_masking")
        if self.removal_decoder_layers < 1:
            raise ConfigError("objective.removal_decoder_layers must be >= 1", key="removal_decoder_layers")
        if self.encoder_masking == "remove" and getattr(self, "bow_positions", None) == "all":
            raise ConfigError("objective.encoder_masking=remove leaves the masked positions without encoder states, "
                              "so DupMAE cannot pool over them: use objective.bow_positions=unmasked",
                              key="bow_positions")


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


def pmi_word_scores(input_ids: torch.Tensor, words: torch.Tensor, log_collection_share: torch.Tensor,
                    floor: float) -> torch.Tensor:
    """Each word's importance, (B, L) indexed by word: max over its pieces of PMI(t, d) = log(tf(t, d) / |d|) -
    log(cf(t) / |C|), floored at `floor`. tf and |d| count the text's ordinary tokens; `log_collection_share` (V,)
    holds log(cf / |C|). Slots past the last word get the floor (they have no tokens, so they are never drawn)."""
    ordinary = words >= 0
    counts = torch.zeros(input_ids.shape[0], log_collection_share.shape[0], dtype=torch.int32, device=input_ids.device)
    counts.scatter_add_(1, input_ids, ordinary.int())
    share_in_text = counts.gather(1, input_ids).float() / ordinary.sum(-1, keepdim=True).clamp(min=1).float()
    piece_pmi = (share_in_text.log() - log_collection_share[input_ids]).masked_fill(~ordinary, float("-inf"))
    word_pmi = torch.full_like(piece_pmi, float("-inf")).scatter_reduce(1, words.clamp(min=0), piece_pmi, "amax")
    return word_pmi.clamp(min=floor)


@register
class RetroMAE(MaskedLM):
    name = "retromae"
    Config = RetroMAEConfig

    def __init__(self, encoder, tokenizer, config: RetroMAEConfig):
        super().__init__(encoder, tokenizer, config)
        self.decoder = DecoderLayer(encoder.config)
        self.loss_weights = {"decoder": config.decoder_loss_weight}
        if config.encoder_masking == "remove":
            from retromae.objectives.maelm import ReinsertionDecoder  # (maelm builds on this module's DecoderLayer)

            self.removal_decoder = ReinsertionDecoder(encoder.config, config.removal_decoder_layers)
        if config.decoder_masking == "pmi":
            self.register_buffer("_log_collection_share", None, persistent=False)
            # Offered only when used: `retromae pretrain` attaches statistics to objectives that have this hook (and
            # refuses streamed corpora for them), so uniform RetroMAE keeps streaming.
            self.attach_corpus_statistics = self._attach_corpus_statistics

    def _attach_corpus_statistics(self, token_counts: torch.Tensor, total_tokens: int) -> None:
        """The collection frequency cf (V,) of every token id and the collection size |C| in tokens, for PMI.
        Ids beyond `token_counts` and ids never counted are taken as seen once."""
        size = self._special.shape[0]
        counts = torch.ones(size, dtype=torch.float64)
        known = torch.as_tensor(token_counts)[:size].to(torch.float64)
        counts[: known.shape[0]] = known.clamp(min=1.0)
        share = counts.log() - math.log(max(int(total_tokens), 1))
        self._log_collection_share = share.float().to(self._special.device)

    def word_importance(self, batch: dict) -> torch.Tensor:
        """PMI scores of each text's words, (B, L) indexed by word (`pmi_word_scores`)."""
        if self._log_collection_share is None:
            raise ConfigError(
                "objective.decoder_masking=pmi needs corpus statistics, and none were attached: `retromae pretrain` "
                "attaches them from the example cache (data.streaming=false); in your own code call "
                "objective.attach_corpus_statistics(token_counts, total_tokens) first", key="decoder_masking")
        return pmi_word_scores(batch["input_ids"], batch["words"], self._log_collection_share, self.config.pmi_floor)

    def rows_hidden(self, batch: dict) -> torch.Tensor:
        """Enhanced decoding: the words each decoder row hides, (B, L, L); each (row, word) drawn independently."""
        words, seeds, ratio = batch["words"], batch["seeds"], self.config.decoder_mask_ratio
        if self.config.decoder_masking == "uniform":
            return per_row_whole_word_masks(words, ratio, seeds, DECODER_MASK)
        chance = capped_proportional(self.word_importance(batch), word_lengths(words), ratio * (words >= 0).sum(-1))
        return per_row_word_masks(words, chance, seeds, DECODER_MASK)

    def decoder_mask(self, batch: dict) -> torch.Tensor:
        """Basic decoding: the words masked in the decoder's input, (B, L)."""
        words, seeds, ratio = batch["words"], batch["seeds"], self.config.decoder_mask_ratio
        if self.config.decoder_masking == "uniform":
            return whole_word_mask(words, ratio, seeds, DECODER_MASK)
        return weighted_whole_word_mask(words, self.word_importance(batch), ratio, seeds, DECODER_MASK)

    def prepare(self, batch: dict) -> dict:
        batch = self.prepare_encoder(batch)
        words, seeds = batch["words"], batch["seeds"]
        if self.config.decoding == "enhanced":
            batch["decoder_visible"] = decoder_visibility(words, batch["attention_mask"], self.rows_hidden(batch))
            batch["decoder_targets"] = words >= 0
        else:
            mask = self.decoder_mask(batch)
            batch["decoder_input_ids"] = corrupt(
                batch["input_ids"], mask, seeds, self.tables, (DECODER_REPLACE, DECODER_RANDOM_IDS),
                self.config.mask_token_prob, self.config.random_token_prob,
            )
            batch["decoder_targets"] = mask
        return batch

    def prepare_encoder(self, batch: dict) -> dict:
        """The encoder's mask; its input corrupted (mask) or, with encoder_masking remove, left for `encode` to drop."""
        if self.config.encoder_masking == "mask":
            return super().prepare(batch)
        ids, attention = batch["input_ids"], batch["attention_mask"]
        words = word_index(ids, maskable_positions(ids, attention, self.tables), self.tables)
        mask = whole_word_mask(words, self.config.mask_ratio, batch["seeds"], ENCODER_MASK)
        return {**batch, "words": words, "encoder_mask": mask}

    def encode(self, batch: dict) -> torch.Tensor:
        if self.config.encoder_masking == "mask":
            return super().encode(batch)
        from retromae.objectives.maelm import encode_kept

        return encode_kept(self.encoder, batch["input_ids"], batch["attention_mask"], batch["encoder_mask"],
                           self._pad_id)

    def mlm_loss(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """L_enc: MLM on the encoder's states, or (encoder_masking remove) MAE-LM's decoder filling in the removed
        words."""
        if self.config.encoder_masking == "remove":
            hidden = self.removal_decoder(self.encoder, hidden, batch["encoder_mask"], batch["attention_mask"],
                                          self._mask_id)
        return super().mlm_loss(hidden, batch)

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
