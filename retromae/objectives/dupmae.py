"""DupMAE / RetroMAE v2 (Liu et al., ACL 2023; methods.md §1.3): RetroMAE's two losses plus a bag-of-words loss
on the ordinary tokens (OT): the encoder's MLM-head logits at every non-[CLS], non-pad position are max-pooled
over positions into mu (a vocabulary-sized vector), and -sum_{w in set(x)} log softmax(mu)_w / |set(x)| is
minimised. Paper: unmasked positions only, weight 1; the authors' code: all positions, weight 0.1.

Also here, because its authors never released it: DupMAE's retrieval representation [W h ; top-k of mu],
scored as dense dot + sparse dot (`DupMAERepresentation`), used by `retromae evaluate --representation dupmae`
and trainable by `retromae finetune` with `loss.representation: dupmae`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from retromae.architectures import encoder_of
from retromae.config import ConfigError
from retromae.objectives.base import full_precision, max_pooled_logits, register
from retromae.objectives.retromae import RetroMAE, RetroMAEConfig


@dataclass
class DupMAEConfig(RetroMAEConfig):
    name: str = "dupmae"  # which objective
    bow_weight: float = 1.0  # weight of the bag-of-words loss (paper: 1; authors' code: 0.1)
    bow_positions: str = "unmasked"  # positions max-pooled into mu: unmasked (paper) | all (authors' code)

    def validate(self) -> None:
        super().validate()
        if self.bow_positions not in ("unmasked", "all"):
            raise ConfigError(f"objective.bow_positions={self.bow_positions!r} must be 'unmasked' or 'all'")


def bag_of_words(input_ids: torch.Tensor, ordinary: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which vocabulary entries occur among each text's ordinary tokens."""
    counts = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.long, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, ordinary.long()) > 0


def bag_of_words_loss_sum(log_probs: torch.Tensor, bag: torch.Tensor) -> torch.Tensor:
    """sum over texts of -sum_{w in bag} log p_w / |bag| (texts with an empty bag contribute 0)."""
    sizes = bag.sum(-1)
    per_text = -(log_probs.masked_fill(~bag, 0.0)).sum(-1) / sizes.clamp(min=1)
    return per_text.masked_fill(sizes == 0, 0.0).sum()


