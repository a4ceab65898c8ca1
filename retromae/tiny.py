"""Tiny random models built on the spot, for tests, benchmarks and checks that exercise data structures and code
paths rather than a model's quality: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path


def make_tiny_model(path: str | Path, texts: list[str], vocab_size: int = 700, hidden: int = 32, layers: int = 2,
                    max_positions: int = 128, heads: int = 2) -> Path:
    """A WordPiece tokenizer trained on `texts` and a randomly initialised BertForMaskedLM, saved to `path`."""
    import transformers
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.processors import BertProcessing
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    path = Path(path)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1)
    backend = wordpiece._tokenizer
    backend.post_processor = BertProcessing(
        ("[SEP]", backend.token_to_id("[SEP]")), ("[CLS]", backend.token_to_id("[CLS]"))
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
        model_max_length=max_positions,
    )
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
    )
    transformers.set_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    return path
