"""Every objective on every encoder family this toolkit knows: the matrix of `retromae.matrix`, printed, and written
to docs/architectures.md with --write.

    python scripts/architectures.py [--families modernbert,deberta-v3] [--objectives retromae,tsdae] [--write]

Each cell builds a tiny random model of the family (2 layers of 32, a tokenizer of the family's kind), runs 2 steps of
`retromae pretrain`, loads the export with AutoModel and SentenceTransformer, and checks that `retromae evaluate`
encodes it as sentence-transformers does. ok: all of that; refused: a one-line reason given before any model loads;
failed: a traceback, or a cell that was accepted and then crashed or encoded differently. Last line:
`failed=<number of failed cells>`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARK = {"ok": "✓", "refused": "R", "failed": "✗"}


def main() -> int:
    from retromae.matrix import ARCHITECTURES, OBJECTIVES, corpus_texts, run_cell, write_corpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(ARCHITECTURES))
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--write", action="store_true", help="write docs/architectures.md")
    args = parser.parse_args()
    families, objectives = args.families.split(","), args.objectives.split(",")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RETROMAE_CACHE", tempfile.mkdtemp(prefix="retromae-matrix-cache-"))
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="retromae-matrix-") as tmp:
        root = Path(tmp)
        texts = corpus_texts()
        corpus = write_corpus(root / "corpus.jsonl", texts)
        cells = {}
        for family in families:
            for objective in objectives:
                cell = run_cell(family, objective, root, corpus, texts)
                cells[family, objective] = cell
                print(f"{family:12s} {objective:16s} {cell.status:8s} {cell.seconds:5.1f} s  {cell.detail}", flush=True)
    table = render(cells, families, objectives)
    print("\n" + table)
    failed = sum(c.status == "failed" for c in cells.values())
    refused = sum(c.status == "refused" for c in cells.values())
    if args.write:
        (ROOT / "docs" / "architectures.md").write_text(document(table, cells, time.perf_counter() - started),
                                                        encoding="utf-8")
    print(f"cells={len(cells)} ok={len(cells) - failed - refused} refused={refused}")
    print(f"failed={failed}")
    return 1 if failed else 0


def render(cells: dict, families: list[str], objectives: list[str]) -> str:
    lines = ["| architecture | " + " | ".join(objectives) + " |", "|---|" + "---|" * len(objectives)]
    for family in families:
        lines.append(f"| {family} | " + " | ".join(MARK[cells[family, o].status] for o in objectives) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "this CPU")


def document(table: str, cells: dict, seconds: float) -> str:
    from retromae.architectures import FAMILIES

    notes = [f"- {f} × {o}: {c.status}: {c.detail}" for (f, o), c in cells.items() if c.status != "ok"]
    adapters = "\n".join(f"| {', '.join(cls.model_types)} | `{cls.__name__}` | {cls.positions} | "
                         f"{'pre' if cls.prenorm else 'post'} | {'gated' if cls.glu else 'plain'} | "
                         f"{'packed' if cls.packable else 'hidden by the mask'} | {'yes' if cls.token_types else 'no'} |"
                         for cls in FAMILIES)
    return f"""# Objectives × encoder families

Produced by `python scripts/architectures.py --write` ({len(cells)} cells in {seconds / 60:.1f} minutes on
{cpu_name()}, 2 cores). Each cell: a tiny random model of the family (2 layers of 32,
a tokenizer of the kind its checkpoints ship), 2 steps of `retromae pretrain` with the objective, the export loaded
with `AutoModel` and `SentenceTransformer`, and `retromae evaluate`'s encoder checked against
`SentenceTransformer.encode_query` / `encode_document`. ✓ ok, R refused before any model loads (reason below),
✗ failed. The test suite runs every cell (`tests/test_architectures.py`); fine-tuning and `evaluate` are tested on
every family too.

{table}

{chr(10).join(notes) if notes else "No cell was refused or failed."}

`retromae-pmi` is RetroMAE with `decoder_masking: pmi`; `retromae-remove` is RetroMAE with `encoder_masking: remove`
(MAE-LM's encoder side). DeBERTa-v2 here has v2-xlarge's convolution beside layer 0; DeBERTa-v3 has none.

## How each family is adapted (`retromae/architectures.py`)

| model types | adapter | positions | norm | feed-forward | MAE-LM's removed tokens | token_type_ids |
|---|---|---|---|---|---|---|
{adapters}

Decoders (RetroMAE's, SEED's, CoT-MAE's, MAE-LM's, Condenser's head, TSDAE's cross-attention) take the encoder's
width, heads, norm (LayerNorm or RMSNorm) and its placement, feed-forward form and activation. Positions: where the
encoder has an absolute table, decoders read it with the embeddings (RetroMAE's query stream is h + p_i); where the
encoder is rotary, decoders rotate queries and keys with the encoder's base; where attention is relative (DeBERTa-v3),
decoders are rotary with base 10,000 (our default). Attention: sdpa where the family's transformers class has it,
eager otherwise (DeBERTa, MPNet); `model.attn_implementation` overrides; objectives that run the encoder's own layers
with their own masks (TSDAE, Starbucks) swap a kernel that only knows padding (flash attention) for sdpa in those calls.
"""


if __name__ == "__main__":
    sys.exit(main())