def max_pool_logits(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """mu: (B, L, V) logits max-pooled over the `positions` (B, L) of each text -> (B, V)."""
    return logits.masked_fill(~positions.unsqueeze(-1), float("-inf")).max(dim=1).values


@register
class DupMAE(RetroMAE):
    name = "dupmae"
    Config = DupMAEConfig

    def __init__(self, encoder, tokenizer, config: DupMAEConfig):
        super().__init__(encoder, tokenizer, config)
        self.loss_weights["bow"] = config.bow_weight

    def prepare(self, batch: dict) -> dict:
        batch = super().prepare(batch)
        real = batch["attention_mask"].bool()
        positions = real.clone()
        positions[:, 0] = False  # every non-[CLS], non-pad position
        if self.config.bow_positions == "unmasked":
            positions &= ~batch["encoder_mask"]
        batch["bow_positions"] = positions
        batch["bow_targets"] = bag_of_words(batch["input_ids"], batch["words"] >= 0, self.encoder.config.vocab_size)
        return batch

    def num_items(self, batch: dict) -> dict[str, torch.Tensor]:
        items = super().num_items(batch)
        items["bow"] = (batch["bow_targets"].any(-1)).sum()
        return items

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        hidden = self.encode(batch)
        # The MLM loss reads the head at the masked positions, mu pools it over the others (the paper's default;
        # with bow_positions: all, over every position): each computed where it is needed, in bounded blocks.
        mu = max_pooled_logits(self.arch.head, hidden, batch["bow_positions"])
        return {
            "mlm": self.mlm_loss(hidden, batch),
            "decoder": self.decode_loss(hidden[:, 0], batch),
            "bow": bag_of_words_loss_sum(mu.log_softmax(-1), batch["bow_targets"]),
        }


# ----- the retrieval representation ---------------------------------------------------------------------------


@dataclass
class DupMAERepresentationConfig:
    dense_dim: int = 384  # size of W h (the paper: 768 -> 384)
    topk: int = 384  # vocabulary entries kept in the sparse part (the paper: 384)
    sparse_activation: str = "relu"  # relu (our default: no negative weights) | none: applied to the kept mu values


class DupMAERepresentation(nn.Module):
    """[W h ; top-k of mu] of a text, scored as dense dot + sparse dot.

    mu is the max over the text's non-[CLS], non-pad positions of the MLM head's logits on the unmasked text.
    W starts as the first `dense_dim` coordinates of h (a truncated identity) and is learned in fine-tuning.
    """

    def __init__(self, mlm_model: nn.Module, cfg: DupMAERepresentationConfig | None = None):
        super().__init__()
        self.cfg = cfg or DupMAERepresentationConfig()
        self.mlm = mlm_model
        self.arch = encoder_of(mlm_model)
        hidden = self.arch.hidden_size
        self.projection = nn.Linear(hidden, self.cfg.dense_dim, bias=False)
        with torch.no_grad():
            self.projection.weight.zero_()
            eye = torch.eye(min(hidden, self.cfg.dense_dim))
            self.projection.weight[: eye.shape[0], : eye.shape[1]] = eye

    @property
    def vocab_size(self) -> int:
        return self.mlm.config.vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dense (B, dense_dim), sparse values (B, k), sparse vocabulary ids (B, k))."""
        hidden = self.arch.forward(input_ids, attention_mask)
        dense = full_precision(self.projection(hidden[:, 0]))
        positions = attention_mask.bool().clone()
        positions[:, 0] = False
        mu = max_pooled_logits(self.arch.head, hidden, positions)
        values, ids = mu.topk(min(self.cfg.topk, mu.shape[-1]), dim=-1)
        if self.cfg.sparse_activation == "relu":
            values = values.clamp(min=0.0)
        return dense, values, ids

    def densify(self, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The sparse part as a (B, V) tensor (differentiable in the values)."""
        out = torch.zeros(values.shape[0], self.vocab_size, dtype=values.dtype, device=values.device)
        return out.scatter(1, ids, values)

    def save(self, folder: str | Path) -> None:
        """What DupMAE adds to an exported encoder body, in `folder` (e.g. `model/dupmae/`): the MLM head's own
        weights under the masked-LM model's names (whatever the family; not the vocabulary matrix when it is tied to
        the body's word embeddings) and W."""
        import safetensors.torch

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(head_state(self.mlm, "head.") | {
            "projection.weight": self.projection.weight.detach().cpu().contiguous()},
            str(folder / "dupmae.safetensors"))
        (folder / "config.json").write_text(json.dumps(self.cfg.__dict__))

    @classmethod
    def load(cls, model_dir: str, device=None) -> "DupMAERepresentation":
        """An exported model folder with its `dupmae/` part (from `retromae finetune` with loss.representation
        dupmae); without one, a pretrained export's MLM head and a truncated-identity W."""
        import safetensors.torch
        from transformers import AutoModelForMaskedLM

        from retromae.modeling import from_pretrained, heads_path

        folder = Path(model_dir) / "dupmae"
        cfg = DupMAERepresentationConfig(**json.loads((folder / "config.json").read_text())) if folder.is_dir() else None
        mlm = from_pretrained(AutoModelForMaskedLM, model_dir, "model", dtype=torch.float32)
        rep = cls(mlm, cfg)
        if folder.is_dir():
            state = safetensors.torch.load_file(str(folder / "dupmae.safetensors"))
            load_head_state(mlm, state, "head.")
            rep.projection.weight.data.copy_(state["projection.weight"])
        elif Path(heads_path(model_dir)).is_file():
            load_head_state(mlm, safetensors.torch.load_file(heads_path(model_dir)), "encoder.")
        return rep.eval().to(device or "cpu")


def head_state(mlm: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The MLM head's own weights of a masked-LM model, under its own parameter names (with `prefix`), tied copies of
    the body's weights left out."""
    arch = encoder_of(mlm)
    body = {p.data_ptr() for p in arch.body.parameters()}
    own = mlm.state_dict()
    state, seen = {}, set(body)
    for name in arch.head_parameter_names():
        value = own[name]
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            state[prefix + name] = value.detach().cpu().contiguous()
    return state


def load_head_state(mlm: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Load the head weights saved under `prefix` + the model's own names (`head_state`, or pretraining's heads file,
    whose names start with encoder.); returns the names loaded."""
    names = set(encoder_of(mlm).head_parameter_names())
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in names}
    if part:
        mlm.load_state_dict(part, strict=False)
    return sorted(part)
