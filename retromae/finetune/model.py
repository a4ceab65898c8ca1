"""The bi-encoder trained by contrastive fine-tuning, following the trainer's objective contract
(`prepare`, `num_items`, `forward` returning summed named losses).

Loss: InfoNCE of each query against every passage of the batch — its own group's positive and hard negatives,
the other queries' passages, and, with cross-device negatives, every other process's passages (gathered with
their gradients). Optional: KL towards teacher (cross-encoder) scores over the query's own group, or MarginMSE.

SPLADE (`representation: splade`, methods.md §4): every text is a vocabulary-sized vector (retrieval/sparse.py),
scored by dot product, so the InfoNCE, GradCache and cross-device gathering above apply unchanged (B x V floats per
side; the max-pooling runs over bounded blocks of positions). FLOPS regularisation, sum_j ((1/N) sum_i w_ij)^2 over
the global batch's queries ("flops_q") and documents ("flops_d"), each process's column sums gathered with their
gradients; lambda follows the quadratic warm-up lambda (t / T)^2 up to step T. The mean non-zeros per query and per
document are logged beside the losses ("nnz_q", "nnz_d", weight 0: reported, not trained).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from retromae.architectures import encoder_of
from retromae.config import ConfigError
from retromae.distributed import gather, gather_with_grad, world
from retromae.objectives.base import full_precision
from retromae.retrieval.encoder import pool


@dataclass
class LossConfig:
    similarity: str = "dot"  # dot (RetroMAE, Tevatron: temperature 1) | cosine (SimLM, BGE: temperature ~0.02)
    temperature: float = 1.0  # scores are divided by this before the softmax
    pooling: str = "cls"  # cls | mean: how a text's vector is read off the encoder
    cross_device_negatives: bool = True  # every query also scores the passages of every other process
    shared_encoder: bool = True  # one encoder for queries and passages (false: two, initialised alike)
    grad_cache_chunk: int = 0  # > 0: GradCache, encoding this many texts at a time and keeping only their vectors
    distill_weight: float = 0.0  # weight of the distillation loss towards teacher scores (needs data.teacher_scores)
    distill_temperature: float = 1.0  # kl: temperature of the teacher's score distribution
    distill_loss: str = "kl"  # kl (teacher || student over the query's group) | margin_mse (positive - each negative)
    contrastive_weight: float = 1.0  # weight of the InfoNCE loss (LexMAE stage 3: 0.2 beside KL weight 1)
    representation: str = "dense"  # dense | dupmae: [W h ; top-k mu], joint score | splade (both read the MLM head)
    flops_query_weight: float = 3e-4  # splade: lambda_q, queries' FLOPS (SPLADE-max 3e-4; SPLADE++ 0.5, MarginMSE)
    flops_doc_weight: float = 1e-4  # splade: lambda_d of the documents' FLOPS (SPLADE-max 1e-4; SPLADE++ 0.4)
    flops_warmup_steps: int = 0  # splade: lambda (t / T)^2 until step T (SPLADE: 50k); 0: constant (LexMAE)
    dupmae_dense_dim: int = 384  # dupmae: size of W h
    dupmae_topk: int = 384  # dupmae: vocabulary entries kept from mu
    starbucks_pairs: list[list[int]] = field(default_factory=list)  # Starbucks SRL: (layer, dim) pairs trained beside the full size
    starbucks_kl_weight: float = 1.0  # Starbucks SRL: weight of each pair's KL towards the detached full-size scores

    def validate(self) -> None:
        if self.similarity not in ("dot", "cosine"):
            raise ConfigError(f"loss.similarity={self.similarity!r} must be 'dot' or 'cosine'")
        if self.pooling not in ("cls", "mean"):
            raise ConfigError(f"loss.pooling={self.pooling!r} must be 'cls' or 'mean'")
        if self.temperature <= 0:
            raise ConfigError("loss.temperature must be > 0")
        if self.representation not in ("dense", "dupmae", "splade"):
            raise ConfigError(f"loss.representation={self.representation!r} must be 'dense', 'dupmae' or 'splade'")
        if self.representation in ("dupmae", "splade") and self.similarity != "dot":
            raise ConfigError(f"loss.representation={self.representation} scores by dot product: set loss.similarity=dot")
        if self.representation == "splade" and not self.shared_encoder:
            raise ConfigError("loss.representation=splade trains one encoder for queries and documents (the "
                              "SparseEncoder export has one): set loss.shared_encoder=true", key="shared_encoder")
        if self.distill_loss not in ("kl", "margin_mse"):
            raise ConfigError(f"loss.distill_loss={self.distill_loss!r} must be 'kl' or 'margin_mse'", key="distill_loss")
        if min(self.flops_query_weight, self.flops_doc_weight) < 0 or self.flops_warmup_steps < 0:
            raise ConfigError("loss.flops_*_weight and loss.flops_warmup_steps must be >= 0", key="flops_query_weight")
        for pair in self.starbucks_pairs:
            if len(pair) != 2 or min(pair) < 1:
                raise ConfigError(f"loss.starbucks_pairs: {pair} is not a [layer, dim] with both >= 1",
                                  key="starbucks_pairs")
        if self.starbucks_pairs and self.representation != "dense":
            raise ConfigError("loss.starbucks_pairs needs loss.representation=dense", key="starbucks_pairs")


class BiEncoder(nn.Module):
    name = "contrastive"

    def __init__(self, encoder: nn.Module, cfg: LossConfig, query_encoder: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        self.encoder = encoder  # passages (and queries when shared)
        self.query_encoder = query_encoder if not cfg.shared_encoder else None
        if not cfg.shared_encoder and query_encoder is None:
            raise ValueError("shared_encoder=False needs a query encoder")
        self.cfg = cfg
        self.pairs = self._srl_pairs(encoder) if cfg.starbucks_pairs else []
        self.splade = cfg.representation == "splade"
        # optimizer steps done, for the FLOPS warm-up (set after each step by `retromae finetune`; a persistent buffer
        # so that a resumed run continues its schedule)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @property
    def loss_weights(self) -> dict[str, float]:
        """Each named loss's weight in the total, read by the trainer at every step."""
        cfg = self.cfg
        weights = {"contrastive": cfg.contrastive_weight, "distill": cfg.distill_weight,
                   "srl_kl": cfg.starbucks_kl_weight}
        if self.splade:
            ramp = 1.0
            if cfg.flops_warmup_steps > 0:
                ramp = min(1.0, (int(self.steps_done) / cfg.flops_warmup_steps) ** 2)
            weights.update(flops_q=cfg.flops_query_weight * ramp, flops_d=cfg.flops_doc_weight * ramp,
                           nnz_q=0.0, nnz_d=0.0)
        return weights

    # ----- encoding -------------------------------------------------------------------------------------
    def _srl_pairs(self, encoder: nn.Module) -> list[tuple[int, int]]:
        """The (layer, dim) pairs other than the full size (the last layer at full width), checked against the
        model (Starbucks, methods.md §1.11)."""
        arch = encoder_of(encoder)
        layers, width = arch.num_layers, arch.hidden_size
        pairs = [tuple(p) for p in self.cfg.starbucks_pairs]
        for layer, dim in pairs:
            if layer > layers or dim > width:
                raise ConfigError(f"loss.starbucks_pairs: ({layer}, {dim}) does not fit a model of {layers} layers of "
                                  f"{width}", key="starbucks_pairs")
        return [p for p in pairs if p != (layers, width)]

    def _embed(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pairs:
            # [full size ; pair 1 ; pair 2 ...] in one vector per text: cross-device gathering and GradCache apply
            # unchanged, and forward() scores each part on its own
            states = encoder_of(model).layer_states(input_ids, attention_mask)  # as the head reads them
            parts = [self._vector(states[-1], attention_mask)]
            parts += [self._vector(states[layer][..., :dim], attention_mask) for layer, dim in self.pairs]
            return torch.cat(parts, dim=-1)
        if self.splade:  # (B, V) fp32 weights (retrieval/sparse.py): a plain dot product scores them
            return model(input_ids, attention_mask)
        if self.cfg.representation == "dupmae":
            # [W h ; top-k mu as a vocabulary-sized vector]: a plain dot product of two of these is DupMAE's
            # dense dot + sparse dot, so the loss, GradCache and cross-device gathering apply unchanged
            dense, values, ids = model(input_ids, attention_mask)
            return torch.cat([dense, model.densify(values, ids)], dim=-1)
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._vector(hidden, attention_mask)

    def _vector(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vectors = pool(hidden, attention_mask, self.cfg.pooling)
        if vectors.dtype in (torch.float16, torch.bfloat16):
            vectors = vectors.float()  # scores and the softmax in fp32 under autocast
        return F.normalize(vectors, dim=-1) if self.cfg.similarity == "cosine" else vectors

    def embed(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Vectors of a batch of texts. With GradCache, chunk by chunk: each chunk's forward keeps no
        activations, and the backward pass re-runs the chunk and feeds it its vectors' cached gradient.
        That is GradCache (Gao et al., 2021), written as per-chunk activation checkpointing, which also
        restores each chunk's dropout randomness for the re-run."""
        chunk = self.cfg.grad_cache_chunk
        if chunk <= 0 or not torch.is_grad_enabled() or len(input_ids) <= chunk:
            return self._embed(model, input_ids, attention_mask)
        parts = [
            checkpoint(self._embed, model, input_ids[i : i + chunk], attention_mask[i : i + chunk],
                       use_reentrant=False, preserve_rng_state=True)
            for i in range(0, len(input_ids), chunk)
        ]
        return torch.cat(parts)

    def encode_queries(self, batch: dict) -> torch.Tensor:
        model = self.query_encoder if self.query_encoder is not None else self.encoder
        return self.embed(model, batch["query_input_ids"], batch["query_attention_mask"])

    def encode_passages(self, batch: dict) -> torch.Tensor:
        return self.embed(self.encoder, batch["passage_input_ids"], batch["passage_attention_mask"])

    # ----- the trainer's contract --------------------------------------------------------------------
    def prepare(self, batch: dict) -> dict:
        return batch

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        queries = batch["query_input_ids"].shape[0]
        items = {"contrastive": torch.tensor(float(queries), device=batch["query_input_ids"].device)}
        if self.pairs:
            items["srl_ce"] = items["srl_kl"] = items["contrastive"]
        if self.cfg.distill_weight > 0:
            if self.cfg.distill_loss == "margin_mse":
                items["distill"] = self._margin_pairs(batch).sum().float()
            else:
                items["distill"] = self._teacher_rows(batch).sum().float()
        if self.splade:
            one = torch.tensor(1.0 if world()[0] == 0 else 0.0, device=items["contrastive"].device)
            items["flops_q"] = items["flops_d"] = one  # one value per global batch (see _flops)
            items["nnz_q"] = items["contrastive"]
            items["nnz_d"] = batch["passage_valid"].sum().float()
        return items

    def _margin_pairs(self, batch: dict) -> torch.Tensor:
        """(Q, G - 1) bool: (positive, negative j) pairs of a query whose two passages both have teacher scores."""
        scores = batch.get("teacher_scores")
        if scores is None:
            raise ConfigError("loss.distill_weight > 0 needs teacher scores: set data.teacher_scores")
        known = batch["passage_valid"].view(scores.shape) & ~torch.isnan(scores)
        return known[:, :1] & known[:, 1:]

    def _teacher_rows(self, batch: dict) -> torch.Tensor:
        """Queries whose whole group has teacher scores (the others take no part in distillation)."""
        scores = batch.get("teacher_scores")
        if scores is None:
            raise ConfigError("loss.distill_weight > 0 needs teacher scores: set data.teacher_scores")
        valid = batch["passage_valid"].view(scores.shape)
        return (~torch.isnan(scores) | ~valid).all(-1) & valid.any(-1)

    def scores(self, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """Query-passage scores in fp32, autocast or not: in bf16 a dot product of 128-256 (tau = 1, CLS) keeps
        8 bits of mantissa, i.e. is rounded to a whole number, and the softmax over those is coarse."""
        with torch.autocast(queries.device.type, enabled=False):
            return full_precision(queries) @ full_precision(passages).T / self.cfg.temperature

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        queries = self.encode_queries(batch)
        passages = self.encode_passages(batch)
        local_queries, local_passages = queries, passages
        valid = batch["passage_valid"]
        group = passages.shape[0] // queries.shape[0]
        offset = 0
        if self.cfg.cross_device_negatives:
            offset = world()[0] * passages.shape[0]
            passages, valid = gather_with_grad(passages), gather(valid)
        targets = offset + torch.arange(queries.shape[0], device=queries.device) * group
        if self.pairs:
            return self._srl_losses(queries, passages, valid, targets, group, batch)
        scores = self.scores(queries, passages).masked_fill(~valid[None, :], float("-inf"))
        losses = {"contrastive": F.cross_entropy(scores, targets, reduction="sum")}
        if self.cfg.distill_weight > 0:
            if self.cfg.distill_loss == "margin_mse":
                losses["distill"] = self._margin_mse(scores, targets, group, batch)
            else:
                losses["distill"] = self._distill(scores, targets, group, batch)
        if self.splade:
            losses.update(self._sparsity_losses(local_queries, local_passages, batch["passage_valid"]))
        return losses

    def _sparsity_losses(self, queries: torch.Tensor, passages: torch.Tensor, valid: torch.Tensor) -> dict:
        """FLOPS of the global batch's queries and documents (exact across processes), and the non-zero counts."""
        flops_q = flops(queries, torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device))
        flops_d = flops(passages, valid)
        return {"flops_q": flops_q, "flops_d": flops_d, "nnz_q": (queries > 0).sum().float(),
                "nnz_d": ((passages > 0) & valid[:, None]).sum().float()}

    def _margin_mse(self, scores: torch.Tensor, targets: torch.Tensor, group: int, batch: dict) -> torch.Tensor:
        """MarginMSE: sum over (positive, negative) pairs of ((s+ - s-) - (t+ - t-))^2, pairs with both teacher
        scores only (SPLADE++, DistilSPLADE-max)."""
        columns = targets[:, None] + torch.arange(group, device=scores.device)[None, :]
        student = scores.gather(1, columns)
        teacher = batch["teacher_scores"].to(student.dtype)
        pairs = self._margin_pairs(batch)
        student_margin = student[:, :1] - student[:, 1:]
        teacher_margin = (teacher[:, :1] - teacher[:, 1:]).nan_to_num(0.0)
        errors = (student_margin.nan_to_num(0.0, neginf=0.0, posinf=0.0) - teacher_margin) ** 2
        return errors.masked_fill(~pairs, 0.0).sum()

    def _srl_losses(self, queries, passages, valid, targets, group: int, batch: dict) -> dict[str, torch.Tensor]:
        """Starbucks SRL: CE at full size, plus at each other (layer, dim) pair its CE and the KL from the full-size
        score distribution (detached: the pairs learn from it, it does not move towards them) to the pair's."""
        sizes = [encoder_of(self.encoder).hidden_size] + [dim for _, dim in self.pairs]
        q_parts, p_parts = queries.split(sizes, dim=-1), passages.split(sizes, dim=-1)
        scores = [self.scores(q, p).masked_fill(~valid[None, :], float("-inf")) for q, p in zip(q_parts, p_parts)]
        full = scores[0]
        teacher = full.detach().log_softmax(-1)
        losses = {"contrastive": F.cross_entropy(full, targets, reduction="sum"),
                  "srl_ce": sum(F.cross_entropy(s, targets, reduction="sum") for s in scores[1:]),
                  "srl_kl": sum(_kl_sum(teacher, s.log_softmax(-1)) for s in scores[1:])}
        if self.cfg.distill_weight > 0:
            losses["distill"] = self._distill(full, targets, group, batch)
        return losses

    def _distill(self, scores: torch.Tensor, targets: torch.Tensor, group: int, batch: dict) -> torch.Tensor:
        """KL(teacher || student) over each query's own group, summed over queries with complete teacher scores."""
        columns = targets[:, None] + torch.arange(group, device=scores.device)[None, :]
        student = scores.gather(1, columns)
        valid = batch["passage_valid"].view(-1, group)
        rows = self._teacher_rows(batch)
        teacher = (batch["teacher_scores"] / self.cfg.distill_temperature).nan_to_num(0.0)
        teacher = teacher.masked_fill(~valid, float("-inf")).log_softmax(-1)
        student = student.masked_fill(~valid, float("-inf")).log_softmax(-1)
        kl = (teacher.exp() * (teacher - student)).masked_fill(~valid, 0.0).sum(-1)
        return kl[rows].sum()


def flops(vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """This process's share of the FLOPS regulariser sum_j ((1/N) sum_i |w_ij|)^2 of the global batch: the column
    sums of every process gathered with their gradients, N the global number of valid rows. Every process computes
    the whole value and returns 1/P of it (the trainer sums the processes' shares and counts the loss once; the
    gradient reaching each process's rows through the gather is then exactly that of the global value)."""
    size = world()[1]
    columns = (vectors.abs() * valid[:, None].to(vectors.dtype)).sum(0, keepdim=True)
    total = gather_with_grad(columns).sum(0)
    count = gather(valid.sum().reshape(1).to(vectors.dtype)).sum().clamp(min=1.0)
    return ((total / count) ** 2).sum() / size


def _kl_sum(teacher_log: torch.Tensor, student_log: torch.Tensor) -> torch.Tensor:
    """sum over rows of KL(teacher || student) from log-probabilities (masked entries, -inf in both, add 0)."""
    terms = teacher_log.exp() * (teacher_log - student_log)
    return terms.masked_fill(torch.isinf(teacher_log), 0.0).sum()
