"""Contrastive span prediction, COSTA (Ma et al., SIGIR 2022; methods.md §1.4): encoder only, no decoder.

For each text, spans are sampled at four granularities (word, phrase, sentence, paragraph). Each span is
encoded as its own input ([CLS] span [SEP]) and mean-pooled over its tokens; the text's representation is a
projector (MLP) on h. A group-wise contrastive loss pulls the text towards its own spans and away from the spans
of every other text of the global batch (all processes), with cosine similarity and a temperature. Kept with MLM.

Not released by the authors, so these are config fields with our defaults: span lengths word 1-3, phrase 4-16,
sentence 16-64, paragraph 64-128 tokens (clipped to the text), 5 spans per granularity, tau = 0.1, and the form
of the group-wise loss: for text i with own spans P(i) among all spans A,
    L_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / tau) / sum_{a in A'} exp(s_ia / tau) ),
where A' is every span (`own_spans_in_denominator: true`, supervised contrastive learning's L_out) or every
span but i's other positives (false).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from retromae.config import ConfigError
from retromae.data.examples import special_wrapping
from retromae.distributed import gather, gather_with_grad, world
from retromae.objectives.base import full_precision, register, same_document_elsewhere
from retromae.objectives.mlm import MaskedLM, MLMConfig
from retromae.rng import uniform

SPAN_LENGTH, SPAN_START = 31, 32  # random streams of the span sampler


@dataclass
class COSTAConfig(MLMConfig):
    name: str = "costa"  # which objective
    span_lengths: list[list[int]] = field(
        default_factory=lambda: [[1, 3], [4, 16], [16, 64], [64, 128]])  # [min, max] tokens per granularity
    spans_per_granularity: int = 5  # spans sampled per granularity and text
    temperature: float = 0.1  # cosine similarities are divided by this
    span_weight: float = 1.0  # weight of the span loss next to MLM
    own_spans_in_denominator: bool = True  # the text's other spans count in each positive's softmax
    cross_process: bool = True  # other processes' spans are negatives too
    span_checkpointing: bool = True  # encode spans a chunk at a time under activation checkpointing (saves memory)
    span_chunk: float = 0.25  # span tokens per checkpointed chunk, as a share of the text batch's tokens

    def batch_wide_losses(self) -> list[str]:
        return ["span"]

    def validate(self) -> None:
        super().validate()
        for pair in self.span_lengths:
            if len(pair) != 2 or not 1 <= pair[0] <= pair[1]:
                raise ConfigError(f"objective.span_lengths: {pair} is not a [min, max] with 1 <= min <= max")
        if not 0 < self.span_chunk:
            raise ConfigError("objective.span_chunk must be > 0", key="span_chunk")
        if self.spans_per_granularity < 1 or self.temperature <= 0:
            raise ConfigError("objective.spans_per_granularity must be >= 1 and objective.temperature > 0")


def sample_spans(lengths: torch.Tensor, seeds: torch.Tensor, ranges: list[list[int]], per: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) of `per` spans per granularity for each text of `lengths` ordinary tokens: (B, S) each.

    Lengths are uniform in each granularity's range and clipped to the text; starts are uniform over the
    positions where the span fits, so a span never leaves its text (and never touches padding)."""
    device = lengths.device
    lo = torch.tensor([r[0] for r in ranges for _ in range(per)], device=device)
    hi = torch.tensor([r[1] for r in ranges for _ in range(per)], device=device)
    slots = torch.arange(lo.numel(), device=device)[None]
    size = lo + (uniform(seeds, SPAN_LENGTH, slots) * (hi - lo + 1)).long().clamp(max=(hi - lo))
    size = torch.minimum(size, lengths[:, None].clamp(min=1))
    room = (lengths[:, None] - size + 1).clamp(min=1)
    start = (uniform(seeds, SPAN_START, slots) * room).long().clamp(max=room - 1)
    return start, size


def group_contrastive_loss_sum(texts: torch.Tensor, spans: torch.Tensor, owner: torch.Tensor, first_text: int,
                               temperature: float, own_in_denominator: bool,
                               excluded_texts: torch.Tensor | None = None) -> torch.Tensor:
    """Summed group-wise loss of the local `texts` (B, D) against all `spans` (N, D) owned by global text ids
    `owner` (N,); local text b has global id first_text + b. Vectors are compared by cosine similarity.
    `excluded_texts` (B, texts): spans of these texts are no negatives of b (other blocks of its document)."""
    logits = F.normalize(texts, dim=-1) @ F.normalize(spans, dim=-1).T / temperature
    if excluded_texts is not None:
        logits = logits.masked_fill(excluded_texts[:, owner], float("-inf"))
    ids = first_text + torch.arange(texts.shape[0], device=texts.device)
    positive = owner[None, :] == ids[:, None]  # (B, N)
    if own_in_denominator:
        log_prob = logits - logits.logsumexp(-1, keepdim=True)
    else:
        # each positive p competes with the negatives and itself only: logsumexp over {p} and the negatives
        negatives = logits.masked_fill(positive, float("-inf")).logsumexp(-1, keepdim=True)
        log_prob = logits - torch.logaddexp(logits, negatives)
    per_text = -(log_prob.masked_fill(~positive, 0.0)).sum(-1) / positive.sum(-1).clamp(min=1)
    return per_text.sum()


