"""BM25, the row every retrieval table needs: `retromae evaluate --model bm25` (also in suites, the study and the
demo), computed with `bm25s`.

Settings (config fields of `BM25Config`): Lucene's BM25 variant with k1 = 0.9 and b = 0.4, Anserini's and
Pyserini's defaults for their BEIR and MS MARCO baselines; lower-cased words of two or more letters, English stop
words removed, English Snowball stemming (PyStemmer). Document text is title + " " + text, as for dense models.
Runs on the main process (the others of a launch skip it): BM25 on a BEIR collection takes seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

BM25_NAMES = ("bm25",)


@dataclass
class BM25Config:
    k1: float = 0.9  # term-frequency saturation (Anserini's BEIR / MS MARCO default)
    b: float = 0.4  # length normalisation (Anserini's default)
    method: str = "lucene"  # bm25s scoring variant: lucene | robertson | atire | bm25l | bm25+
    stemmer: str | None = "english"  # Snowball stemmer language (PyStemmer); null: none
    stopwords: str | None = "en"  # stop-word list removed before indexing; null: none


def is_bm25(model: str) -> bool:
    return str(model).lower() in BM25_NAMES


def _bm25s():
    """The bm25s module, its logger at WARNING: bm25s sets it to DEBUG when imported, and its "Building index from
    IDs objects" line reached the user's screen."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def _tokenize(texts, cfg: BM25Config, stemmer):
    bm25s = _bm25s()

    return bm25s.tokenize(list(texts), stopwords=cfg.stopwords, stemmer=stemmer, show_progress=False)


def bm25_search(documents, queries: list[str], k: int, cfg: BM25Config | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, document positions), each (Q, k), best first."""
    bm25s = _bm25s()

    cfg = cfg or BM25Config()
    stemmer = None
    if cfg.stemmer:
        import Stemmer

        stemmer = Stemmer.Stemmer(cfg.stemmer)
    index = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
    index.index(_tokenize(documents, cfg, stemmer), show_progress=False)
    k = min(k, len(documents))
    positions, scores = index.retrieve(_tokenize(queries, cfg, stemmer), k=k, show_progress=False)
    return np.asarray(scores, dtype=np.float32), np.asarray(positions, dtype=np.int64)
