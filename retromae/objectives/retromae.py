"""RetroMAE (Xiao et al., EMNLP 2022; methods.md §1.2): encoder MLM plus a one-layer decoder that must rebuild
the text from the sentence embedding h.

Enhanced decoding: the decoder's queries are h + p_i for every position i; its keys and values are the
embeddings of the unmasked text with position 0 replaced by h. Row i attends to a random subset of columns
(a fresh whole-word mask per row hides about half of the words), never to column i itself, and always to
column 0 (h), except row 0. Padding is never visible. Every token but the special ones is predicted through
the encoder's own (tied) MLM head. L = L_enc + L_dec.
Basic decoding (the ablation): the decoder reads [h ; embeddings of the decoder-masked text] with plain
self-attention and predicts the masked tokens.

The visibility mask is built on the training device from per-example seeds, in a few tensor ops (the reference
implementation builds it per example in Python inside the data collator), a block of decoder rows at a time: each
row's mask is its own counter-based draw, so a block is exactly that part of the whole (B, L, L) mask. For long texts
(ModernBERT and EuroBERT read 8,192 tokens: an L x L visibility of 67M entries per text, and L x L attention scores
per head) the rows go through the decoder in blocks under activation checkpointing, each block's mask, attention
and logits built and dropped in turn; at 512 tokens one block holds every row.

The decoder matches the encoder (`retromae.decoders`, `retromae.architectures`): BERT's post-LN layer on BERT, a
pre-norm gated layer closed by a final norm on ModernBERT, and so on. Where the encoder has absolute positions the
query stream is h + p_i; where positions are rotary (ModernBERT, EuroBERT, GTE) or relative (DeBERTa-v3), the query
stream is h and the decoder's attention rotates queries and keys by their positions (our default for encoders without
a position table to add).

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
from retromae.decoders import DecoderLayer, make_norm
from retromae.objectives.base import masked_lm_loss_sum, maybe_recomputed, register
from retromae.objectives.mlm import MaskedLM, MLMConfig

# Attention scores held at once by the enhanced decoder (texts x rows x columns x heads): 2^26 is 256 MB in fp32.
ATTENTION_BUDGET = 1 << 26


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


def decoder_visibility(words: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """Enhanced decoding's (B, L, L) mask, or its `rows` (R,) only, (B, R, L); [b, i, j] = row i may attend to
    column j.

    `hidden` holds each row's fresh whole-word mask. Row i sees the columns its mask leaves visible (special tokens
    are never masked), never column i, always column 0 (h) unless i = 0, and never padding. A row left with nothing
    to see (only possible for rows that are never predicted: [CLS] of a text with no other visible token, or a
    padding row) is given column 0 so attention stays finite.
    """
    length = words.shape[1]
    if rows is None:
        rows = torch.arange(length, device=words.device)
    itself = rows[:, None] == torch.arange(length, device=words.device)[None, :]
    visible = attention_mask.bool()[:, None, :] & ~hidden & ~itself
    visible[:, :, 0] |= (rows > 0)[None, :]
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
        spec = self.arch.decoder_spec()
        self.decoder = DecoderLayer(spec)
        if spec.prenorm:  # the encoder's head reads normalised states
            self.decoder_norm = make_norm(spec)
        self.loss_weights = {"decoder": config.decoder_loss_weight}
        if config.encoder_masking == "remove":
            from retromae.objectives.maelm import ReinsertionDecoder

            self.removal_decoder = ReinsertionDecoder(spec, config.removal_decoder_layers)
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

    def rows_hidden(self, batch: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Enhanced decoding: the words each decoder row hides, (B, L, L) or (B, R, L) for `rows`; each (row, word)
        drawn independently."""
        words, seeds, ratio = batch["words"], batch["seeds"], self.config.decoder_mask_ratio
        if self.config.decoder_masking == "uniform":
            return per_row_whole_word_masks(words, ratio, seeds, DECODER_MASK, rows)
        chance = batch.get("word_chance")
        if chance is None:
            chance = self.word_chance(batch)
        return per_row_word_masks(words, chance, seeds, DECODER_MASK, rows)

    def word_chance(self, batch: dict) -> torch.Tensor:
        """PMI decoder masking: each word's probability of being hidden from a row, (B, W)."""
        words, ratio = batch["words"], self.config.decoder_mask_ratio
        return capped_proportional(self.word_importance(batch), word_lengths(words), ratio * (words >= 0).sum(-1))

    def visibility(self, batch: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Enhanced decoding's visibility (B, L, L), or that of `rows` (B, R, L): `decoder_visibility` of the rows'
        fresh masks."""
        return decoder_visibility(batch["words"], batch["attention_mask"], self.rows_hidden(batch, rows), rows)

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
            # the visibility itself is built a block of rows at a time in `decode_loss` (it is L x L per text)
            if self.config.decoder_masking == "pmi":
                batch["word_chance"] = self.word_chance(batch)
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

        return encode_kept(self.arch, batch["input_ids"], batch["attention_mask"], batch["encoder_mask"],
                           self._pad_id)

    def mlm_loss(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """L_enc: MLM on the encoder's states, or (encoder_masking remove) MAE-LM's decoder filling in the removed
        words."""
        if self.config.encoder_masking == "remove":
            hidden = self.removal_decoder(self.arch, hidden, batch["encoder_mask"], batch["attention_mask"],
                                          self._mask_id)
        return super().mlm_loss(hidden, batch)

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"mlm": batch["encoder_mask"].sum(), "decoder": batch["decoder_targets"].sum()}

    def decoder_positions(self, length: int, device) -> torch.Tensor | None:
        """Positions the decoder's attention rotates by (rotary specs), else None (positions come with the inputs)."""
        return torch.arange(length, device=device) if self.decoder.attention.rotary is not None else None

    def finish(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoder states as the MLM head reads them (a pre-norm decoder's final norm)."""
        norm = getattr(self, "decoder_norm", None)
        return norm(decoded) if norm is not None else decoded

    def decode_loss(self, h: torch.Tensor, batch: dict) -> torch.Tensor:
        """The decoder's summed cross-entropy, rebuilding the text from the sentence embedding h (B, D). Enhanced
        decoding goes a block of rows at a time: each block's visibility, attention, feed-forward and logits exist
        only while the block is computed (and are recomputed in the backward pass when there are several blocks)."""
        ids, targets = batch["input_ids"], batch["decoder_targets"]
        if self.config.decoding == "basic":
            return masked_lm_loss_sum(self.arch.head, self.decode(h, batch), ids, targets)
        streams, blocks = self.streams(h, batch), self.row_blocks(batch)
        return sum(maybe_recomputed(len(blocks) > 1, self.rows_loss, *streams, batch, rows) for rows in blocks)

    def decode(self, h: torch.Tensor, batch: dict) -> torch.Tensor:
        """Decoder states (B, L, D), as the MLM head reads them, rebuilt from the sentence embedding h (B, D)."""
        if self.config.decoding == "basic":
            ids = batch["decoder_input_ids"]
            positions = self.decoder_positions(ids.shape[1], ids.device)
            context = torch.cat([h[:, None], self.arch.embed(ids)[:, 1:]], dim=1)
            return self.finish(self.decoder(context, context, batch["attention_mask"].bool()[:, None, :], positions))
        streams = self.streams(h, batch)
        return torch.cat([self.decoded_rows(*streams, batch, rows) for rows in self.row_blocks(batch)], dim=1)

    def streams(self, h: torch.Tensor, batch: dict):
        """Enhanced decoding's query stream (B, L, D: h + p_i, or h where positions are rotary), the keys and values
        of its context stream [h ; embeddings of the unmasked text], computed once, and the rotary positions."""
        ids = batch["input_ids"]
        length = ids.shape[1]
        positions = self.decoder_positions(length, ids.device)
        context = torch.cat([h[:, None], self.arch.embed(ids)[:, 1:]], dim=1)
        if positions is None:
            query = h[:, None] + self.arch.absolute_positions(length, h.device)[None].to(h.dtype)
        else:
            query = h[:, None].expand(-1, length, -1)
        return query, self.decoder.context_keys_values(context, positions), positions

    def row_blocks(self, batch: dict) -> list[torch.Tensor]:
        """The decoder's rows in blocks whose attention scores fit ATTENTION_BUDGET (one block at 512 tokens)."""
        batch_size, length = batch["input_ids"].shape
        block = max(1, ATTENTION_BUDGET // max(1, batch_size * length * self.decoder.attention.heads))
        return list(torch.arange(length, device=batch["input_ids"].device).split(block))

    def decoded_rows(self, query: torch.Tensor, keys_values, positions, batch: dict, rows: torch.Tensor):
        """Decoder states of rows `rows`, (B, R, D)."""
        decoded = self.decoder.attend(query[:, rows], keys_values, self.visibility(batch, rows),
                                      None if positions is None else positions[rows])
        return self.finish(self.decoder.rest(decoded))

    def rows_loss(self, query, keys_values, positions, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of decoder rows `rows`."""
        return masked_lm_loss_sum(self.arch.head, self.decoded_rows(query, keys_values, positions, batch, rows),
                                  batch["input_ids"][:, rows], batch["decoder_targets"][:, rows])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        hidden = self.encode(batch)
        return {"mlm": self.mlm_loss(hidden, batch), "decoder": self.decode_loss(hidden[:, 0], batch)}
