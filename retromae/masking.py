"""Whole-word masking, vectorised on the training device.

Every function works on padded id tensors already on the device; randomness comes from `retromae.rng`, so a
mask depends only on its example's seed. Word boundaries come from a per-vocabulary table (WordPiece "##"
continuations, or the word-start marker of byte-level BPE / SentencePiece vocabularies), so no per-example
Python runs during training.

Written by hand: Hugging Face's collators mask on the CPU, per batch, from a stateful generator (and v5's
whole-word mode needs offset mappings and drops the 10% random replacement); RetroMAE's decoder also needs a
fresh whole-word mask for every row of every example, which no library builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retromae.rng import uniform

# A fixed stride for counters indexed by (row, column): it keeps random numbers independent of padding.
MAX_POSITIONS = 1 << 14

# Stream ids: each use of randomness draws from its own stream so that uses never share numbers.
ENCODER_MASK, ENCODER_REPLACE, ENCODER_RANDOM_IDS = 1, 2, 3
DECODER_MASK, DECODER_REPLACE, DECODER_RANDOM_IDS = 11, 12, 13


class TokenizerError(ValueError):
    """The tokenizer cannot be used for masked-language-model pretraining."""


@dataclass
class TokenTables:
    """Per-vocabulary lookup tables for masking, built once from the tokenizer."""

    special: torch.Tensor  # bool [V]: special tokens are never masked and never predicted
    continuation: torch.Tensor  # bool [V]: the token continues the word of the token before it
    replacement_ids: torch.Tensor  # long [N]: ordinary tokens, drawn for the 10% random replacement
    mask_id: int
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int | None = None, name: str = "") -> "TokenTables":
        check_text_start(tokenizer, name)
        if tokenizer.mask_token_id is None:
            raise TokenizerError(
                f"tokenizer {name or tokenizer.name_or_path!r} has no mask token, so it cannot be used for masked "
                "language modelling; pick a BERT-like tokenizer (one with [MASK] / <mask>) in model.tokenizer"
            )
        if tokenizer.pad_token_id is None:
            raise TokenizerError(
                f"tokenizer {name or tokenizer.name_or_path!r} has no padding token; set one (e.g. "
                "tokenizer.pad_token = tokenizer.unk_token) and save it, or pick another tokenizer"
            )
        vocab = tokenizer.get_vocab()
        size = max(max(vocab.values()) + 1, vocab_size or 0, len(tokenizer))
        special = torch.zeros(size, dtype=torch.bool)
        special[list(tokenizer.all_special_ids)] = True
        continuation = torch.zeros(size, dtype=torch.bool)
        kind, marker = _word_marker(tokenizer)
        for token, idx in vocab.items():
            if kind == "continuation-prefix":
                continuation[idx] = token.startswith(marker)
            elif kind == "start-prefix":
                continuation[idx] = not token.startswith(marker)
        in_vocab = torch.zeros(size, dtype=torch.bool)
        in_vocab[list(vocab.values())] = True
        replacement_ids = torch.nonzero(in_vocab & ~special).squeeze(1)
        return cls(special, continuation, replacement_ids, int(tokenizer.mask_token_id), int(tokenizer.pad_token_id))

    def to(self, device) -> "TokenTables":
        return TokenTables(
            self.special.to(device),
            self.continuation.to(device),
            self.replacement_ids.to(device),
            self.mask_id,
            self.pad_id,
        )


def check_text_start(tokenizer, name: str = "") -> None:
    """Every objective reads a text's vector at position 0 (h, the sentence embedding): the tokenizer must put a
    special token there ([CLS], <s>, a BOS), whatever its family calls it."""
    encoded = tokenizer("retrieval", add_special_tokens=True)["input_ids"]
    if not encoded or encoded[0] not in set(tokenizer.all_special_ids):
        raise TokenizerError(
            f"tokenizer {name or tokenizer.name_or_path!r} puts no special token before a text ([CLS], <s> or a BOS): "
            "the objectives read the text's vector at position 0; give its tokenizer.json a post-processor that adds "
            "one (as the family's own tokenizer does), or pick that tokenizer in model.tokenizer")


def _word_marker(tokenizer) -> tuple[str, str]:
    """How the vocabulary marks words: ('continuation-prefix', '##') or ('start-prefix', 'Ġ' / '▁')."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.model
        kind = type(model).__name__
        if kind == "WordPiece":
            return "continuation-prefix", model.continuing_subword_prefix or "##"
        pre = repr(backend.pre_tokenizer)
        if "ByteLevel" in pre:
            return "start-prefix", "\u0120"  # 'Ġ'
        if "Metaspace" in pre or kind == "Unigram":
            return "start-prefix", "\u2581"  # '▁'
    vocab = tokenizer.get_vocab()
    if any(t.startswith("##") for t in vocab):
        return "continuation-prefix", "##"
    raise TokenizerError(
        f"cannot tell word boundaries in the vocabulary of tokenizer {tokenizer.name_or_path!r} "
        "(neither WordPiece '##' pieces nor a byte-level/SentencePiece word-start marker); "
        "whole-word masking needs one of those"
    )


