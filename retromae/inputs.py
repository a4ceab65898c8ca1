"""Checks of what a user hands in that need a look inside a model folder or at a sample of a corpus, made before
any step: the tokenizer's files are there, a length fits the model's position table, and the tokenizer can read
the text (few [UNK]s).

Each failure is one line naming the key or file and what to do; without these checks, a model folder without
tokenizer files crashed pretraining (`IndexError` in the masking) or, in `evaluate`, was scored silently with every
word turned into [UNK] (transformers 5 builds an empty tokenizer), and a length beyond the position table crashed
at step 1 (`The expanded size of the tensor ...`), or not at all when every text happened to be short.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from retromae.config import ConfigError

logger = logging.getLogger(__name__)

# Files that hold a vocabulary: one of them must be in a folder for a tokenizer to be loaded from it (a
# tokenizer_config.json alone gives transformers 5 an empty tokenizer that maps every word to [UNK]): the fast
# tokenizer's tokenizer.json, a vocab.* file (WordPiece, BPE), a SentencePiece *.model (spiece.model, spm.model,
# sentencepiece.bpe.model, tokenizer.model), a *.tiktoken file.
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "spm.model")


def _holds_vocabulary(name: str) -> bool:
    return name == "tokenizer.json" or name.startswith("vocab.") or name.endswith((".model", ".tiktoken"))

# Models whose position ids start after the padding index (RoBERTa's convention): their table has
# max_position_embeddings rows but holds max_position_embeddings - padding_idx - 1 positions (514 rows: 512).
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "data2vec-text", "longformer"}

UNKNOWN_WARNING = 0.05  # share of [UNK] tokens in a corpus sample above which the run is warned
SAMPLE_TEXTS = 1000  # texts tokenized to measure that share


def check_tokenizer_files(name: str, what: str) -> None:
    """A local model (or tokenizer) folder must hold a vocabulary file; hub ids are checked when they load."""
    from retromae.modeling import resolve_model_path

    path = resolve_model_path(name)
    if not os.path.isdir(path):
        return
    if any(_holds_vocabulary(f) and os.path.isfile(os.path.join(path, f)) for f in os.listdir(path)):
        return
    raise ConfigError(f"{what}={name!r}: the folder {path} holds no tokenizer ({', '.join(VOCABULARY_FILES[:3])} "
                      "...); save the tokenizer there (tokenizer.save_pretrained), or name the one it was trained "
                      "with" + (" in model.tokenizer" if what.startswith("model.") else ""))


def position_limit(config) -> int | None:
    """Tokens the model can read at once (its position table), from its Hugging Face config; None if unknown."""
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return None
    if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
        positions -= (getattr(config, "pad_token_id", None) or 1) + 1
    return int(positions)


def model_position_limit(name: str, revision: str | None = None, trust_remote_code: bool = False,
                         what: str = "model.name_or_path") -> int | None:
    """`position_limit` of a model by name (its config alone is read: a small file)."""
    from transformers import AutoConfig

    from retromae.modeling import from_pretrained

    kwargs = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    return position_limit(from_pretrained(AutoConfig, name, what, **kwargs))


def check_lengths(lengths: dict[str, int | None], limit: int | None, model: str) -> None:
    """Every given length (by the key that set it) within the model's position limit."""
    if limit is None:
        return
    for key, value in lengths.items():
        if value is not None and value > limit:
            raise ConfigError(f"{key}={value} is more than the {limit} positions of model {model!r} (its position "
                              f"table); set {key} to {limit} or less")


def unknown_share(tokenizer, texts: Iterable[str]) -> tuple[float, int]:
    """(share of [UNK] among the tokens of `texts`, number of texts), special tokens not counted."""
    texts = [t for t in texts if t]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not texts:
        return 0.0, len(texts)
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=512)["input_ids"]
    total = sum(len(row) for row in ids)
    unknown = sum(row.count(unk) for row in ids)
    return (unknown / total if total else 0.0), len(texts)


def warn_if_unreadable(tokenizer, texts: Iterable[str], where: str) -> float:
    """Warn (once, one line) when more than UNKNOWN_WARNING of a sample's tokens are [UNK]: the tokenizer's
    vocabulary does not cover the text (another script or language), and a model learns nothing from [UNK]s and
    retrieves by them no better. Returns the share measured."""
    share, count = unknown_share(tokenizer, texts)
    if share > UNKNOWN_WARNING:
        logger.warning("%s: %.1f%% of the tokens of %d sampled texts are %s for this tokenizer: its vocabulary does "
                       "not cover this text (another language or script?); use a tokenizer (model) that covers it",
                       where, 100 * share, count, tokenizer.unk_token)
    return share
