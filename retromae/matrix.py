"""Every objective on every encoder family: one cell = a tiny random model of the family, 2 steps of `retromae
pretrain` (the real run: config, example cache, trainer, export), the export loaded with `AutoModel` and
`SentenceTransformer`, and `retromae evaluate`'s encoder compared with sentence-transformers' on the same texts.

`scripts/architectures.py` prints the whole matrix (and writes docs/architectures.md); the tests run every cell.
A cell ends in one of three ways: `ok`; `refused` (one line, said before any model loads: the objective needs
something the family lacks); or `failed` (a traceback, or a cell that was accepted and then crashed or encoded
differently from sentence-transformers).
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from retromae.tiny import FAMILIES

# The 15 objectives (RetroMAE's PMI decoder and MAE-LM encoder side count as their own), with the settings that fit
# a tiny model (2 layers of 32) and short texts.
OBJECTIVES: dict[str, dict] = {
    "mlm": {"name": "mlm"},
    "retromae": {"name": "retromae"},
    "retromae-pmi": {"name": "retromae", "decoder_masking": "pmi"},
    "retromae-remove": {"name": "retromae", "encoder_masking": "remove", "removal_decoder_layers": 1},
    "dupmae": {"name": "dupmae"},
    "costa": {"name": "costa", "span_lengths": [[1, 3], [4, 8]], "spans_per_granularity": 2},
    "bow": {"name": "bow"},
    "seed": {"name": "seed", "decoder_layers": 2},
    "cotmae": {"name": "cotmae", "max_span_tokens": 24, "min_span_tokens": 2},
    "tsdae": {"name": "tsdae"},
    "maelm": {"name": "maelm", "decoder_layers": 1},
    "condenser": {"name": "condenser", "skip_from": 1, "head_layers": 1},
    "cocondenser": {"name": "cocondenser", "skip_from": 1, "head_layers": 1, "span_tokens": 12},
    "starbucks": {"name": "starbucks", "pairs": [[1, 16], [2, 32]]},
    "lexmae": {"name": "lexmae"},
}
ARCHITECTURES = FAMILIES  # bert, electra, gte, nomic_bert, distilbert, mpnet, roberta, xlm-roberta, deberta ...


@dataclass
class Cell:
    family: str
    objective: str
    status: str  # ok | refused | failed
    detail: str = ""  # the refusal's line, or the failure's last traceback lines
    seconds: float = 0.0


def tiny_family_model(folder: Path, family: str, texts: list[str]) -> Path:
    """A tiny random model of `family` (2 layers of 32) in `folder`, built once."""
    from retromae.tiny import make_tiny_model

    if not (folder / "config.json").is_file():
        make_tiny_model(folder, texts, vocab_size=400, hidden=32, layers=2, heads=2, max_positions=128,
                        family=family)
    return folder


def cell_config(model_dir: Path, corpus: Path, work: Path, objective: str):
    from retromae.pretrain import load_config

    settings = dict(OBJECTIVES[objective])
    overrides = {
        "model.name_or_path": str(model_dir), "model.dropout": 0.0, "data.corpus": [str(corpus)],
        "data.max_len": 96 if objective == "cotmae" else 48, "data.cut": "document" if objective == "cotmae" else "passage",
        "data.cache_dir": str(work.parent / "cache"), "train.output_dir": str(work), "train.per_device_batch_size": 4,
        "train.max_steps": 2, "train.mixed_precision": "no", "train.report_to": "none", "train.logging_steps": 1,
        "train.cpu": True, "train.overwrite": True,
    }
    overrides.update({f"objective.{k}": v for k, v in settings.items()})
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def encodings_agree(model_dir: Path, texts: list[str]) -> str | None:
    """None when `retromae evaluate`'s encoder gives what SentenceTransformer(model_dir).encode_query / _document
    give (and AutoModel loads the export), else what differs."""
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from retromae.modeling import quiet_loading
    from retromae.retrieval.encoder import EncodeConfig, TextEncoder

    with quiet_loading():
        AutoModel.from_pretrained(model_dir)
        st = SentenceTransformer(str(model_dir), device="cpu")
    ours = TextEncoder(str(model_dir), EncodeConfig(precision="no", batch_size=4, token_cache=False), device="cpu")
    for kind, theirs in (("query", st.encode_query(texts)), ("passage", st.encode_document(texts))):
        mine = ours.encode(texts, kind, show_progress=False)
        if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=1e-4, rtol=1e-4):
            return f"{kind} vectors differ from sentence-transformers' (max |diff| {np.abs(mine - theirs).max():.2e})"
    return None


def run_cell(family: str, objective: str, root: Path, corpus: Path, texts: list[str]) -> Cell:
    """One cell of the matrix, in this process; `root` holds the family's model and the cell's run folder."""
    from retromae.config import ConfigError
    from retromae.pretrain import preflight, run

    start = time.perf_counter()
    model_dir = tiny_family_model(root / family / "model", family, texts)
    cfg = cell_config(model_dir, corpus, root / family / objective, objective)
    try:
        preflight(cfg)
    except ConfigError as err:
        return Cell(family, objective, "refused", str(err), time.perf_counter() - start)
    try:
        result = run(cfg)
        if result["steps"] != 2 or not result["model_dir"]:
            raise RuntimeError(f"ran {result['steps']} steps, export {result['model_dir']}")
        problem = encodings_agree(Path(result["model_dir"]), texts[:5])
        if problem:
            return Cell(family, objective, "failed", problem, time.perf_counter() - start)
    except Exception:  # noqa: BLE001  (a matrix reports every failure, whatever it is)
        lines = traceback.format_exc().strip().splitlines()
        return Cell(family, objective, "failed", " | ".join(lines[-3:]), time.perf_counter() - start)
    return Cell(family, objective, "ok", "", time.perf_counter() - start)


def corpus_texts(limit: int = 160) -> list[str]:
    """Short texts (standard-library docstrings, several sentences each) for the tiny tokenizers and corpora."""
    from retromae.demo import docstring_corpus

    return [d["text"] for d in docstring_corpus(limit=limit)]


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path
