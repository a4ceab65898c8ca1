"""Write real text one sentence per line, the way BookCorpus stores it, with a blank line between documents:

    python scripts/sentences_per_line.py OUT.txt [--blank-lines]

The text is the local BEIR corpora (../shared/data/beir: NFCorpus, Cranfield, CISI, MEDLINE), else the standard
library's docstrings. Used to check that `data.join_rows` packs such a corpus into full blocks:
    retromae prepare pretrain/bookcorpus_small.yaml data.corpus=[OUT.txt]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def documents() -> list[str]:
    beir = ROOT.parent / "shared" / "data" / "beir"
    if beir.is_dir():
        return [json.loads(line)["text"] for name in ("nfcorpus", "cranfield", "cisi", "medline")
                for line in (beir / name / "corpus.jsonl").open(encoding="utf-8")]
    from retromae.demo import docstring_corpus

    return [d["text"] for d in docstring_corpus()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--blank-lines", action="store_true", help="a blank line after each document")
    args = parser.parse_args()
    from retromae.data.examples import split_sentences
    from retromae.io import atomic_write_text

    lines = []
    for text in documents():
        lines += split_sentences(" ".join(text.split()))
        if args.blank_lines:
            lines.append("")
    atomic_write_text(args.output, "\n".join(lines) + "\n")
    print(f"{sum(1 for line in lines if line)} sentences in {args.output}")


if __name__ == "__main__":
    main()