def maskable_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, tables: TokenTables) -> torch.Tensor:
    """Positions that can be masked or predicted: real tokens that are not special."""
    return attention_mask.bool() & ~tables.special[input_ids]


def word_index(input_ids: torch.Tensor, maskable: torch.Tensor, tables: TokenTables) -> torch.Tensor:
    """Index of each maskable token's word within its row (0, 1, ...); -1 for unmaskable positions.

    A word starts at a maskable token that is not a continuation piece, or whose left neighbour is unmaskable.
    """
    previous_maskable = torch.nn.functional.pad(maskable[:, :-1], (1, 0), value=False)
    starts = maskable & (~tables.continuation[input_ids] | ~previous_maskable)
    index = starts.long().cumsum(-1) - 1
    return index.masked_fill(~maskable, -1)


def word_lengths(words: torch.Tensor) -> torch.Tensor:
    """Tokens per word, shape (B, L): entry w is the length of word w of the row (0 past the last word)."""
    lengths = torch.zeros_like(words)
    return lengths.scatter_add_(-1, words.clamp(min=0), (words >= 0).long())


def mask_targets(maskable: torch.Tensor, ratio: float) -> torch.Tensor:
    """How many tokens to mask per row: round(ratio * maskable tokens), at least one where any exists."""
    n = maskable.sum(-1)
    target = torch.round(n.to(torch.float32) * ratio).long()
    return torch.where(n > 0, target.clamp(min=1), target)