@register
class COSTA(MaskedLM):
    name = "costa"
    Config = COSTAConfig

    def __init__(self, encoder, tokenizer, config: COSTAConfig):
        super().__init__(encoder, tokenizer, config)
        hidden = self.arch.hidden_size
        self.projector = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        prefix, suffix = special_wrapping(tokenizer)
        self.register_buffer("_prefix", torch.tensor(prefix, dtype=torch.long), persistent=False)
        self.register_buffer("_suffix", torch.tensor(suffix, dtype=torch.long), persistent=False)
        self.loss_weights = {"span": config.span_weight}

    def prepare(self, batch: dict) -> dict:
        batch = super().prepare(batch)
        ordinary = batch["words"] >= 0
        lengths = ordinary.sum(-1)
        first = ordinary.long().argmax(-1)  # position of the first ordinary token (after [CLS] / <s>)
        start, size = sample_spans(lengths, batch["seeds"], self.config.span_lengths, self.config.spans_per_granularity)
        per = self.config.spans_per_granularity
        # One padded input per granularity: padded to the longest span of the batch, a paragraph-long width would
        # be given to every word-long span too (at 32 x 512: 83k span tokens for 25k real ones).
        batch["span_groups"] = [self._span_inputs(batch["input_ids"], first[:, None] + start[:, g : g + per],
                                                  size[:, g : g + per])
                                for g in range(0, start.shape[1], per)]
        return batch

    def _span_inputs(self, ids: torch.Tensor, start: torch.Tensor, size: torch.Tensor) -> dict:
        """Each span as its own input: prefix + span tokens + suffix, padded; (B * spans, width)."""
        batch, spans = start.shape
        # widths rounded up to a multiple of 8 tokens: span batches would otherwise bring new tensor shapes every step
        longest = -(-int(size.max()) // 8) * 8
        pre, suf = self._prefix.numel(), self._suffix.numel()
        width = pre + longest + suf
        column = torch.arange(width, device=ids.device)[None, None, :]
        inside = (column >= pre) & (column < pre + size[..., None])
        source = (start[..., None] + column - pre).clamp(0, ids.shape[1] - 1)
        tokens = ids[:, None, :].expand(batch, spans, -1).gather(2, source)
        out = torch.full((batch, spans, width), self._pad_id, dtype=torch.long, device=ids.device)
        out = torch.where(inside, tokens, out)
        if pre:
            out[..., :pre] = self._prefix
        if suf:
            tail = pre + size[..., None] + torch.arange(suf, device=ids.device)[None, None, :]
            out.scatter_(2, tail, self._suffix.expand(batch, spans, -1))
        attention = column < pre + size[..., None] + suf
        return {"input_ids": out.view(batch * spans, width), "attention_mask": attention.view(batch * spans, width).long(),
                "token_mask": inside.view(batch * spans, width)}

    def _pooled_spans(self, group: dict, text_tokens: int) -> torch.Tensor:
        """Mean of each span's token states, (spans, D); a chunk at a time under activation checkpointing when
        training, so that only the pooled vectors are kept (the spans hold about twice the text's tokens)."""
        ids, attention, inside = group["input_ids"], group["attention_mask"], group["token_mask"]
        if not (self.config.span_checkpointing and torch.is_grad_enabled()):
            return self._encode_spans(ids, attention, inside)
        from torch.utils.checkpoint import checkpoint

        rows = max(1, int(self.config.span_chunk * text_tokens) // ids.shape[1])
        return torch.cat([checkpoint(self._encode_spans, ids[r : r + rows], attention[r : r + rows],
                                     inside[r : r + rows], use_reentrant=False)
                          for r in range(0, ids.shape[0], rows)])

    def _encode_spans(self, ids: torch.Tensor, attention: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        hidden = self.arch.forward(ids, attention)
        mask = inside.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"mlm": batch["encoder_mask"].sum(), "span": torch.tensor(float(batch["input_ids"].shape[0]),
                                                                          device=batch["input_ids"].device)}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        hidden = self.encode(batch)
        texts = self.projector(hidden[:, 0])
        local = texts.shape[0]
        # (granularity, text, span) -> (text, granularity, span): each text's spans together, in sampling order
        text_tokens = batch["input_ids"].numel()
        groups = [self._pooled_spans(g, text_tokens).view(local, -1, hidden.shape[-1]) for g in batch["span_groups"]]
        spans = torch.stack(groups, dim=1).flatten(0, 2)
        rank, size = world()
        owner = torch.arange(local, device=texts.device).repeat_interleave(spans.shape[0] // local) + rank * local
        first_text = rank * local
        docs = batch.get("doc")
        if self.config.cross_process and size > 1:
            spans, owner = gather_with_grad(full_precision(spans)), gather(owner)
            docs = gather(docs) if docs is not None else None
        else:
            first_text = 0
            owner = owner - rank * local
        loss = group_contrastive_loss_sum(full_precision(texts), full_precision(spans), owner, first_text,
                                          self.config.temperature, self.config.own_spans_in_denominator,
                                          same_document_elsewhere(batch, first_text, docs))
        return {"mlm": self.mlm_loss(hidden, batch), "span": loss}
