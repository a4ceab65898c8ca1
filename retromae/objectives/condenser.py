"""Condenser and coCondenser (Gao & Callan, EMNLP 2021 / ACL 2022; methods.md §1.12): the baselines the rest of
the family compares with.

Condenser: the encoder input is masked once (whole words, `mask_ratio` 0.15, 80/10/10). A 2-layer head
(`head_layers`, transformer layers shaped like the encoder's, randomly initialised, plain self-attention over the real
tokens; a pre-norm encoder's layer states are read through its final norm) reads
[CLS of the last layer ; token states of layer `skip_from` (6)] and predicts the masked tokens through the encoder's
MLM head ("head" loss); the backbone keeps its own MLM on the last layer ("mlm"). The only way for late
information to reach the head's tokens is the last layer's [CLS], which is what trains it to condense the text.
L = MLM + head_weight * head MLM.

coCondenser adds the corpus-level contrastive loss: two spans of each example, each encoded as its own input
([CLS] span [SEP], masked for the two MLM losses as above); the spans' last-layer [CLS] vectors, unnormalised, are
compared by dot product with every span of the global batch (all processes); each span's positive is the other span
of its example, every other span a negative (spans of other examples of the same document, `doc`, left out).
L = MLM + head MLM + contrast_weight * contrast. Gradient accumulation is refused (`batch_wide_losses`).

Our defaults (config fields and rules) where the papers leave it open: the two spans of an example are two
disjoint windows of its ordinary tokens, each min(span_tokens, half the text) long, at random places (the first at
a uniform offset within the room left for both, the second uniform in the room after the first); masks are
whole-word.

Where the authors' code differs, it is a choice, `span_source: document_spans`: their corpus is cut into spans
first, grouped by document, and each step draws two different spans of a document. Here the example is then a
whole document (`data.cut: document`, as CoT-MAE takes), cut by the objective into spans of whole sentences of at
most `span_tokens` tokens (CoT-MAE's greedy cut; a lone longer sentence cut to its first `span_tokens`), and two
different spans are drawn uniformly from the example's seed (reproducible whatever the batch, process or device;
a document of a single span gives it twice). Ours by default (`windows`) because methods.md §1.12 asks only for
"two spans per document", and two windows of one example need no document-shaped corpus: the same recipe runs on
passages (two halves of an MS MARCO passage) and on packed blocks, with `doc` keeping spans of one document out
of each other's negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retromae.config import ConfigError
from retromae.data.examples import special_wrapping
from retromae.distributed import gather, gather_with_grad, world
from retromae.inputs import position_limit
from retromae.masking import derived_seeds
from retromae.decoders import DecoderStack
from retromae.objectives.base import full_precision, masked_lm_loss_sum, register
from retromae.objectives.cotmae import range_tokens, span_range, whole_sentence_cut, wrap_spans
from retromae.objectives.mlm import MaskedLM, MLMConfig
from retromae.rng import uniform

FIRST_SPAN_OFFSET, SECOND_SPAN_OFFSET, SECOND_SPAN_SEEDS = 101, 102, 103  # random streams / seed salt of the spans
FIRST_DOCUMENT_SPAN, SECOND_DOCUMENT_SPAN = 104, 105  # random streams of span_source: document_spans
SPAN_SOURCES = ("windows", "document_spans")


@dataclass
class CondenserConfig(MLMConfig):
    name: str = "condenser"  # which objective
    mask_ratio: float = 0.15  # share of ordinary tokens masked in the encoder input (whole words; the paper: 0.15)
    skip_from: int = 6  # layer whose token states the head reads (the paper: 6 of BERT-base's 12)
    head_layers: int = 2  # transformer layers of the head (the paper: 2)
    head_weight: float = 1.0  # weight of the head's MLM loss next to the backbone's

    def validate(self) -> None:
        super().validate()
        if self.skip_from < 1 or self.head_layers < 1:
            raise ConfigError("objective.skip_from and objective.head_layers must be >= 1")


@dataclass
class CoCondenserConfig(CondenserConfig):
    name: str = "cocondenser"  # which objective
    span_tokens: int = 128  # most ordinary tokens per span; two disjoint spans are cut from each example (our default)
    contrast_weight: float = 1.0  # weight of the span contrastive loss
    cross_process: bool = True  # other processes' spans are negatives too (the paper's global batch)
    span_source: str = "windows"  # windows: two disjoint windows of each example (our default) | document_spans: two different whole-sentence spans of a document (data.cut: document; the authors' code)

    @property
    def example_format(self) -> str:
        """What the objective takes: whole documents (data.cut: document) for document_spans, else blocks."""
        return "document" if self.span_source == "document_spans" else "block"

    def batch_wide_losses(self) -> list[str]:
        return ["contrast"]

    def validate(self) -> None:
        super().validate()
        if self.span_tokens < 1:
            raise ConfigError("objective.span_tokens must be >= 1", key="span_tokens")
        if self.span_source not in SPAN_SOURCES:
            raise ConfigError(f"objective.span_source={self.span_source!r} is not one of {', '.join(SPAN_SOURCES)}",
                              key="span_source")


@register
class Condenser(MaskedLM):
    name = "condenser"
    Config = CondenserConfig

    def __init__(self, encoder, tokenizer, config: CondenserConfig):
        super().__init__(encoder, tokenizer, config)
        layers = self.arch.num_layers
        if config.skip_from > layers:
            raise ConfigError(f"objective.skip_from={config.skip_from}: the model has {layers} layers; pick a middle "
                              f"one (the paper: 6 of 12)", key="skip_from")
        self.head = DecoderStack(self.arch.decoder_spec(), config.head_layers)
        self.loss_weights = {"head": config.head_weight}

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"mlm": batch["encoder_mask"].sum(), "head": batch["encoder_mask"].sum()}

    def head_states(self, layer_states: list[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        """The head over [last layer's CLS ; layer skip_from's tokens], (B, L, D)."""
        x = torch.cat([layer_states[-1][:, :1], layer_states[self.config.skip_from][:, 1:]], dim=1)
        positions = torch.arange(x.shape[1], device=x.device) if self.head.layers[0].attention.rotary else None
        return self.head(x, attention_mask.bool()[:, None, :], positions)

    def condenser_losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({mlm, head} summed losses, last-layer states) of a prepared MLM batch."""
        states = self.arch.layer_states(batch["encoder_input_ids"], batch["attention_mask"])
        head = self.head_states(states, batch["attention_mask"])
        losses = {"mlm": self.mlm_loss(states[-1], batch),
                  "head": masked_lm_loss_sum(self.arch.head, head, batch["input_ids"], batch["encoder_mask"])}
        return losses, states[-1]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.condenser_losses(batch)[0]


