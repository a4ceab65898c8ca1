"""The one place that knows encoder architectures.

Objectives, the bi-encoder, the exporter and the evaluator never reach into a family's internals; they ask an
`Encoder` adapter, built from any Hugging Face masked-LM model (or its body) by `encoder_of(model)`:
- tokens in: the word embeddings, `embed(ids)` (what the first layer reads: word + absolute positions + types +
  norm, projected to the layers' width where the embedding is narrower), how positions enter (`positions`:
  absolute tables, rotary inside attention, or relative attention), `absolute_positions(L)`;
- the layers: `forward` (all of them, with optional position ids), `layer_states` (every layer's output as the
  MLM head would read it: a pre-norm family's final norm applied), `run_layer` (one layer of the encoder's own with
  a boolean visibility of our making) and its two halves `self_attention` / `feed_forward` (TSDAE inserts a
  cross-attention between them), in the mask format of the model's attention implementation;
- the MLM head split into its `head_transform` (hidden -> embedding space) and its vocabulary `projection` (tied
  or not, with a bias or not), and the whole `head`;
- `decoder_spec()`: the shape a decoder needs to match this encoder (retromae.decoders);
- whether the body takes `token_type_ids` (`token_types`); the special tokens come from the tokenizer
  (`retromae.masking.TokenTables`, `retromae.data.examples.special_wrapping`), whatever they are called, pad = end
  of text (EuroBERT) included.

Adding a family is one small subclass here and one row of the matrix (scripts/architectures.py,
docs/architectures.md); no objective changes.

Attention implementations: `attention_for(config)` picks sdpa where the family's transformers class supports it and
eager elsewhere (DeBERTa, MPNet); `model.attn_implementation` overrides. Our own decoders always use torch's
fused attention with boolean masks. Where an objective runs the encoder's own layers with its own masks (TSDAE's
causal decoder, Starbucks' decoder), a kernel that takes no arbitrary mask (flash attention, whose unpadded path
only knows padding) is swapped for sdpa during those calls (`own_masks`): the encoder pass keeps its kernel, the
decoder pass sees exactly the mask the objective built.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import ClassVar

import torch
from torch import nn

from retromae.config import ConfigError
from retromae.decoders import DecoderSpec

# Attention kernels that take a mask of any shape (ours); flash attention only takes padding.
MASKABLE = ("sdpa", "eager")


def masked_lm_class(config):
    """The transformers masked-LM class of a config, without building it."""
    from transformers import AutoModelForMaskedLM

    try:
        return AutoModelForMaskedLM._model_mapping[type(config)]
    except KeyError:
        return None


def attention_for(config, requested: str | None = "auto") -> str:
    """The attention implementation to load a model with: `requested` unless it is auto / None, then sdpa where the
    family's transformers class supports it, else eager (DeBERTa and MPNet refuse sdpa)."""
    cls = masked_lm_class(config)
    has_sdpa = cls is None or getattr(cls, "_supports_sdpa", False)
    if requested == "sdpa" and not has_sdpa:
        raise ConfigError(f"model.attn_implementation=sdpa: {cls.__name__} has no sdpa attention in transformers; "
                          "use auto (eager for this family) or eager", key="attn_implementation")
    if requested not in (None, "auto"):
        return requested
    return "sdpa" if has_sdpa else "eager"


class TiedProjection(nn.Module):
    """x W_e^T + b for a head that multiplies by the word embeddings itself (DeBERTa's non-legacy head)."""

    def __init__(self, embeddings: nn.Embedding, bias: nn.Parameter | None):
        super().__init__()
        self.embeddings, self.bias = embeddings, bias

    @property
    def weight(self) -> torch.Tensor:
        return self.embeddings.weight

    @property
    def out_features(self) -> int:
        return self.embeddings.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.embeddings.weight.T
        return out + self.bias if self.bias is not None else out


class MLMHead(nn.Module):
    """hidden -> vocabulary logits as transform then projection: a view onto the model's own head modules (not a
    copy: the parameters stay the model's)."""

    def __init__(self, transform: nn.Module, projection: nn.Module):
        super().__init__()
        self.transform, self.projection = transform, projection

    @property
    def vocab_size(self) -> int:
        return self.projection.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projection(self.transform(hidden))


