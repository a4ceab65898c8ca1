"""Tiny random models built on the spot, for tests, benchmarks and checks that exercise data structures and code
paths rather than a model's quality: nothing is downloaded.

Every encoder family the toolkit knows (`retromae.architectures`) can be built here with a tokenizer of the kind
its checkpoints ship: WordPiece with [CLS] / [SEP] (BERT, DistilBERT, ELECTRA, GTE, NomicBERT), WordPiece with
<s> / </s> (MPNet), byte-level BPE with <s> / </s> (RoBERTa) or [CLS] / [SEP] (ModernBERT), a Llama-style BPE whose
padding token is its end-of-text token (EuroBERT), and SentencePiece unigram vocabularies (XLM-RoBERTa <s> / </s>,
DeBERTa-v3 [CLS] / [SEP]). Tokenizers declare the model inputs their family takes (no `token_type_ids` for
ModernBERT, EuroBERT, DistilBERT, MPNet ...), as the real ones do, so sentence-transformers feeds them correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TokenizerKind:
    model: str  # wordpiece | bpe | unigram
    first: str  # token put before a text (CLS / BOS)
    last: str  # token put after it (SEP / EOS)
    pad: str
    mask: str
    unk: str
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")  # model_input_names
    lowercase: bool = False


BERT_TOKENS = TokenizerKind("wordpiece", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]",
                            ("input_ids", "token_type_ids", "attention_mask"), lowercase=True)
TOKENIZERS = {
    "bert": BERT_TOKENS,
    "electra": BERT_TOKENS,
    "gte": BERT_TOKENS,
    "nomic_bert": BERT_TOKENS,
    "distilbert": TokenizerKind("wordpiece", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", lowercase=True),
    "mpnet": TokenizerKind("wordpiece", "<s>", "</s>", "<pad>", "<mask>", "[UNK]", lowercase=True),
    "roberta": TokenizerKind("bpe", "<s>", "</s>", "<pad>", "<mask>", "<unk>"),
    "xlm-roberta": TokenizerKind("unigram", "<s>", "</s>", "<pad>", "<mask>", "<unk>"),
    "deberta-v2": TokenizerKind("unigram", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"),
    "deberta-v3": TokenizerKind("unigram", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"),
    "modernbert": TokenizerKind("bpe", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"),
    # EuroBERT pads with its end-of-text token (pad id = eos id), as its checkpoints do
    "eurobert": TokenizerKind("bpe", "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", "<|mask|>", "<unk>"),
}
FAMILIES = tuple(TOKENIZERS)


def make_tokenizer(kind: TokenizerKind, texts: list[str], vocab_size: int, max_positions: int):
    """A fast tokenizer of `kind` trained on `texts`, wrapping each text in kind.first ... kind.last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([kind.pad, kind.unk, kind.first, kind.last, kind.mask]))
    if kind.model == "wordpiece":
        from tokenizers import BertWordPieceTokenizer

        wordpiece = BertWordPieceTokenizer(lowercase=kind.lowercase, unk_token=kind.unk)
        wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=specials)
        backend = wordpiece._tokenizer
    elif kind.model == "bpe":
        backend = Tokenizer(models.BPE(unk_token=kind.unk))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=kind.unk)
    if kind.model != "wordpiece":
        backend.train_from_iterator(texts, trainer)
    first, last = backend.token_to_id(kind.first), backend.token_to_id(kind.last)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{kind.first} $A {kind.last}", pair=f"{kind.first} $A {kind.last} $B {kind.last}",
        special_tokens=list({kind.first: first, kind.last: last}.items()))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=kind.unk, pad_token=kind.pad, mask_token=kind.mask,
        cls_token=kind.first, sep_token=kind.last, bos_token=kind.first, eos_token=kind.last,
        model_max_length=max_positions, model_input_names=list(kind.inputs))


