"""CoT-MAE, contextual masked auto-encoder (Wu et al., AAAI 2023; methods.md §1.7).

The example is a whole DOCUMENT (`data.cut: document`): its tokens without special tokens, and the sentence of every
token (`sentence_ids`, -1 at padding). The objective cuts its spans, on the device, for the whole batch at once:
- the document is cut greedily into spans of whole sentences of at most T tokens, T = `max_span_tokens` (128), or,
  with probability `short_span_prob` (0.15), a shorter target drawn uniformly in [`min_span_tokens`, T] (2); a
  sentence longer than T is a span of its own, cut to its first T tokens;
- the anchor is one of those spans (uniform); its partner is, with equal probability, a random other span of the
  cut, the neighbouring span (before or after, uniform among those that exist), or an overlapping span: a window
  of whole sentences that fits T, starts inside the anchor and runs past its end (or ends inside it and starts
  before it), sharing at least one and at most half of its own sentences with the anchor (uniform among those).
Each span is encoded as its own input ([CLS] span [SEP]), with whole-word MLM at `mask_ratio` 0.30 (80/10/10):
loss "mlm". A randomly initialised decoder of `decoder_layers` (2) layers shaped like the encoder's, plain self-attention, reads
[h of one span ; embeddings of the other span whole-word masked at `decoder_mask_ratio` 0.45] (h replaces the
other span's [CLS] embedding, as in RetroMAE's basic decoding) and predicts that span's masked tokens through the
encoder's MLM head: loss "decoder". Symmetric: each span of a pair is decoded from the other's h.
L = MLM + decoder_weight * decoder (1.0).

Our defaults where the paper leaves it open: one pair per document per step; the short target is drawn once per
document; the rules of the overlapping span above; when a document offers no overlapping span for its anchor the
neighbour is taken instead (`partner_type` records what was used); a document that makes a single span has no
partner: its anchor keeps its MLM loss and adds nothing to the decoder's; the decoder's input masking is 80/10/10.

Where the authors' code differs, it is a choice, `span_cut: reference`: a span takes sentences until its tokens
exceed its target, the crossing sentence included, and is then cropped to `max_span_tokens` at a random offset;
the short target is redrawn for every span; the overlapping partner is the anchor's last k sentences (k uniform in
[1, max(1, n // 2)]) and the sentences after them up to `max_span_tokens` tokens (the last span: its first k and
the ones before), so every anchor of a document of two or more spans has one. Ours by default (`whole_sentences`)
because it is what methods.md §1.7 states: spans "of up to 128 tokens at sentence boundaries" (a crop cuts
sentences at both ends) and an overlapping partner sharing "<= 50% of its sentences" (the authors' can share more,
or be the anchor itself when its k sentences already fill the length).

Everything is tensor operations over (batch, sentences): the greedy cut is found by pointer jumping (each
sentence's "next span start" from a sorted search, then the chain from sentence 0 in log2(sentences) steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retromae.config import ConfigError
from retromae.data.examples import special_wrapping
from retromae.masking import (
    DECODER_MASK,
    DECODER_RANDOM_IDS,
    DECODER_REPLACE,
    corrupt,
    derived_seeds,
    whole_word_mask,
)
from retromae.decoders import DecoderStack
from retromae.inputs import position_limit
from retromae.objectives.base import masked_lm_loss_sum, register
from retromae.objectives.mlm import MaskedLM, MLMConfig
from retromae.rng import uniform

# random streams of the span sampler, and the salt of the partner rows' seeds
SHORT_SPAN, SHORT_LENGTH, ANCHOR, PARTNER_TYPE, OTHER_SPAN, NEIGHBOUR_SIDE, OVERLAP = 61, 62, 63, 64, 65, 66, 67
PARTNER_SEEDS = 68
RANDOM, NEIGHBOUR, OVERLAPPING, UNPAIRED = 0, 1, 2, -1
CROP = 69  # the random stream of the reference cut's crops
SPAN_CUTS = ("whole_sentences", "reference")


@dataclass
class CoTMAEConfig(MLMConfig):
    name: str = "cotmae"  # which objective
    mask_ratio: float = 0.3  # share of each span's ordinary tokens masked in the encoder input (whole words)
    decoder_mask_ratio: float = 0.45  # share of the decoded span's ordinary tokens masked in the decoder input
    decoder_layers: int = 2  # randomly initialised decoder layers (the paper: 2)
    decoder_weight: float = 1.0  # weight of the decoder loss (the paper: 1.0)
    max_span_tokens: int = 128  # most tokens per span, special tokens not counted (the paper: 128)
    short_span_prob: float = 0.15  # probability that a document is cut at a shorter target length (the paper: 0.15)
    min_span_tokens: int = 2  # the shorter target is uniform in [min_span_tokens, max_span_tokens] (the paper: 2)
    span_cut: str = "whole_sentences"  # whole_sentences: spans of whole sentences <= max_span_tokens (our default) | reference: the authors' cut, crop and overlap

    def validate(self) -> None:
        super().validate()
        if not 0 < self.decoder_mask_ratio < 1:
            raise ConfigError(f"objective.decoder_mask_ratio={self.decoder_mask_ratio} must be in (0, 1)")
        if not 1 <= self.min_span_tokens <= self.max_span_tokens:
            raise ConfigError("objective.min_span_tokens must be in [1, objective.max_span_tokens]")
        if not 0 <= self.short_span_prob <= 1 or self.decoder_layers < 1:
            raise ConfigError("objective.short_span_prob must be in [0, 1] and objective.decoder_layers >= 1")
        if self.span_cut not in SPAN_CUTS:
            raise ConfigError(f"objective.span_cut={self.span_cut!r} is not one of {', '.join(SPAN_CUTS)}",
                              key="span_cut")


def wrap_spans(ids: torch.Tensor, start: torch.Tensor, size: torch.Tensor, prefix: torch.Tensor,
               suffix: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row r: prefix + ids[r, start_r : start_r + size_r] + suffix, padded: (input_ids, attention_mask), (N, W).
    W is rounded up to a multiple of 8 tokens, so that span batches bring few new tensor shapes."""
    rows, length = ids.shape
    pre, suf = prefix.numel(), suffix.numel()
    width = pre + -(-max(1, int(size.max())) // 8) * 8 + suf
    column = torch.arange(width, device=ids.device)[None, :]
    inside = (column >= pre) & (column < pre + size[:, None])
    tokens = ids.gather(1, (start[:, None] + column - pre).clamp(0, length - 1))
    out = torch.where(inside, tokens, torch.full_like(tokens, pad_id))
    if pre:
        out[:, :pre] = prefix
    if suf:
        out.scatter_(1, pre + size[:, None] + torch.arange(suf, device=ids.device)[None, :], suffix.expand(rows, -1))
    return out, (column < pre + size[:, None] + suf).long()


def sentence_lengths(sentence_ids: torch.Tensor) -> torch.Tensor:
    """Tokens per sentence, (B, S), S = the most sentences of a document in the batch."""
    count = int(sentence_ids.max()) + 1
    lengths = torch.zeros(sentence_ids.shape[0], max(count, 1), dtype=torch.long, device=sentence_ids.device)
    return lengths.scatter_add_(1, sentence_ids.clamp(min=0), (sentence_ids >= 0).long())


def window_ends(clipped: torch.Tensor, budget: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
    """(B, S): for a window of whole sentences starting at sentence s, the first sentence that no longer fits in
    `budget` tokens (B,); `sentences` (B,) caps it at the document's end."""
    ends_at = clipped.cumsum(-1)
    starts_at = ends_at - clipped
    after = torch.searchsorted(ends_at, starts_at + budget[:, None], right=True)
    return torch.minimum(after, sentences[:, None])


def window_starts(clipped: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """(B, S + 1): for a window of whole sentences ending before sentence e, the earliest first sentence that fits."""
    before = F.pad(clipped.cumsum(-1), (1, 0))  # tokens before sentence e, e = 0 .. S
    return torch.searchsorted(before.contiguous(), (before - budget[:, None]).contiguous(), right=False)


def range_tokens(lengths: torch.Tensor, clipped: torch.Tensor, ranges: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(first token, tokens taken) (N,) of the sentence ranges [first, end) (N, 2), given each row's tokens per
    sentence (N, S) all told (`lengths`) and as far as spans take them (`clipped`: only a lone sentence is cut short,
    so a range is a contiguous run of tokens)."""
    first_token = F.pad(lengths.cumsum(-1), (1, 0))
    taken_before = F.pad(clipped.cumsum(-1), (1, 0))
    size = (taken_before.gather(1, ranges[:, 1:]) - taken_before.gather(1, ranges[:, :1])).squeeze(1)
    return first_token.gather(1, ranges[:, :1]).squeeze(1), size.clamp(min=0)


def random_crop(start: torch.Tensor, size: torch.Tensor, most: int, seeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows b (anchors) and b + B (partners) of (start, size): a span longer than `most` tokens keeps `most` of them,
    from an offset uniform in [0, size - most] (stream CROP, counter 0 for the anchor, 1 for the partner)."""
    half = seeds.shape[0]
    which = (torch.arange(2 * half, device=seeds.device) >= half).long()
    room = (size - most).clamp(min=0)
    offset = (uniform(seeds.repeat(2), CROP, which) * (room + 1)).long().clamp(max=room)
    return start + offset, size.clamp(max=most)


def span_range(is_start: torch.Tensor, ends: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Sentences [first, end) (B, 2) of span k (B,) of a cut whose spans begin where `is_start` (B, S) and run from
    sentence s to ends[s]."""
    first = torch.searchsorted(is_start.long().cumsum(-1), (k + 1)[:, None]).squeeze(1)
    first = first.clamp(max=is_start.shape[1] - 1)
    return torch.stack([first, ends.gather(1, first[:, None]).squeeze(1)], -1)


def whole_sentence_cut(sentence_ids: torch.Tensor, budget: torch.Tensor) -> dict[str, torch.Tensor]:
    """The greedy cut of each document (B,) into spans of whole sentences of at most `budget` (B,) tokens (a lone
    longer sentence a span of its own, cut to its first `budget` tokens): tokens per sentence (`lengths`, and
    `clipped` as far as spans take them), span `ends` from each sentence, `is_start` and the span count `spans`."""
    lengths = sentence_lengths(sentence_ids)
    sentences = (sentence_ids.max(-1).values + 1).clamp(min=0)
    clipped = torch.minimum(lengths, budget[:, None])
    ends = window_ends(clipped, budget, sentences)
    is_start = greedy_span_starts(ends, sentences)
    return {"lengths": lengths, "clipped": clipped, "sentences": sentences, "ends": ends, "is_start": is_start,
            "spans": is_start.sum(-1)}


def greedy_span_starts(next_start: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: the sentences that begin a span of the greedy cut, i.e. the chain 0, next(0), next(next(0)) ...
    found by pointer jumping: after r rounds every sentence within 2^r steps of 0 is marked."""
    batch, count = next_start.shape
    sink = torch.full((batch, 1), count, dtype=next_start.dtype, device=next_start.device)
    jump = torch.cat([torch.where(next_start >= sentences[:, None], sink, next_start), sink], dim=1)
    reached = torch.zeros(batch, count + 1, dtype=torch.long, device=next_start.device)
    reached[:, 0] = (sentences > 0).long()
    for _ in range(max(1, count).bit_length()):
        reached = reached.scatter_reduce(1, jump, reached, "amax")
        jump = jump.gather(1, jump)
    return reached[:, :count].bool()


def pick_true(candidates: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of a uniformly chosen True of each row of `candidates` (B, N), whether the row has any)."""
    count = candidates.sum(-1)
    rank = (u * count).long().clamp(max=(count - 1).clamp(min=0))
    index = torch.searchsorted(candidates.long().cumsum(-1), (rank + 1)[:, None]).squeeze(1)
    return index.clamp(max=candidates.shape[1] - 1), count > 0


def span_budget(seeds: torch.Tensor, cfg: CoTMAEConfig) -> torch.Tensor:
    """Each document's target span length (B,): max_span_tokens, or with probability short_span_prob a shorter one
    uniform in [min_span_tokens, max_span_tokens]."""
    zero = torch.zeros(1, dtype=torch.long, device=seeds.device)
    spread = cfg.max_span_tokens - cfg.min_span_tokens + 1
    short = cfg.min_span_tokens + (uniform(seeds, SHORT_LENGTH, zero) * spread).long().clamp(max=spread - 1)
    return torch.where(uniform(seeds, SHORT_SPAN, zero) < cfg.short_span_prob, short, cfg.max_span_tokens)


def partner_kind(seeds: torch.Tensor, spans: torch.Tensor, has_overlap: torch.Tensor) -> torch.Tensor:
    """RANDOM / NEIGHBOUR / OVERLAPPING with equal probability (B,); NEIGHBOUR where no window overlaps the anchor,
    UNPAIRED where the document makes a single span."""
    kind = (uniform(seeds, PARTNER_TYPE, torch.zeros(1, dtype=torch.long, device=seeds.device)) * 3).long()
    kind = torch.where((kind.clamp(max=2) == OVERLAPPING) & ~has_overlap, NEIGHBOUR, kind.clamp(max=2))
    return torch.where(spans >= 2, kind, UNPAIRED)


def sample_pairs(sentence_ids: torch.Tensor, seeds: torch.Tensor, cfg: CoTMAEConfig) -> dict[str, torch.Tensor]:
    """The anchor and partner of every document as sentence ranges [first, end) (B, 2 each), the partner's type
    (B,), and the tokens per sentence (B, S): all of them (`lengths`) and as far as spans take them (`clipped`)."""
    zero = torch.zeros(1, dtype=torch.long, device=seeds.device)
    if cfg.span_cut == "reference":
        cut = reference_cut(sentence_ids, seeds, cfg)
    else:
        budget = span_budget(seeds, cfg)
        cut = whole_sentence_cut(sentence_ids, budget)
        starts = window_starts(cut["clipped"], budget)
    ends, is_start, spans = cut["ends"], cut["is_start"], cut["spans"]
    anchor_k = (uniform(seeds, ANCHOR, zero) * spans).long().clamp(max=(spans - 1).clamp(min=0))
    anchor = span_range(is_start, ends, anchor_k)
    other_k = (uniform(seeds, OTHER_SPAN, zero) * (spans - 1)).long().clamp(max=(spans - 2).clamp(min=0))
    left_exists, right_exists = anchor_k > 0, anchor_k < spans - 1
    go_right = torch.where(left_exists & right_exists, uniform(seeds, NEIGHBOUR_SIDE, zero) < 0.5, right_exists)
    if cfg.span_cut == "reference":
        overlap = reference_overlap(anchor, ~right_exists, cut, cfg.max_span_tokens, uniform(seeds, OVERLAP, zero))
        has_overlap = torch.ones_like(right_exists)
    else:
        overlap, has_overlap = overlapping_window(anchor, ends, starts, uniform(seeds, OVERLAP, zero))
    kind = partner_kind(seeds, spans, has_overlap)
    partner = torch.where((kind == RANDOM)[:, None], span_range(is_start, ends, other_k + (other_k >= anchor_k).long()),
                          torch.where((kind == OVERLAPPING)[:, None], overlap,
                                      span_range(is_start, ends, anchor_k + torch.where(go_right, 1, -1))))
    partner = torch.where((kind == UNPAIRED)[:, None], anchor, partner)
    return {"anchor": anchor, "partner": partner, "partner_type": kind, "lengths": cut["lengths"],
            "clipped": cut["clipped"]}


def reference_cut(sentence_ids: torch.Tensor, seeds: torch.Tensor, cfg: CoTMAEConfig) -> dict[str, torch.Tensor]:
    """The authors' cut: a span takes sentences until its tokens EXCEED its target (the sentence that crosses it
    included, whole: spans are cropped later), and every span draws its own target (max_span_tokens, or with
    probability short_span_prob one uniform in [min_span_tokens, max_span_tokens]). The draw is keyed by the span's
    first sentence, which no other span shares: one independent draw per span, as the authors' loop redraws."""
    lengths = sentence_lengths(sentence_ids)
    sentences = (sentence_ids.max(-1).values + 1).clamp(min=0)
    first = torch.arange(lengths.shape[1], device=lengths.device)[None, :]
    spread = cfg.max_span_tokens - cfg.min_span_tokens + 1
    short = cfg.min_span_tokens + (uniform(seeds, SHORT_LENGTH, first) * spread).long().clamp(max=spread - 1)
    target = torch.where(uniform(seeds, SHORT_SPAN, first) < cfg.short_span_prob, short, cfg.max_span_tokens)
    ends_at = lengths.cumsum(-1)
    crossing = torch.searchsorted(ends_at, ends_at - lengths + target, right=True)  # first sentence past the target
    ends = torch.minimum(crossing + 1, sentences[:, None])
    is_start = greedy_span_starts(ends, sentences)
    return {"lengths": lengths, "clipped": lengths, "sentences": sentences, "ends": ends, "is_start": is_start,
            "spans": is_start.sum(-1)}


def reference_overlap(anchor: torch.Tensor, is_last: torch.Tensor, cut: dict, most: int,
                      u: torch.Tensor) -> torch.Tensor:
    """The authors' overlapping span (B, 2): the anchor's last k sentences, k uniform in [1, max(1, n // 2)] of its n,
    then the following sentences until `most` tokens are reached (the one that reaches it included); for the
    document's last span, its first k sentences and the preceding ones, backwards, the same way. It always exists
    (it may be the anchor itself when k sentences already fill `most`)."""
    lengths, sentences = cut["lengths"], cut["sentences"]
    before = F.pad(lengths.cumsum(-1), (1, 0))  # tokens before sentence s, s = 0 .. S
    a0, a1 = anchor[:, 0], anchor[:, 1]
    half = ((a1 - a0) // 2).clamp(min=1)
    k = torch.minimum(1 + (u * half).long().clamp(max=half - 1), a1 - a0)  # an empty document: k = 0
    at = lambda s: before.gather(1, s[:, None]).squeeze(1)  # noqa: E731 (tokens before sentence s, per row)
    # forward: [a1 - k, end), end the sentence after the one that brings the tokens to `most`
    left = most - (at(a1) - at(a1 - k))
    reach = torch.searchsorted(before[:, 1:].contiguous(), (at(a1) + left)[:, None], right=False).squeeze(1)
    forward_end = torch.where(left > 0, torch.minimum(reach + 1, sentences), a1)
    # backward: [start, a0 + k), start the last sentence before a0 that brings the tokens to `most`
    left_back = most - (at(a0 + k) - at(a0))
    back = torch.searchsorted(before.contiguous(), (at(a0) - left_back)[:, None], right=True).squeeze(1) - 1
    backward_start = torch.where(left_back > 0, back.clamp(min=0), a0)
    forward = torch.stack([a1 - k, forward_end], -1)
    backward = torch.stack([backward_start, a0 + k], -1)
    return torch.where(is_last[:, None], backward, forward)


def overlapping_window(anchor: torch.Tensor, ends: torch.Tensor, starts: torch.Tensor,
                       u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A window of whole sentences that fits the budget and overlaps the anchor [a0, a1) by at least one and at most
    half of its own sentences, uniform among: windows [s, ends[s]) with a0 < s < a1, and windows [starts[e], e) with
    a0 < e < a1 (each the longest that fits). Returns ((B, 2) ranges, whether one exists)."""
    count = ends.shape[1]
    position = torch.arange(count, device=ends.device)[None, :]
    a0, a1 = anchor[:, :1], anchor[:, 1:]
    inside = (position > a0) & (position < a1)
    forward_ok = inside & (2 * (a1 - position) <= ends - position)
    backward_ok = inside & (2 * (position - a0) <= position - starts[:, :count])
    choice, exists = pick_true(torch.cat([forward_ok, backward_ok], -1), u)
    at = choice % count
    forward = torch.stack([at, ends.gather(1, at[:, None]).squeeze(1)], -1)
    backward = torch.stack([starts.gather(1, at[:, None]).squeeze(1), at], -1)
    return torch.where((choice < count)[:, None], forward, backward), exists


@register
class CoTMAE(MaskedLM):
    name = "cotmae"
    Config = CoTMAEConfig
    example_format = "document"  # whole documents with sentence_ids (data.cut: document); the spans are cut here

    def __init__(self, encoder, tokenizer, config: CoTMAEConfig):
        super().__init__(encoder, tokenizer, config)
        prefix, suffix = special_wrapping(tokenizer)
        positions = position_limit(encoder.config)  # RoBERTa's table holds 2 positions fewer than its rows
        if positions is not None and config.max_span_tokens + len(prefix) + len(suffix) > positions:
            raise ConfigError(f"objective.max_span_tokens={config.max_span_tokens} plus {len(prefix) + len(suffix)} "
                              f"special tokens exceeds the model's {positions} positions", key="max_span_tokens")
        self.register_buffer("_prefix", torch.tensor(prefix, dtype=torch.long), persistent=False)
        self.register_buffer("_suffix", torch.tensor(suffix, dtype=torch.long), persistent=False)
        self.decoder = DecoderStack(self.arch.decoder_spec(), config.decoder_layers)
        self.loss_weights = {"decoder": config.decoder_weight}

    def prepare(self, batch: dict) -> dict:
        """Rows b (anchors) and b + B (partners) of `spans`, each an MLM-masked input with its decoder input."""
        if "sentence_ids" not in batch:
            raise ConfigError("objective cotmae takes whole documents with their sentence ids: set data.cut=document",
                              key="cut")
        pairs = sample_pairs(batch["sentence_ids"], batch["seeds"], self.config)
        ids, attention = self.span_inputs(batch["input_ids"], pairs, batch["seeds"])
        seeds = torch.cat([batch["seeds"], derived_seeds(batch["seeds"], PARTNER_SEEDS)])
        spans = super().prepare({"input_ids": ids, "attention_mask": attention, "seeds": seeds})
        paired = (pairs["partner_type"] != UNPAIRED).repeat(2)
        is_anchor = torch.arange(ids.shape[0], device=ids.device) < ids.shape[0] // 2
        spans["encoder_mask"] &= (paired | is_anchor)[:, None]  # an unpaired document's partner row is a stand-in
        decoder_mask = whole_word_mask(spans["words"], self.config.decoder_mask_ratio, seeds, DECODER_MASK)
        spans["decoder_input_ids"] = corrupt(ids, decoder_mask, seeds, self.tables,
                                             (DECODER_REPLACE, DECODER_RANDOM_IDS), self.config.mask_token_prob,
                                             self.config.random_token_prob)
        spans["decoder_targets"] = decoder_mask & paired[:, None]
        return {**batch, "spans": spans, **{k: pairs[k] for k in ("anchor", "partner", "partner_type")}}

    def span_inputs(self, documents: torch.Tensor, pairs: dict,
                    seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] span [SEP] of every anchor (rows b) and partner (rows b + B): (input_ids, attention_mask). A sentence
        range is a contiguous run of tokens (only a lone sentence is cut short), so a start and a size say it all."""
        start, size = range_tokens(pairs["lengths"].repeat(2, 1), pairs["clipped"].repeat(2, 1),
                                   torch.cat([pairs["anchor"], pairs["partner"]]))
        if self.config.span_cut == "reference":  # the authors crop a longer span at a random place
            start, size = random_crop(start, size, self.config.max_span_tokens, seeds)
        return wrap_spans(documents.repeat(2, 1), start, size, self._prefix, self._suffix, self._pad_id)

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        spans = batch["spans"]
        return {"mlm": spans["encoder_mask"].sum(), "decoder": spans["decoder_targets"].sum()}

    def decode(self, h: torch.Tensor, spans: dict) -> torch.Tensor:
        """Each row's span decoded from the OTHER span's h: rows b and b + B exchange their h. (2B, W, D)."""
        half = h.shape[0] // 2
        other_h = torch.cat([h[half:], h[:half]]).unsqueeze(1)
        x = torch.cat([other_h, self.arch.embed(spans["decoder_input_ids"])[:, 1:]], dim=1)
        positions = torch.arange(x.shape[1], device=x.device) if self.decoder.layers[0].attention.rotary else None
        return self.decoder(x, spans["attention_mask"].bool()[:, None, :], positions)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        spans = batch["spans"]
        hidden = self.encode(spans)
        decoded = self.decode(hidden[:, 0], spans)
        return {"mlm": self.mlm_loss(hidden, spans),
                "decoder": masked_lm_loss_sum(self.arch.head, decoded, spans["input_ids"],
                                              spans["decoder_targets"])}