class Encoder:
    """A BERT-like body: `embeddings`, `encoder.layer[i]` with attention / intermediate / output, post-LN,
    absolute positions; MLM head `cls.predictions` (transform + decoder). Other families override what differs."""

    model_types: ClassVar[tuple[str, ...]] = ("bert",)
    positions: ClassVar[str] = "absolute"  # absolute (a table added to the inputs) | rotary | relative (in attention)
    prenorm: ClassVar[bool] = False  # norm before each block and a final norm (ModernBERT, EuroBERT)
    glu: ClassVar[bool] = False  # gated feed-forward blocks
    # True when a position id says all there is about a token's place: every layer attends by content and position
    # ids only, so tokens can be packed (MAE-LM's removal) without changing what the model sees. False for relative
    # attention and sliding windows, which read positions from the order of the sequence.
    packable: ClassVar[bool] = True
    token_types: ClassVar[bool] = True  # the body takes token_type_ids

    def __init__(self, model: nn.Module):
        self.model = model
        self.body = model.base_model
        self.config = model.config
        self.is_mlm = self.body is not model
        self._head = None

    # ----- tokens in -------------------------------------------------------------------------------------------
    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.body.get_input_embeddings()

    @property
    def layers(self) -> nn.ModuleList:
        return self.body.encoder.layer

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def position_offset(self) -> int:
        """The position id of the first token: 0, or padding_idx + 1 for RoBERTa-likes."""
        padding_idx = getattr(getattr(self.body, "embeddings", None), "padding_idx", None)
        return 0 if padding_idx is None else padding_idx + 1

    def position_ids(self, length: int, device) -> torch.Tensor:
        return torch.arange(length, device=device) + self.position_offset()

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """What the first layer reads for these ids, (B, L, D)."""
        if position_ids is None:
            position_ids = self.position_ids(input_ids.shape[1], input_ids.device)[None].expand_as(input_ids)
        return self.body.embeddings(input_ids=input_ids, position_ids=position_ids)

    def from_embedding_space(self, x: torch.Tensor) -> torch.Tensor:
        """A vector of the word-embedding space (the MLM head's transform output) taken to the layers' width."""
        return x

    def absolute_positions(self, length: int, device) -> torch.Tensor:
        """Absolute position embeddings p_0 .. p_{L-1}, (L, D), as the encoder adds them to token embeddings."""
        return self.body.embeddings.position_embeddings(self.position_ids(length, device))

    # ----- the layers --------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer hidden states, (B, L, D)."""
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        return self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    def layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """The embeddings' and every layer's output, L + 1 tensors (B, L, D), each as the MLM head reads states:
        for pre-norm families the final norm is applied to every one (the last one is the model's own output)."""
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        states = list(out.hidden_states)
        states[-1] = out.last_hidden_state
        if self.prenorm:
            states[:-1] = [self.final_norm(s) for s in states[:-1]]
        return states

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @contextlib.contextmanager
    def own_masks(self):
        """Within: the encoder's attention modules take masks of our making (flash attention swapped for sdpa)."""
        implementation = self.config._attn_implementation
        if implementation in MASKABLE or implementation is None:
            yield
            return
        self.config._attn_implementation = "sdpa"
        try:
            yield
        finally:
            self.config._attn_implementation = implementation

    def layer_mask(self, visible: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """A (B, Lq, Lk) boolean visibility in the form the model's attention takes: boolean (B, 1, Lq, Lk) for
        sdpa, additive for eager."""
        visible = visible.unsqueeze(1)
        if self.config._attn_implementation == "eager":
            zeros = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
            return zeros.masked_fill(~visible, torch.finfo(torch.float32).min)
        return visible

    def layer_context(self, x: torch.Tensor, position_ids: torch.Tensor | None = None):
        """What a layer needs beside its input and mask (rotary angles, relative embeddings ...); None for BERT."""
        return None

    def self_attention(self, layer: nn.Module, x: torch.Tensor, mask, context) -> torch.Tensor:
        """The layer's attention block with its residual and norm."""
        return layer.attention(x, attention_mask=mask)[0]

    def feed_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's feed-forward block with its residual and norm."""
        return layer.output(layer.intermediate(x), x)

    def run_layer(self, layer: nn.Module, x: torch.Tensor, visible: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One of the encoder's layers (or a copy of one) over x (B, L, D) with row i seeing the columns of
        `visible` (B, L, L); position ids (B, L) or (L,) default to the sequence order."""
        with self.own_masks():
            context = self.layer_context(x, position_ids)
            return self.feed_forward(layer, self.self_attention(layer, x, self.layer_mask(visible, layer), context))

    # ----- the MLM head ------------------------------------------------------------------------------------------
    @property
    def head(self) -> MLMHead:
        if self._head is None:
            if not self.is_mlm:
                raise ConfigError(f"{type(self.model).__name__} has no MLM head (load it with AutoModelForMaskedLM)")
            self._head = MLMHead(self.head_transform(), self.projection())
        return self._head

    def head_transform(self) -> nn.Module:
        return self.model.cls.predictions.transform

    def projection(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def head_parameter_names(self) -> list[str]:
        """Names (in the MLM model's state dict, tied aliases included) of the head's weights: all outside the body."""
        prefix = self.model.base_model_prefix + "."
        return [n for n in self.model.state_dict() if not n.startswith(prefix)]

    # ----- decoders ----------------------------------------------------------------------------------------------
    def decoder_spec(self) -> DecoderSpec:
        """A decoder layer shaped like this encoder's layers (randomly initialised by the objective)."""
        c = self.config
        return DecoderSpec(
            hidden=self.hidden_size, heads=c.num_attention_heads, intermediate=c.intermediate_size,
            activation=getattr(c, "hidden_act", "gelu"), norm="layer", norm_eps=getattr(c, "layer_norm_eps", 1e-12),
            prenorm=self.prenorm, glu=self.glu, rotary_theta=self.decoder_rotary_theta(),
            dropout=getattr(c, "hidden_dropout_prob", 0.1), attention_dropout=getattr(c, "attention_probs_dropout_prob", 0.1),
            init_std=getattr(c, "initializer_range", 0.02))

    def decoder_rotary_theta(self) -> float | None:
        """Rotary positions for decoders when the encoder has no absolute table to add to their inputs: the
        encoder's own theta for rotary families, 10,000 (our default) for relative-attention ones."""
        if self.positions == "absolute":
            return None
        return float(rope_theta(self.config) or 10000.0)


def rope_theta(config) -> float | None:
    """The rotary base of a config (the global layers' one for models with several)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"] or {}
    return params.get("rope_theta") or getattr(config, "rope_theta", None)


class RobertaEncoder(Encoder):
    """RoBERTa, XLM-RoBERTa, CamemBERT: BERT's body, positions counted from padding_idx + 1, head `lm_head`."""

    model_types = ("roberta", "xlm-roberta", "camembert")

    def head_transform(self) -> nn.Module:
        head = self.model.lm_head
        return nn.Sequential(head.dense, nn.GELU(), head.layer_norm)

    def projection(self) -> nn.Module:
        return self.model.lm_head.decoder


class ElectraEncoder(Encoder):
    """ELECTRA: BERT's body whose embeddings may be narrower than the layers (`embeddings_project`); the MLM head is
    the generator's (hidden -> embedding size -> vocabulary)."""

    model_types = ("electra",)

    def embed(self, input_ids, position_ids=None):
        return self.from_embedding_space(super().embed(input_ids, position_ids))

    def from_embedding_space(self, x):
        project = getattr(self.body, "embeddings_project", None)
        return project(x) if project is not None else x

    def absolute_positions(self, length, device):
        return self.from_embedding_space(super().absolute_positions(length, device))

    def head_transform(self):
        return self.model.generator_predictions

    def projection(self):
        return self.model.generator_lm_head


class DistilBertEncoder(Encoder):
    """DistilBERT: `transformer.layer[i]` blocks (attention, sa_layer_norm, ffn, output_layer_norm), no token types,
    head vocab_transform / vocab_layer_norm / vocab_projector."""

    model_types = ("distilbert",)
    token_types = False

    @property
    def layers(self):
        return self.body.transformer.layer

    @property
    def hidden_size(self):
        return self.config.dim

    def embed(self, input_ids, position_ids=None):
        return self.body.embeddings(input_ids, position_ids=position_ids)

    def self_attention(self, layer, x, mask, context):
        return layer.sa_layer_norm(layer.attention(x, attention_mask=mask)[0] + x)

    def feed_forward(self, layer, x):
        return layer.output_layer_norm(layer.ffn(x) + x)

    def head_transform(self):
        return nn.Sequential(self.model.vocab_transform, self.model.activation, self.model.vocab_layer_norm)

    def decoder_spec(self):
        c = self.config
        return DecoderSpec(hidden=c.dim, heads=c.n_heads, intermediate=c.hidden_dim, activation=c.activation,
                           norm_eps=1e-12, dropout=c.dropout, attention_dropout=c.attention_dropout,
                           init_std=c.initializer_range)


class MPNetEncoder(Encoder):
    """MPNet: BERT-like layers plus a relative position bias computed once per forward from the sequence order;
    absolute positions counted from padding_idx + 1; RoBERTa-like head. Its transformers class has no sdpa."""

    model_types = ("mpnet",)
    packable = False  # the relative bias reads positions from the order of the sequence
    token_types = False

    def layer_mask(self, visible, layer):
        visible = visible.unsqueeze(1)  # MPNet adds its mask to the scores
        zeros = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
        return zeros.masked_fill(~visible, torch.finfo(torch.float32).min)

    def layer_context(self, x, position_ids=None):
        return self.body.encoder.compute_position_bias(x)

    def self_attention(self, layer, x, mask, context):
        return layer.attention(x, attention_mask=mask, position_bias=context)[0]

    head_transform = RobertaEncoder.head_transform
    projection = RobertaEncoder.projection


class DebertaEncoder(Encoder):
    """DeBERTa-v2 / v3: disentangled relative attention (relative embeddings and positions computed per forward
    from the sequence order), absolute positions in the input only when `position_biased_input` (v3: none), an
    optional convolution beside layer 0 (v2-xlarge). Head: the legacy `cls.predictions`, or `lm_predictions`, which
    multiplies by the word embeddings itself. Its transformers class has no sdpa."""

    model_types = ("deberta-v2",)
    positions = "relative"
    packable = False

    def __init__(self, model):
        super().__init__(model)
        if getattr(self.config, "position_biased_input", True):  # v2 base: a position table added to the inputs too
            self.positions = "absolute"

    def embed(self, input_ids, position_ids=None):
        return self.body.embeddings(input_ids=input_ids, position_ids=position_ids)

    def position_offset(self):
        return 0

    def layer_mask(self, visible, layer):
        return visible.unsqueeze(1)  # DeBERTa takes a boolean (or 0/1) mask itself, whatever the implementation

    def layer_context(self, x, position_ids=None):
        encoder = self.body.encoder
        return encoder.get_rel_pos(x), encoder.get_rel_embedding()

    def self_attention(self, layer, x, mask, context):
        relative_pos, rel_embeddings = context
        return layer.attention(x, mask, relative_pos=relative_pos, rel_embeddings=rel_embeddings)[0]

    def head_transform(self):
        if getattr(self.model, "cls", None) is not None:
            return self.model.cls.predictions.transform
        head = self.model.lm_predictions.lm_head
        return nn.Sequential(head.dense, head.transform_act_fn, head.LayerNorm)

    def projection(self):
        if getattr(self.model, "cls", None) is not None:
            return self.model.cls.predictions.decoder
        return TiedProjection(self.word_embeddings, self.model.lm_predictions.lm_head.bias)


class RotaryEncoder(Encoder):
    """The recent families: `layers` of (attention with rotary angles, MLP), rotary angles from the body's
    `rotary_emb`, no absolute positions."""

    positions = "rotary"
    glu = True
    token_types = False

    @property
    def layers(self):
        return self.body.layers

    def position_offset(self):
        return 0

    def embed(self, input_ids, position_ids=None):
        return self.body.embeddings(input_ids=input_ids)

    def absolute_positions(self, length, device):
        raise ConfigError(f"{type(self.model).__name__} has rotary positions: it has no absolute position table")

    def layer_context(self, x, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None]
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]
        return self.body.rotary_emb(x, position_ids)


class ModernBertEncoder(RotaryEncoder):
    """ModernBERT (Ettin, mmBERT): pre-norm layers (the first without its attention norm), a final norm, gated MLP,
    rotary angles per layer type, and sliding-window attention in most layers (each row sees the tokens within
    `sliding_window` positions); head `head` (dense, act, norm) + `decoder`."""

    model_types = ("modernbert",)
    prenorm = True
    packable = False  # sliding windows are counted in the order of the sequence

    def embed(self, input_ids, position_ids=None):
        return self.body.embeddings(input_ids=input_ids)

    def final_norm(self, x):
        return self.body.final_norm(x)

    def layer_context(self, x, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None]
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]
        return {kind: self.body.rotary_emb(x, position_ids, kind) for kind in set(self.config.layer_types)}

    def layer_mask(self, visible, layer):
        if layer.attention_type == "sliding_attention":
            rows = torch.arange(visible.shape[1], device=visible.device)[:, None]
            columns = torch.arange(visible.shape[2], device=visible.device)[None, :]
            visible = visible & ((rows - columns).abs() <= self.config.sliding_window)
        return super().layer_mask(visible, layer)

    def self_attention(self, layer, x, mask, context):
        return x + layer.attn(layer.attn_norm(x), position_embeddings=context[layer.attention_type],
                              attention_mask=mask)[0]

    def feed_forward(self, layer, x):
        return x + layer.mlp(layer.mlp_norm(x))

    def head_transform(self):
        return self.model.head

    def decoder_spec(self):
        c = self.config
        return DecoderSpec(hidden=c.hidden_size, heads=c.num_attention_heads, intermediate=c.intermediate_size,
                           activation=c.hidden_activation, norm_eps=c.norm_eps, norm_bias=c.norm_bias, prenorm=True,
                           glu=True, bias=c.attention_bias, rotary_theta=self.decoder_rotary_theta(),
                           dropout=c.mlp_dropout, attention_dropout=c.attention_dropout,
                           init_std=c.initializer_range)


class EuroBertEncoder(RotaryEncoder):
    """EuroBERT: Llama-style pre-norm layers with RMSNorm and SwiGLU, rotary, a final RMSNorm, no embedding norm;
    head: the vocabulary projection alone (no transform)."""

    model_types = ("eurobert",)
    prenorm = True

    def embed(self, input_ids, position_ids=None):
        return self.body.embed_tokens(input_ids)

    def final_norm(self, x):
        return self.body.norm(x)

    def self_attention(self, layer, x, mask, context):
        return x + layer.self_attn(layer.input_layernorm(x), position_embeddings=context, attention_mask=mask)[0]

    def feed_forward(self, layer, x):
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def head_transform(self):
        return nn.Identity()

    def projection(self):
        return self.model.lm_head

    def decoder_spec(self):
        c = self.config
        return DecoderSpec(hidden=c.hidden_size, heads=c.num_attention_heads, intermediate=c.intermediate_size,
                           activation=c.hidden_act, norm="rms", norm_eps=c.rms_norm_eps, prenorm=True, glu=True,
                           bias=c.mlp_bias, rotary_theta=self.decoder_rotary_theta(), dropout=0.0,
                           attention_dropout=c.attention_dropout, init_std=c.initializer_range)


class GteEncoder(RotaryEncoder):
    """GTE (Alibaba's new-impl encoders): post-LN layers with rotary attention and a gated MLP, embeddings with
    token types and a LayerNorm, a RoBERTa-like head `lm_head`."""

    model_types = ("gte",)
    token_types = True

    def self_attention(self, layer, x, mask, context):
        attended = layer.self_attn(x, attention_mask=mask, position_embeddings=context)[0]
        return layer.post_attention_layernorm(x + layer.post_attention_dropout(attended))

    def feed_forward(self, layer, x):
        return layer.post_mlp_layernorm(x + layer.post_mlp_dropout(layer.mlp(x)))

    head_transform = RobertaEncoder.head_transform
    projection = RobertaEncoder.projection


class NomicBertEncoder(GteEncoder):
    """NomicBERT (nomic-embed's encoder): GTE's layer layout with BERT's head `cls.predictions`."""

    model_types = ("nomic_bert",)

    head_transform = Encoder.head_transform
    projection = Encoder.projection


FAMILIES: tuple[type[Encoder], ...] = (Encoder, RobertaEncoder, ElectraEncoder, DistilBertEncoder, MPNetEncoder,
                                       DebertaEncoder, ModernBertEncoder, EuroBertEncoder, GteEncoder,
                                       NomicBertEncoder)
_BY_TYPE = {t: cls for cls in FAMILIES for t in cls.model_types}


def family_of(config, what: str = "model.name_or_path") -> type[Encoder]:
    """The adapter class of a model config; a one-line error for a family this toolkit does not know."""
    cls = _BY_TYPE.get(getattr(config, "model_type", None))
    if cls is None:
        known = ", ".join(sorted(_BY_TYPE))
        raise ConfigError(f"{what}: model type {getattr(config, 'model_type', '?')!r} is not an encoder family this "
                          f"toolkit knows ({known}); adding one is one adapter class in retromae/architectures.py")
    return cls


def encoder_of(model: nn.Module) -> Encoder:
    """The adapter of a loaded model (masked-LM model or body)."""
    return family_of(model.config, type(model).__name__)(model)


def with_prenorm(spec: DecoderSpec) -> DecoderSpec:
    return replace(spec, prenorm=True)
