"""Peak memory of one training step of every pretraining objective, next to plain MLM, on the same model, batch and
length, in one run.

    python scripts/bench_memory.py [--batch 4] [--length 512] [--objectives mlm retromae ...]
    python scripts/bench_memory.py --arch modernbert --size small --batch 1 --length 2048 4096 8192 \
        --objectives mlm retromae dupmae

With --arch, the model is a random one of that encoder family (retromae.tiny.FAMILIES) with all-MiniLM-L6-v2's
BERT vocabulary, at --size base (12 layers of 768) or small (4 layers of 256, 4 heads), the family's usual settings
(ModernBERT: a global layer every third, a 128-token window in the others) and positions up to the longest length.
Several --length values give one table per length; the last line is the largest ratio over all of them.

Each objective runs in a fresh process (so that one's peak cannot hide another's): a BERT-base-shaped model
(12 layers, 768 wide, BERT's 30,522-word vocabulary; random weights from a config, nothing downloaded), a batch of
`--batch` texts of `--length` tokens of real text, the objective's default settings, AdamW, the precision `auto`
picks, two training steps (the first allocates the optimizer's state). Peak = the process's peak resident memory
minus its memory before the model was built: weights, gradients, optimizer state, activations and losses, what a
GPU would have to hold. Prints a table and, last, ratio=<largest objective peak / MLM peak>.

Measured on this project's 2-core Intel Xeon (AMX, so bf16 autocast), batch 4 x 512 (`python scripts/bench_memory.py`,
2026-11-26; table in docs/benchmarks.md). Projection to the papers' batch, 32 x 512 per GPU in bf16 on BERT-base:
the fixed part (fp32 weights, gradients and AdamW state: 16 bytes x 110M parameters = 1.8 GB) stays, the rest
grows with the batch (x 8 from 4 texts). Activations of BERT-base are about 0.3 MB per token in bf16 with a fused
attention kernel (sdpa), so MLM needs about 1.8 + 16 384 x 0.3 MB ~ 7 GB; the objectives here are within 1.5x of
MLM on this measure, so every one fits a 40 GB GPU at 32 x 512, and an 80 GB one with room for 64 per GPU.
COSTA stays within that bound only because its spans are encoded a chunk at a time under activation
checkpointing (objective.span_checkpointing, on by default; off, its spans hold ~2x the text's activations).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ["mlm", "retromae", "dupmae", "costa", "bow", "bow-prediction", "lexmae"]
VARIANTS = {"bow-prediction": {"name": "bow", "views": 1, "decoder": "mlm_head", "contrast_weight": 0.0}}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def text_batch(tokenizer, batch: int, length: int):
    """`batch` texts of exactly `length` tokens cut from real text (the local BEIR corpora, else docstrings)."""
    from retromae.demo import docstring_corpus

    beir = ROOT.parent / "shared" / "data" / "beir" / "nfcorpus" / "corpus.jsonl"
    texts = ([json.loads(line)["text"] for line in beir.open()] if beir.is_file()
             else [d["text"] for d in docstring_corpus()])
    ids = [t for ids in tokenizer(texts[:2000], add_special_tokens=False)["input_ids"] for t in ids]
    body = length - 2
    return [[tokenizer.cls_token_id] + ids[i * body : (i + 1) * body] + [tokenizer.sep_token_id]
            for i in range(batch)], [ids[i * length * 2 : (i + 1) * length * 2] for i in range(batch)]


SIZES = {"base": (768, 12, 12), "small": (256, 4, 4)}  # hidden, layers, heads
FAMILY_SETTINGS = {"modernbert": {"local_attention": 128, "global_attn_every_n_layers": 3},
                   "deberta-v3": {"position_buckets": 256}}


def build_model(arch: str, size: str, tokenizer, length: int):
    """A random masked-LM model: BERT-base as before, or a model of family `arch` at `size`."""
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    from retromae.architectures import attention_for
    from retromae.tiny import tiny_config

    if arch == "bert" and size == "base":
        return BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max(512, length)))
    hidden, layers, heads = SIZES[size]
    config = tiny_config(arch, tokenizer, hidden, layers, heads, max(512, length), **FAMILY_SETTINGS.get(arch, {}))
    config.intermediate_size = hidden * 3 // 2 if arch == "modernbert" else hidden * 4  # ModernBERT-base: 1152 of 768
    return AutoModelForMaskedLM.from_config(config, attn_implementation=attention_for(config))


def child(name: str, batch_size: int, length: int, steps: int = 2, tokenizer_path: str | None = None,
          arch: str = "bert", size: str = "base") -> None:
    import torch

    from retromae.data.batches import collate
    from retromae.demo import minilm_path
    from retromae.objectives import build_objective_config, objective_class
    from retromae.trainer import TrainConfig, Trainer, make_accelerator
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or minilm_path())
    blocks, documents = text_batch(tokenizer, batch_size, length)
    before = rss_mb()
    settings = VARIANTS.get(name, {"name": name})
    cls = objective_class(settings["name"])
    objective = cls(build_model(arch, size, tokenizer, length), tokenizer, build_objective_config(settings))
    if getattr(cls, "example_format", "block") == "document":
        sentence_lengths = [[32] * (len(d) // 32) for d in documents]
        micro = collate([d[: sum(s)] for d, s in zip(documents, sentence_lengths)], list(range(batch_size)), 0, 1,
                        tokenizer.pad_token_id, 8, None, sentence_lengths)
    else:
        micro = collate(blocks, list(range(batch_size)), 0, 1, tokenizer.pad_token_id, 8)
    if hasattr(objective, "attach_corpus_statistics"):
        objective.attach_corpus_statistics(torch.ones(len(tokenizer), dtype=torch.long), len(tokenizer))
    cfg = TrainConfig(output_dir="/tmp/unused", max_steps=steps, report_to="none", per_device_batch_size=batch_size)
    accelerator = make_accelerator(cfg)
    trainer = Trainer(objective, None, cfg, accelerator)
    cuda = accelerator.device.type == "cuda"
    started = time.perf_counter()
    for step in range(steps):
        if step == 1:  # the first step allocates the optimizer state and warms kernels up
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        trainer.accumulate_gradients(trainer.prepare_batches([micro]))
        trainer.optimizer_step()
    if cuda:
        torch.cuda.synchronize()
        peak, before = torch.cuda.max_memory_allocated() / 2**20, 0.0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - started
    print(json.dumps({"objective": name, "length": length, "peak_mb": peak - before, "seconds": seconds,
                      "samples_per_second": batch_size * max(1, steps - 1) / seconds,
                      "precision": accelerator.mixed_precision, "device": str(accelerator.device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, nargs="+", default=[512])
    parser.add_argument("--objectives", nargs="+", default=None, help="default: every registered objective")
    parser.add_argument("--steps", type=int, default=2, help="training steps (samples/s over all but the first)")
    parser.add_argument("--tokenizer", default=None, help="BERT-vocabulary tokenizer folder (default: all-MiniLM-L6-v2's)")
    parser.add_argument("--arch", default="bert", help="encoder family (retromae.tiny.FAMILIES)")
    parser.add_argument("--size", default="base", choices=sorted(SIZES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch, args.length[0], args.steps, args.tokenizer, args.arch, args.size)
        return
    names = args.objectives or all_objectives()
    worst = 0.0
    for length in args.length:
        rows = []
        for name in names:
            done = subprocess.run([sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--length",
                                   str(length), "--steps", str(args.steps), "--arch", args.arch, "--size", args.size]
                                  + (["--tokenizer", args.tokenizer] if args.tokenizer else []),
                                  capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                print(f"{name} at {length}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            rows.append(json.loads(lines[-1]))
            print(f"{name} at {length}: peak {rows[-1]['peak_mb'] / 1024:.2f} GB, "
                  f"{rows[-1]['samples_per_second']:.2f} samples/s", flush=True)
        mlm = next(r["peak_mb"] for r in rows if r["objective"] == "mlm")
        shape = "BERT-base shape" if (args.arch, args.size) == ("bert", "base") else f"{args.arch} ({args.size})"
        print(f"\n{shape}, batch {args.batch} x {length}, precision {rows[0]['precision']}, on "
              f"{rows[0]['device']}: peak memory of a training step (weights, gradients, AdamW state, activations):\n")
        print("| objective | peak GB | / MLM | samples/s |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['objective']} | {r['peak_mb'] / 1024:.2f} | {r['peak_mb'] / mlm:.2f} | "
                  f"{r['samples_per_second']:.2f} |")
        worst = max(worst, max(r["peak_mb"] for r in rows) / mlm)
    print(f"ratio={worst:.2f}")


def all_objectives() -> list[str]:
    from retromae.objectives.base import _REGISTRY, objective_class

    objective_class("mlm")
    names = ["mlm"] + sorted(n for n in _REGISTRY if n != "mlm")
    return names + ["bow-prediction"]


if __name__ == "__main__":
    main()