def choose_words(lengths: torch.Tensor, targets: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """Take words in random priority order while fewer than `targets` tokens are taken.

    lengths (B, W) and targets (B,) broadcast against priority (B, ..., W). Returns bool (B, ..., W).
    The masked token count lands in [target, target + longest word - 1], as with Hugging Face's collator.
    """
    shape = priority.shape
    lengths = lengths.view(shape[0], *([1] * (len(shape) - 2)), shape[-1]).expand(shape)
    priority = priority.masked_fill(lengths == 0, 2.0)  # empty slots sort last
    order = priority.argsort(-1)
    sorted_lengths = lengths.gather(-1, order)
    taken_before = sorted_lengths.cumsum(-1) - sorted_lengths
    targets = targets.view(shape[0], *([1] * (len(shape) - 1)))
    take = (taken_before < targets) & (sorted_lengths > 0)
    return torch.zeros_like(take).scatter_(-1, order, take)


def whole_word_mask(words: torch.Tensor, ratio: float, seeds: torch.Tensor, stream: int) -> torch.Tensor:
    """One whole-word mask per row at `ratio` of the maskable tokens. Returns bool (B, L)."""
    maskable = words >= 0
    seq_len = words.shape[1]
    priority = uniform(seeds, stream, torch.arange(seq_len, device=words.device)[None])
    chosen = choose_words(word_lengths(words), mask_targets(maskable, ratio), priority)
    return chosen.gather(-1, words.clamp(min=0)) & maskable


def per_row_whole_word_masks(words: torch.Tensor, ratio: float, seeds: torch.Tensor, stream: int,
                             rows: torch.Tensor | None = None) -> torch.Tensor:
    """A fresh whole-word mask for every row of every example: bool (B, L, L), [b, i, j] = column j is masked
    in row i's mask; with `rows` (R,), only those rows, (B, R, L), each exactly as in the full mask (a long text's
    decoder builds its rows a block at a time).

    Each word is masked independently with probability `ratio` (the rule of Hugging Face v5's whole-word
    collator; the expected share is `ratio`). The draw is indexed by (row, word), so every piece of a word
    shares it, and rows use a fixed stride, so padding changes nothing. An exact count per row (as the encoder
    mask has) would need a sort of B x L x L keys, 10x the cost of this whole function on a CPU.
    """
    counters = _row_word_counters(words, rows)
    return (uniform(seeds, stream, counters) < ratio) & (words >= 0)[:, None, :]


def _row_word_counters(words: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """(B, R, L) int32 counters indexed by (row, word of the column): the draws of `per_row_*` masks."""
    seq_len = words.shape[1]
    if seq_len > MAX_POSITIONS:
        raise ValueError(f"sequence length {seq_len} exceeds {MAX_POSITIONS}")
    if rows is None:
        rows = torch.arange(seq_len, device=words.device)
    rows = rows.to(device=words.device, dtype=torch.int32) * MAX_POSITIONS
    return rows[None, :, None] + words.clamp(min=0).to(torch.int32)[:, None, :]


def corrupt(
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    seeds: torch.Tensor,
    tables: TokenTables,
    streams: tuple[int, int],
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> torch.Tensor:
    """BERT's replacement of masked tokens: [MASK] with mask_prob, a random ordinary token with random_prob,
    the original token otherwise."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    u = uniform(seeds, streams[0], positions)
    pick = uniform(seeds, streams[1], positions)
    n = tables.replacement_ids.numel()
    random_ids = tables.replacement_ids[(pick * n).long().clamp(max=n - 1)]
    out = torch.where(mask & (u < mask_prob), tables.mask_id, input_ids)
    use_random = mask & (u >= mask_prob) & (u < mask_prob + random_prob)
    return torch.where(use_random, random_ids, out)


# ----- weighted word masks, word deletion, removal layouts (SEED, CoT-MAE, PMI decoder, TSDAE, MAE-LM ...) ---------


def derived_seeds(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """Another 32-bit seed per example, independent of `seeds` for the generator: for objectives that turn one
    example into several rows (two spans of one document) and mask each row with the same masking functions."""
    from retromae.rng import _signed, mix32, mix32_int, to_int32

    return mix32(to_int32(seeds) ^ _signed(mix32_int(salt ^ 0x5A17)))


def capped_proportional(weights: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-word probabilities p (B, W) proportional to `weights` and capped at 1, scaled per row so that the expected
    number of tokens taken, sum_w p_w * lengths_w, equals `targets` (B,): the water-filling solution. Words of length
    0 (slots past the last word) get 0. With equal weights and no cap, p is targets / tokens for every word.

    Sorting words by weight, k capped words leave lambda_k = (target - their tokens) / (the others' weight x length);
    the answer is the smallest k whose first uncapped word stays below 1 (lambda_k * w_(k+1) <= 1)."""
    w = weights.float() * (lengths > 0)
    order = w.argsort(-1, descending=True)
    sorted_w, sorted_len = w.gather(-1, order), lengths.gather(-1, order).float()
    capped_tokens = torch.nn.functional.pad(sorted_len.cumsum(-1), (1, 0))  # k = 0 .. W
    rest_mass = torch.nn.functional.pad((sorted_w * sorted_len).flip(-1).cumsum(-1).flip(-1), (0, 1))
    lam = (targets.float()[:, None] - capped_tokens).clamp(min=0) / rest_mass.clamp(min=1e-30)
    first_uncapped = torch.nn.functional.pad(sorted_w, (0, 1))
    k = (lam * first_uncapped <= 1.0 + 1e-6).float().argmax(-1, keepdim=True)
    return (lam.gather(-1, k) * w).clamp(max=1.0)


def per_row_word_masks(words: torch.Tensor, word_probability: torch.Tensor, seeds: torch.Tensor,
                       stream: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Like `per_row_whole_word_masks`, with a probability per word (B, W) instead of one ratio: bool (B, L, L)
    (or (B, R, L) for `rows`), [b, i, j] = column j's word is hidden in row i's mask; each (row, word) drawn
    independently."""
    column_word = words.clamp(min=0)
    counters = _row_word_counters(words, rows)
    threshold = word_probability.gather(-1, column_word)[:, None, :]
    return (uniform(seeds, stream, counters) < threshold) & (words >= 0)[:, None, :]


def weighted_whole_word_mask(words: torch.Tensor, word_weights: torch.Tensor, ratio: float, seeds: torch.Tensor,
                             stream: int) -> torch.Tensor:
    """One whole-word mask per row at `ratio` of the maskable tokens, words drawn without replacement with
    probability proportional to `word_weights` (B, W), W <= L: Efraimidis-Spirakis keys u^(1/w), largest first
    (here 1 - u^(1/w), smallest first, the order `choose_words` takes). Returns bool (B, L)."""
    seq_len = words.shape[1]
    u = uniform(seeds, stream, torch.arange(seq_len, device=words.device)[None])
    weights = torch.nn.functional.pad(word_weights.float(), (0, seq_len - word_weights.shape[-1]), value=1.0)
    priority = 1.0 - u.clamp(min=1e-12) ** (1.0 / weights.clamp(min=1e-12))
    chosen = choose_words(word_lengths(words), mask_targets(words >= 0, ratio), priority)
    return chosen.gather(-1, words.clamp(min=0)) & (words >= 0)


def delete_words(words: torch.Tensor, probability: float, seeds: torch.Tensor, stream: int) -> torch.Tensor:
    """TSDAE's noise: each word deleted independently with `probability`, at least one word kept per row that has
    one (the word with the largest draw). Returns bool (B, L): True at the tokens of deleted words."""
    exists = word_lengths(words) > 0  # (B, W=L)
    u = uniform(seeds, stream, torch.arange(words.shape[1], device=words.device)[None])
    deleted = (u < probability) & exists
    nothing_left = ~(exists & ~deleted).any(-1, keepdim=True)
    spared = torch.zeros_like(deleted).scatter_(-1, u.masked_fill(~exists, -1.0).argmax(-1, keepdim=True), True)
    deleted &= ~(nothing_left & spared)
    return deleted.gather(-1, words.clamp(min=0)) & (words >= 0)


def kept_layout(keep: torch.Tensor, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of the kept tokens of each row, in order, packed to the left: (index (B, K), valid (B, K)),
    K = the most kept tokens of a row rounded up to a multiple of `multiple` (fewer distinct shapes for the GPU's
    kernels and allocator), at most L. Slots past a row's count (valid False) hold its other positions, distinct
    from the kept ones, so a scatter back through `index` never writes one position twice."""
    counts = keep.sum(-1)
    width = min(keep.shape[1], -(-max(1, int(counts.max())) // multiple) * multiple)
    index = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    return index, valid
