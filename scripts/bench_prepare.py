"""Example-cache preparation throughput with 1 and with 2 processes, on the same corpus, in one run.

    python scripts/bench_prepare.py [--mb 24] [--rounds 2] [--max-len 512] [--cut packed]

The corpus is real text: the local BEIR corpora (../shared/data/beir; else the standard library's docstrings),
repeated to about `--mb` MB and cut into 1 MB shards, tokenized with all-MiniLM-L6-v2's tokenizer (BERT's uncased
WordPiece vocabulary, as BERT-base recipes use) and packed into `--max-len` token blocks: the Wikipedia recipe's
work. Tokenizer threads are pinned to one (TOKENIZERS_PARALLELISM=false) so that the ratio shows how preparation
scales with processes, not with the tokenizer's own threads. Each round builds the cache afresh with 1 process,
then with 2 (`data.num_proc`); the medians are reported. Last line: ratio=<MB/s with 2 processes / with 1>.

Projection (measured here on a 2-core Intel Xeon with AMX, 2026-11-26; `python scripts/bench_prepare.py`): one
process prepares about 5 MB/s of text, and the work splits into independent shards, so a 16-core node running
`retromae prepare pretrain/retromae_bert_base_wiki_bookcorpus.yaml data.num_proc=16` (or 8 GPUs' training processes
with data.num_proc=2 each) prepares Wikipedia + BookCorpus (about 20 GB of text) in about
20 000 MB / (5 MB/s x 16 x 0.85 scaling) ~ 5 min of tokenizing, plus reading the hub's Arrow files once; the
figure scales with the per-process rate this script prints on the machine at hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEIR = ROOT.parent / "shared" / "data" / "beir"


def make_corpus(path: Path, megabytes: int) -> None:
    import json

    if BEIR.is_dir():
        text = "".join((BEIR / name / "corpus.jsonl").read_text(encoding="utf-8")
                       for name in ("nfcorpus", "cranfield", "cisi", "medline"))
    else:
        from retromae.demo import docstring_corpus

        text = "".join(json.dumps(d) + "\n" for d in docstring_corpus())
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(max(1, (megabytes << 20) // len(text.encode()))):
            f.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=24, help="corpus size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--cut", default="packed", choices=["passage", "packed", "document"])
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from retromae.data.examples import DataConfig
    from retromae.data.store import plan_shards, prepare_store
    from retromae.demo import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    work = Path(tempfile.mkdtemp(prefix="retromae-bench-prepare-"))
    try:
        corpus = work / "corpus.jsonl"
        make_corpus(corpus, args.mb)
        size_mb = corpus.stat().st_size / 2**20
        base = DataConfig(corpus=[str(corpus)], cut=args.cut, max_len=args.max_len, shard_mb=1)
        print(f"corpus: {size_mb:.1f} MB of {'BEIR corpora' if BEIR.is_dir() else 'docstrings'}, "
              f"{len(plan_shards(base))} shards, cut {args.cut} at {args.max_len} tokens; CPU: {cpu_name()}")
        rates = {1: [], 2: []}
        for round_ in range(args.rounds):
            for procs in (1, 2):
                cache = work / f"cache-{round_}-{procs}"
                cfg = DataConfig(**{**base.__dict__, "cache_dir": str(cache), "num_proc": procs})
                started = time.perf_counter()
                store = prepare_store(cfg, tokenizer)
                seconds = time.perf_counter() - started
                rates[procs].append(size_mb / seconds)
                print(f"round {round_ + 1}, {procs} process(es): {seconds:.1f} s, {size_mb / seconds:.2f} MB/s, "
                      f"{len(store)} examples", flush=True)
                shutil.rmtree(cache, ignore_errors=True)
        one, two = statistics.median(rates[1]), statistics.median(rates[2])
        print(f"| processes | MB/s (median of {args.rounds}) |\n|---|---:|\n| 1 | {one:.2f} |\n| 2 | {two:.2f} |")
        print(f"ratio={two / one:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
