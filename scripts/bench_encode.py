"""Encoding throughput: ours next to sentence-transformers' `encode`, same model, same passages, same batch size.

Measured alternately, round by round, in one run, on 2,000 NFCorpus passages (title + " " + text, max length 256;
standard-library docstrings when ../shared is absent) with all-MiniLM-L6-v2 (mean pooling, normalised):

- st:            `SentenceTransformer.encode` at its default precision (fp32);
- ours-fp32:     our encoder at fp32 (length-sorted batches, dynamic padding, inference_mode);
- ours-compiled: the same with `torch.compile(dynamic=True)`, timed after its one-time compilation;
- ours-default:  our encoder at its default precision (`auto`: bf16 autocast where the hardware has it);
- ours-default-cached: the same, the passages read as a collection whose token ids are cached (tokenized once, in
                 the warm-up; a study, dev selection or a suite of checkpoints encode the same corpus again and again).

Printed: (a) ours-fp32 / st and ours-compiled / st at the same precision; (b) ours-default / st, each side at
its default; (c) ours-default-cached / st. The padding share of our batches bounds what sequence packing (no
padding at all) could add. With --check-ndcg: NFCorpus test nDCG@10 at our default precision next to fp32.
Last line: ratio=<(c)>.

Usage: python scripts/bench_encode.py [--passages 2000] [--rounds 2] [--batch-size 32] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retromae.demo import docstring_corpus, minilm_path  # noqa: E402
from retromae.retrieval.encoder import EncodeConfig, TextEncoder  # noqa: E402

NFCORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "beir" / "nfcorpus"


def cached_passages(texts: list[str], folder: Path):
    """The same passages as a collection's (a corpus.jsonl written here), which the token cache can key."""
    from retromae.retrieval.collection import load_collection
    from retromae.retrieval.encoder import Window

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n"
                                                 for i, t in enumerate(texts)))
    _, lazy = load_collection(folder / "corpus.jsonl").passages(" ")
    return Window(lazy, 0, len(texts))


def passages(n: int, nfcorpus: Path) -> tuple[list[str], str]:
    if (nfcorpus / "corpus.jsonl").is_file():
        docs = [json.loads(line) for line in (nfcorpus / "corpus.jsonl").open()][:n]
        return [(d["title"] + " " + d["text"]).strip() for d in docs], "NFCorpus"
    return [d["title"] + " " + d["text"] for d in docstring_corpus(limit=n)], "standard-library docstrings"


def padding_share(encoder: TextEncoder, texts: list[str], batch: int) -> float:
    """Padding in our batches, which are sorted by character length (as the encoder does)."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    tokens = encoder.tokenizer([texts[i] for i in order], truncation=True, max_length=256)["input_ids"]
    lengths = [len(x) for x in tokens]
    padded = sum(max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    return 1 - sum(lengths) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument("--check-ndcg", action="store_true", help="NFCorpus nDCG@10: default precision vs fp32")
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from its package)")
    parser.add_argument("--nfcorpus", default=str(NFCORPUS), help="NFCorpus folder (BEIR layout)")
    args = parser.parse_args()
    nfcorpus = Path(args.nfcorpus)

    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.logging.set_verbosity_error()
    texts, source = passages(args.passages, nfcorpus)
    model = args.model or minilm_path()
    st = SentenceTransformer(model, device=args.device)
    st.float()  # its default precision, fp32, even for a checkpoint stored in fp16
    st.max_seq_length = 256

    def ours(precision: str, compile: bool = False) -> TextEncoder:
        cfg = EncodeConfig(passage_max_len=256, batch_size=args.batch_size, precision=precision, compile=compile)
        return TextEncoder(model, cfg, device=args.device)

    contenders = {"st": None, "ours-fp32": ours("no")}
    default = ours("auto")
    if default.precision != "no":
        contenders["ours-default"] = default
    contenders["ours-default-cached"] = ours("auto")  # tokens from the warm token cache (the warm-up fills it)
    import tempfile

    os.environ.setdefault("RETROMAE_CACHE", tempfile.mkdtemp(prefix="retromae-bench-encode-"))
    cached_texts = cached_passages(texts, Path(os.environ["RETROMAE_CACHE"]) / "corpus")
    if not args.no_compile:
        contenders["ours-compiled"] = ours("no", compile=True)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def run(name: str) -> np.ndarray:
        if name == "st":
            return st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
        if name == "ours-default-cached":
            return contenders[name].encode(cached_texts, "passage", show_progress=False)
        return contenders[name].encode(texts, "passage", show_progress=False)

    reference = run("st")  # warm-up, and the reference vectors
    warm = {}
    for name in contenders:
        if name != "st":
            t = time.perf_counter()
            vectors = run(name)
            warm[name] = time.perf_counter() - t
            gap = np.abs(vectors - reference).max()
            print(f"{name}: max |difference| from st vectors {gap:.2e} (warm-up {warm[name]:.1f} s)", flush=True)

    rates = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name in contenders:
            sync()
            t = time.perf_counter()
            run(name)
            sync()
            rates[name].append(len(texts) / (time.perf_counter() - t))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()), flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{len(texts)} {source} passages, all-MiniLM-L6-v2, batch {args.batch_size}, device {args.device}, "
          f"{torch.get_num_threads()} threads; our default precision here: {default.precision}")
    print(f"{'contender':<15}{'passages/s':>12}{'vs st':>8}")
    for k, v in med.items():
        print(f"{k:<15}{v:>12.1f}{v / med['st']:>8.2f}")
    print(f"padding share of our length-sorted batches: {100 * padding_share(default, texts, args.batch_size):.1f}% "
          "(the most that packing sequences without padding could save)")
    if "ours-compiled" in warm:
        cost = warm["ours-compiled"] - len(texts) / med["ours-compiled"]
        print(f"torch.compile's one-time cost: about {cost:.0f} s (its warm-up run minus one compiled encode)")
    a = med["ours-fp32"] / med["st"]
    b = med.get("ours-default", med["ours-fp32"]) / med["st"]
    print(f"(a) same precision (fp32): {a:.2f}" + (f"; compiled {med['ours-compiled'] / med['st']:.2f}"
                                                   if "ours-compiled" in med else ""))
    note = "" if default.precision != "no" else " (no bf16 hardware here: our default is fp32, so (b) = (a))"
    print(f"(b) each side's default: {b:.2f}{note}")
    c = med["ours-default-cached"] / med["st"]
    print(f"(c) each side's default, ours with the corpus tokenized once (warm token cache): {c:.2f}")
    if args.check_ndcg and default.precision != "no" and nfcorpus.is_dir():
        from retromae.retrieval.evaluate import evaluate_model

        for name, enc in (("fp32", contenders["ours-fp32"]), (default.precision, default)):
            result = evaluate_model(model, str(nfcorpus), "test", enc.cfg, encoder=enc)
            print(f"NFCorpus test nDCG@10 at {name}: {result['ndcg@10']:.4f}")
    print(f"ratio={c:.3f}")


if __name__ == "__main__":
    main()