def tiny_config(family: str, tokenizer, hidden: int, layers: int, heads: int, max_positions: int, **settings):
    """A small configuration of `family` sized to the tokenizer, with its special token ids; `settings` override the
    family's own fields (e.g. ModernBERT's local_attention)."""
    return _family_config(family, tokenizer, hidden, layers, heads, max_positions, settings)


def _family_config(family: str, tokenizer, hidden: int, layers: int, heads: int, max_positions: int, settings: dict):
    import transformers as tf

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
               eos_token_id=tokenizer.sep_token_id)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=hidden * 2, max_position_embeddings=max_positions, **ids)
    if family == "bert":
        return tf.BertConfig(**common, **settings)
    if family == "roberta":  # positions start after the padding index
        return tf.RobertaConfig(**{**common, "max_position_embeddings": max_positions + 2, **settings})
    if family == "xlm-roberta":
        return tf.XLMRobertaConfig(**{**common, "max_position_embeddings": max_positions + 2, **settings})
    if family == "mpnet":
        return tf.MPNetConfig(**{**common, "max_position_embeddings": max_positions + 2, **settings})
    if family == "electra":  # an embedding narrower than the layers, projected up (ELECTRA's small models)
        return tf.ElectraConfig(**{**common, "embedding_size": hidden // 2, **settings})
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=len(tokenizer), dim=hidden, n_layers=layers, n_heads=heads,
                                   hidden_dim=hidden * 2, max_position_embeddings=max_positions,
                                   pad_token_id=tokenizer.pad_token_id, **settings)
    if family in ("deberta-v2", "deberta-v3"):
        v2 = family == "deberta-v2"  # v2-xlarge layout: a convolution beside layer 0
        return tf.DebertaV2Config(**{**common, "relative_attention": True, "position_biased_input": False,
                                     "pos_att_type": ["p2c", "c2p"], "position_buckets": 16,
                                     "max_relative_positions": -1, "norm_rel_ebd": "layer_norm", "share_att_key": True,
                                     "type_vocab_size": 0, "conv_kernel_size": 3 if v2 else 0, "conv_act": "gelu",
                                     **settings})
    if family == "modernbert":  # every third layer global, the others a sliding window (here 16 tokens)
        return tf.ModernBertConfig(**{**common, "cls_token_id": tokenizer.cls_token_id,
                                      "sep_token_id": tokenizer.sep_token_id, "local_attention": 16,
                                      "global_attn_every_n_layers": 2, **settings})
    if family == "eurobert":
        return tf.EuroBertConfig(**{**common, "mask_token_id": tokenizer.mask_token_id, "num_key_value_heads": heads,
                                    **settings})
    if family == "gte":
        return tf.GteConfig(**common, **settings)
    if family == "nomic_bert":
        return tf.NomicBertConfig(**common, **settings)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def make_tiny_model(path: str | Path, texts: list[str], vocab_size: int = 700, hidden: int = 32, layers: int = 2,
                    max_positions: int = 128, heads: int = 2, family: str = "bert") -> Path:
    """A tokenizer of the family's kind trained on `texts` and a randomly initialised masked-LM model of `family`,
    saved to `path`."""
    if family not in TOKENIZERS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    tokenizer = make_tokenizer(TOKENIZERS[family], texts, vocab_size, max_positions)
    return save_random_model(path, tokenizer, family, hidden, layers, heads, max_positions)


def save_random_model(path: str | Path, tokenizer, family: str, hidden: int, layers: int, heads: int,
                      max_positions: int, **settings) -> Path:
    """`tokenizer` and a randomly initialised masked-LM model of `family` sized to it, saved to `path` (benchmarks
    put a real tokenizer under another family's architecture)."""
    import transformers
    from transformers import AutoModelForMaskedLM

    from retromae.architectures import attention_for

    path = Path(path)
    tokenizer.save_pretrained(path)
    config = tiny_config(family, tokenizer, hidden, layers, heads, max_positions, **settings)
    transformers.set_seed(0)
    model = AutoModelForMaskedLM.from_config(config, attn_implementation=attention_for(config))
    model.save_pretrained(path)
    return path
