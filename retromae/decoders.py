"""The objectives' own decoders and heads, built to match the encoder they train.

Every randomly initialised decoder of the family (RetroMAE's one layer, DupMAE's, SEED-Encoder's windowed
decoder, CoT-MAE's, MAE-LM's reinsertion decoder, Condenser's head, TSDAE's cross-attention) is made of the pieces
here, shaped by a `DecoderSpec` that the encoder's adapter (`retromae.architectures`) derives from the model: its
width, heads, feed-forward size and activation, its normalisation (LayerNorm or RMSNorm, with or without bias), where
the norm sits (after the residual as in BERT, or before the block as in ModernBERT and EuroBERT, with a final norm),
whether the feed-forward block is gated (GLU), and how positions enter (added to the inputs with the embeddings, or
rotary inside attention). So a decoder on ModernBERT looks like ModernBERT, one on BERT exactly like before.

Written here rather than taken from transformers: a decoder layer of a given family cannot be instantiated without
the family's whole attention-mask machinery, and these layers need what no family's layer takes: queries and
keys/values from different streams (RetroMAE's enhanced decoding), a boolean visibility per query row, a single
cross-attention key (SEED, TSDAE). Attention is torch's fused `scaled_dot_product_attention` with a boolean mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderSpec:
    hidden: int  # width of the encoder's layers
    heads: int  # attention heads
    intermediate: int  # feed-forward width (of each half, for a gated block)
    activation: str = "gelu"  # feed-forward activation, a transformers name (gelu, gelu_new, silu, relu ...)
    norm: str = "layer"  # layer (LayerNorm) | rms (RMSNorm)
    norm_eps: float = 1e-12  # the normalisation's epsilon
    norm_bias: bool = True  # LayerNorm with a bias
    prenorm: bool = False  # norm before each block and once at the end (ModernBERT, EuroBERT) | after the residual (BERT)
    glu: bool = False  # gated feed-forward: act(x W_gate) * (x W_up)
    bias: bool = True  # linear layers with biases
    rotary_theta: float | None = None  # rotary positions inside attention; None: positions come with the inputs
    dropout: float = 0.1  # dropout on block outputs
    attention_dropout: float = 0.1  # dropout on attention probabilities
    init_std: float = 0.02  # normal initialisation of the linear layers

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def activation(name) -> nn.Module:
    """A transformers activation by name (ACT2FN), or a callable config value as it is."""
    if callable(name) and not isinstance(name, str):
        return name
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def make_norm(spec: DecoderSpec) -> nn.Module:
    if spec.norm == "rms":
        return nn.RMSNorm(spec.hidden, eps=spec.norm_eps)
    return nn.LayerNorm(spec.hidden, eps=spec.norm_eps, bias=spec.norm_bias)


def init_linear_layers(module: nn.Module, std: float) -> None:
    """BERT's initialisation for randomly initialised heads: normal(0, std) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE, the rotate-half layout transformers uses) for queries and keys."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, heads, L, d) rotated by `positions` (L,) or (B, L)."""
        freqs = positions.float()[..., None] * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)
        if angles.dim() == 3:
            angles = angles[:, None]
        cos, sin = angles.cos(), angles.sin()
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention of a query stream over a context stream with a boolean visibility mask (B, Lq, Lk), or
    anything broadcasting to it (None: everything visible). Rotary positions are applied when the spec has them and
    positions are given."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.heads, self.dropout = spec.heads, spec.attention_dropout
        self.query, self.key, self.value = (nn.Linear(spec.hidden, spec.hidden, bias=spec.bias) for _ in range(3))
        self.output = nn.Linear(spec.hidden, spec.hidden, bias=spec.bias)
        self.rotary = Rotary(spec.head_dim, spec.rotary_theta) if spec.rotary_theta else None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

    def keys_values(self, context: torch.Tensor, positions: torch.Tensor | None = None):
        """The context's keys and values, (B, heads, Lk, d) each: computed once when many query blocks share them."""
        key = self._split(self.key(context))
        if self.rotary is not None and positions is not None:
            key = self.rotary(key, positions)
        return key, self._split(self.value(context))

    def attend(self, query: torch.Tensor, keys_values, visible: torch.Tensor | None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        q = self._split(self.query(query))
        if self.rotary is not None and positions is not None:
            q = self.rotary(q, positions)
        key, value = keys_values
        attended = F.scaled_dot_product_attention(
            q, key.to(q.dtype), value.to(q.dtype), attn_mask=None if visible is None else visible.unsqueeze(1),
            dropout_p=self.dropout if self.training else 0.0)
        return self.output(attended.transpose(1, 2).reshape(query.shape))

    def forward(self, query: torch.Tensor, context: torch.Tensor, visible: torch.Tensor | None,
                query_positions: torch.Tensor | None = None, context_positions: torch.Tensor | None = None):
        return self.attend(query, self.keys_values(context, context_positions), visible, query_positions)


class FeedForward(nn.Module):
    """Linear -> activation -> Linear, or its gated form act(x W_gate) * (x W_up) -> Linear."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.glu = spec.glu
        self.intermediate = nn.Linear(spec.hidden, spec.intermediate * (2 if spec.glu else 1), bias=spec.bias)
        self.act = activation(spec.activation)
        self.output = nn.Linear(spec.intermediate, spec.hidden, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.intermediate(x)
        if self.glu:
            gate, up = x.chunk(2, dim=-1)
            return self.output(self.act(gate) * up)
        return self.output(self.act(x))


class DecoderLayer(nn.Module):
    """One transformer layer in the encoder's form whose queries and keys/values may come from different streams,
    with a boolean visibility per query row, and optionally a cross-attention onto a memory (SEED's h).

    Post-norm (BERT): x = LN(query + Attn(query, context)); [x = LN(x + Cross(x, memory))]; LN(x + FFN(x)).
    Pre-norm (ModernBERT, EuroBERT): x = query + Attn(N(query), N(context)); [x = x + Cross(N(x), memory)];
    x + FFN(N(x)); a stack of pre-norm layers ends with a final norm (`DecoderStack`, `final_norm`).
    """

    def __init__(self, spec: DecoderSpec, cross_attention: bool = False):
        super().__init__()
        self.prenorm = spec.prenorm
        self.attention = Attention(spec)
        self.attention_norm = make_norm(spec)
        self.cross_attention = Attention(spec) if cross_attention else None
        self.cross_norm = make_norm(spec) if cross_attention else None
        self.ffn = FeedForward(spec)
        self.ffn_norm = make_norm(spec)
        self.dropout = nn.Dropout(spec.dropout)
        init_linear_layers(self, spec.init_std)

    def attend(self, query: torch.Tensor, keys_values, visible, positions=None) -> torch.Tensor:
        """The self-attention block for queries whose keys and values (`Attention.keys_values` of the normalised
        context) are already computed."""
        if self.prenorm:
            return query + self.dropout(self.attention.attend(self.attention_norm(query), keys_values, visible,
                                                              positions))
        return self.attention_norm(query + self.dropout(self.attention.attend(query, keys_values, visible, positions)))

    def context_keys_values(self, context: torch.Tensor, positions=None):
        return self.attention.keys_values(self.attention_norm(context) if self.prenorm else context, positions)

    def rest(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """What follows self-attention: the cross-attention onto `memory` (if any) and the feed-forward block."""
        if self.cross_attention is not None:
            if self.prenorm:
                x = x + self.dropout(self.cross_attention(self.cross_norm(x), memory, None))
            else:
                x = self.cross_norm(x + self.dropout(self.cross_attention(x, memory, None)))
        if self.prenorm:
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))

    def forward(self, query: torch.Tensor, context: torch.Tensor, visible: torch.Tensor | None,
                positions: torch.Tensor | None = None, memory: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Lq, D), context (B, Lk, D), visible (B, Lq, Lk) bool; `positions` (Lk,) when queries and keys
        share positions (rotary specs); `memory` (B, M, D) for the cross-attention."""
        x = self.attend(query, self.context_keys_values(context, positions), visible, positions)
        return self.rest(x, memory)


class DecoderStack(nn.Module):
    """`layers` decoder layers over one stream with plain self-attention, closed by a final norm when the spec is
    pre-norm (the encoder's head reads normalised states)."""

    def __init__(self, spec: DecoderSpec, layers: int, cross_attention: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(spec, cross_attention) for _ in range(layers))
        self.final_norm = make_norm(spec) if spec.prenorm else None

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None, positions: torch.Tensor | None = None,
                memory: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, x, visible, positions, memory)
        return self.final_norm(x) if self.final_norm is not None else x


def padding_visibility(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, L): every row sees every real token of its text (plain self-attention)."""
    return attention_mask.bool()[:, None, :]


class VectorCrossAttention(nn.Module):
    """TSDAE's cross-attention onto a single key/value per text (the pooled vector), in the encoder's norm
    placement: post-norm x -> N(x + Attn(x, [v])), pre-norm x -> x + Attn(N(x), [v])."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.prenorm = spec.prenorm
        self.attention = Attention(DecoderSpec(**{**spec.__dict__, "rotary_theta": None}))
        self.norm = make_norm(spec)
        self.dropout = nn.Dropout(spec.dropout)
        init_linear_layers(self, spec.init_std)

    def forward(self, x: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        memory = vector.unsqueeze(1)
        if self.prenorm:
            return x + self.dropout(self.attention(self.norm(x), memory, None))
        return self.norm(x + self.dropout(self.attention(x, memory, None)))