def two_disjoint_spans(lengths: torch.Tensor, seeds: torch.Tensor, most: int) -> tuple[torch.Tensor, ...]:
    """(first start, second start, size) of two disjoint windows of size min(most, n // 2) (at least 1) in texts of
    `lengths` n tokens, each (B,); a one-token text gives the same token twice."""
    size = torch.minimum(lengths // 2, torch.full_like(lengths, most)).clamp(min=1)
    room = (lengths - 2 * size).clamp(min=0)
    counter = torch.zeros(1, dtype=torch.long, device=lengths.device)
    first = (uniform(seeds, FIRST_SPAN_OFFSET, counter) * (room + 1)).long().clamp(max=room)
    after = room - first
    second = first + size + (uniform(seeds, SECOND_SPAN_OFFSET, counter) * (after + 1)).long().clamp(max=after)
    return first, torch.minimum(second, (lengths - size).clamp(min=0)), size


def two_document_spans(sentence_ids: torch.Tensor, seeds: torch.Tensor, most: int) -> tuple[torch.Tensor, ...]:
    """(first token, size) (2B,) of two different spans of each document (rows b and b + B), drawn uniformly from the
    greedy cut of the document into spans of whole sentences of at most `most` tokens; a single span twice."""
    cut = whole_sentence_cut(sentence_ids, torch.full_like(seeds, most, dtype=torch.long))
    spans, zero = cut["spans"], torch.zeros(1, dtype=torch.long, device=seeds.device)
    first = (uniform(seeds, FIRST_DOCUMENT_SPAN, zero) * spans).long().clamp(max=(spans - 1).clamp(min=0))
    other = (uniform(seeds, SECOND_DOCUMENT_SPAN, zero) * (spans - 1)).long().clamp(max=(spans - 2).clamp(min=0))
    second = torch.where(spans >= 2, other + (other >= first).long(), first)
    ranges = torch.cat([span_range(cut["is_start"], cut["ends"], k) for k in (first, second)])
    return range_tokens(cut["lengths"].repeat(2, 1), cut["clipped"].repeat(2, 1), ranges)


def span_contrast_sum(reps: torch.Tensor, docs: torch.Tensor | None, cross_process: bool) -> torch.Tensor:
    """Summed InfoNCE of the local spans `reps` (2B, D): rows b and b + B are the two spans of example b; logits are
    dot products with every span of the global batch (rank order, each process's block laid out as here); the span
    itself is left out, the positive is its sibling, spans of other examples of the same document are no negatives."""
    rank, size = world()
    local, examples = reps.shape[0], reps.shape[0] // 2
    everyone, offset, all_docs = reps, 0, docs
    if cross_process and size > 1:
        everyone, offset = gather_with_grad(reps), rank * local
        all_docs = gather(docs) if docs is not None else None
    logits = reps @ everyone.T
    rows = torch.arange(local, device=reps.device)
    columns = torch.arange(everyone.shape[0], device=reps.device)
    hidden = columns[None, :] == (offset + rows)[:, None]
    if all_docs is not None:
        column_example = (columns // local) * examples + (columns % local) % examples
        own_example = offset // 2 + rows % examples
        same_doc = all_docs[column_example][None, :] == all_docs[own_example][:, None]
        hidden |= same_doc & (column_example[None, :] != own_example[:, None])
    sibling = offset + (rows + examples) % local
    return F.cross_entropy(logits.masked_fill(hidden, float("-inf")), sibling, reduction="sum")


@register
class CoCondenser(Condenser):
    name = "cocondenser"
    Config = CoCondenserConfig

    def __init__(self, encoder, tokenizer, config: CoCondenserConfig):
        super().__init__(encoder, tokenizer, config)
        prefix, suffix = special_wrapping(tokenizer)
        positions = position_limit(encoder.config)  # RoBERTa's table holds 2 positions fewer than its rows
        if config.span_source == "document_spans" and positions is not None \
                and config.span_tokens + len(prefix) + len(suffix) > positions:
            raise ConfigError(f"objective.span_tokens={config.span_tokens} plus {len(prefix) + len(suffix)} special "
                              f"tokens exceeds the model's {positions} positions", key="span_tokens")
        self.register_buffer("_prefix", torch.tensor(prefix, dtype=torch.long), persistent=False)
        self.register_buffer("_suffix", torch.tensor(suffix, dtype=torch.long), persistent=False)
        self.loss_weights["contrast"] = config.contrast_weight

    def prepare(self, batch: dict) -> dict:
        """Two spans per example, as inputs of their own (rows b and b + B), masked as Condenser masks a text."""
        if self.config.span_source == "document_spans":
            if "sentence_ids" not in batch:
                raise ConfigError("objective cocondenser with span_source=document_spans takes whole documents with "
                                  "their sentence ids: set data.cut=document", key="cut")
            start, size = two_document_spans(batch["sentence_ids"], batch["seeds"], self.config.span_tokens)
        else:
            ordinary = self.tables.special[batch["input_ids"]].logical_not() & batch["attention_mask"].bool()
            begin = ordinary.long().argmax(-1)  # the first ordinary token (after [CLS] / <s>)
            first, second, size = two_disjoint_spans(ordinary.sum(-1), batch["seeds"], self.config.span_tokens)
            start, size = torch.cat([begin + first, begin + second]), size.repeat(2)
        ids, attention = wrap_spans(batch["input_ids"].repeat(2, 1), start, size, self._prefix, self._suffix,
                                    self._pad_id)
        seeds = torch.cat([batch["seeds"], derived_seeds(batch["seeds"], SECOND_SPAN_SEEDS)])
        spans = super().prepare({"input_ids": ids, "attention_mask": attention, "seeds": seeds})
        return {**batch, "spans": spans}

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        items = super().num_items(batch["spans"])
        items["contrast"] = torch.tensor(float(batch["spans"]["input_ids"].shape[0]), device=items["mlm"].device)
        return items

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        losses, last = self.condenser_losses(batch["spans"])
        losses["contrast"] = span_contrast_sum(full_precision(last[:, 0]), batch.get("doc"), self.config.cross_process)
        return losses
