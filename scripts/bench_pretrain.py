"""Pretraining throughput: our RetroMAE and MLM objectives next to Hugging Face's standard MLM.

Measured side by side in one run, alternating contenders round by round, on the same model (a 6-layer,
384-wide BERT: all-MiniLM-L6-v2's architecture), the same batch (16 x 256 tokens of standard-library
docstrings, cut into full-length blocks), the same precision and the same optimizer (AdamW). Each contender's step
is everything a training step costs: collating the examples, masking, forward, backward, optimizer step.

- ours-retromae: the Trainer's step with the RetroMAE objective (enhanced decoding);
- ours-mlm:      the Trainer's step with our MLM objective;
- hf-mlm:        BertForMaskedLM + DataCollatorForLanguageModeling(whole_word_mask=True, mlm_probability=0.3),
                 what users of transformers run.

Also printed: the share of the RetroMAE step spent preparing the batch (collate + masking on the device).
Last line: ratio=<ours-retromae samples/s / hf-mlm samples/s> (medians over rounds).

Where the time goes (measured on a 2-core AVX2 CPU, fp32, where this ratio came out at 1.08): for a
384-wide model with a 30,522-word vocabulary the vocabulary projection and its log-softmax cost more per
token than the whole 6-layer encoder. hf-mlm computes them at every position and throws 70% away; our
objectives compute them only where there is a label. That is why our MLM runs ~2.6x hf-mlm. RetroMAE then
adds work that is inherent to it: a seventh transformer layer (the decoder, attending over all positions) and
the projection + log-softmax at every ordinary token, since the decoder predicts all of them; that takes it
from our MLM's ~2.6x down to ~1.1x hf-mlm. Masking costs well under 1% of the step (the decoder's per-row
masks are built from counter-based hashes on the device; the reference collator's Python loop took 11-16%).

With --objectives all, every objective of the toolkit runs beside them (DupMAE, COSTA, the bag-of-words decoders,
SEED-Encoder, CoT-MAE, RetroMAE with the PMI decoder or MAE-LM's encoder side, TSDAE, MAE-LM, Condenser,
coCondenser, Starbucks SMAE, LexMAE). CoT-MAE reads each block as a document (its ordinary tokens, sentences ending at '.');
the PMI decoder gets token counts of the benchmark's own texts as its corpus statistics.

With --arch FAMILY (modernbert, deberta-v3, eurobert, gte ...; any of retromae.tiny.FAMILIES), the model is a random
one of that family at the same size (6 layers of 384, 6 heads, all-MiniLM-L6-v2's tokenizer and vocabulary), with the
family's usual settings (ModernBERT: a global layer every third, the others a 128-token window; DeBERTa-v3: 256
relative buckets, no absolute positions), and Hugging Face's MLM is that family's own masked-LM class.

Usage: python scripts/bench_pretrain.py [--rounds 3] [--steps 3] [--precision auto|no|bf16] [--objectives all]
                                        [--arch modernbert]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retromae.data.batches import collate  # noqa: E402
from retromae.demo import docstring_corpus, minilm_path  # noqa: E402
from retromae.hardware import resolve_precision  # noqa: E402
from retromae.objectives import build_objective_config, objective_class  # noqa: E402
from retromae.trainer import TrainConfig, Trainer, make_accelerator  # noqa: E402


def load_features(tokenizer, max_len: int, count: int):
    """`count` texts of standard-library docstrings that tokenize to exactly `max_len` tokens, tokenized once
    (with offsets, which Hugging Face's whole-word collator needs); both sides train on these same ids."""
    records = docstring_corpus()
    stream = [t for ids in tokenizer([r["text"] for r in records], add_special_tokens=False)["input_ids"] for t in ids]
    chunk = max_len + max_len // 4  # decode a little more than needed, then truncate after re-tokenizing
    texts = [tokenizer.decode(stream[i : i + chunk]) for i in range(0, len(stream) - chunk, chunk)]
    features = tokenizer(texts, truncation=True, max_length=max_len, return_offsets_mapping=True,
                         return_special_tokens_mask=True)
    rows = [{k: features[k][i] for k in features} for i in range(len(texts)) if len(features["input_ids"][i]) == max_len]
    if len(rows) < count:
        raise SystemExit(f"only {len(rows)} texts of {max_len} tokens in the corpus")
    return rows[:count]


class _FixedBatches:
    """Stands in for the data source: the Trainer's step is fed explicitly."""

    batches_per_epoch = 1


# Every objective, as its recipe runs it (name -> objective section).
OBJECTIVES = {
    "retromae": {"name": "retromae"},
    "mlm": {"name": "mlm"},
    "dupmae": {"name": "dupmae"},
    "costa": {"name": "costa"},
    "bow-contrastive": {"name": "bow"},
    "bow-prediction": {"name": "bow", "views": 1, "decoder": "mlm_head", "contrast_weight": 0.0},
    "seed": {"name": "seed"},
    "cotmae": {"name": "cotmae"},
    "retromae-pmi": {"name": "retromae", "decoder_masking": "pmi"},
    "retromae-remove": {"name": "retromae", "encoder_masking": "remove"},
    "tsdae": {"name": "tsdae"},
    "maelm": {"name": "maelm"},
    # all-MiniLM-L6-v2 has 6 layers of 384: the recipes' settings for it (pretrain/*_small.yaml)
    "condenser": {"name": "condenser", "skip_from": 3},
    "cocondenser": {"name": "cocondenser", "skip_from": 3},
    "starbucks": {"name": "starbucks", "pairs": [[1, 32], [2, 64], [3, 128], [4, 192], [5, 256], [6, 384]]},
    "lexmae": {"name": "lexmae"},
}


# The families' usual settings where they differ from the tiny test models' (retromae.tiny).
FAMILY_SETTINGS = {"modernbert": {"local_attention": 128, "global_attn_every_n_layers": 3},
                   "deberta-v3": {"position_buckets": 256}, "deberta-v2": {"position_buckets": 256}}


def family_model(family: str, tokenizer, folder: str, max_positions: int) -> str:
    """A random model of `family` at all-MiniLM-L6-v2's size (6 x 384) with its tokenizer, saved in `folder`."""
    from retromae.tiny import save_random_model

    save_random_model(folder, tokenizer, family, hidden=384, layers=6, heads=6, max_positions=max_positions,
                      **FAMILY_SETTINGS.get(family, {}))
    return folder


def load_mlm(model_dir: str):
    from transformers import AutoConfig, AutoModelForMaskedLM

    from retromae.architectures import attention_for

    config = AutoConfig.from_pretrained(model_dir)
    return AutoModelForMaskedLM.from_pretrained(model_dir, attn_implementation=attention_for(config),
                                                dtype=torch.float32)


def make_trainer(name: str, model_dir: str, tokenizer, accelerator, precision: str, token_counts: torch.Tensor):
    encoder = load_mlm(model_dir)
    spec = OBJECTIVES[name]
    objective = objective_class(spec["name"])(encoder, tokenizer, build_objective_config(spec))
    if hasattr(objective, "attach_corpus_statistics"):
        objective.attach_corpus_statistics(token_counts, int(token_counts.sum()))
    cfg = TrainConfig(max_steps=10**6, lr=1e-5, mixed_precision=precision, report_to="none",
                      cpu=accelerator.device.type == "cpu",
                      max_grad_norm=1.0)
    return Trainer(objective, _FixedBatches(), cfg, accelerator)


def as_documents(examples: list[list[int]], special_ids: set[int], end_id: int) -> tuple[list, list]:
    """Blocks as whole-document examples: (their ordinary tokens, sentence lengths ending at each `end_id`)."""
    documents, sentences = [], []
    for ids in examples:
        tokens = [t for t in ids if t not in special_ids]
        ends = [i + 1 for i, t in enumerate(tokens) if t == end_id]
        bounds = [0] + [e for e in ends if e < len(tokens)] + [len(tokens)]
        documents.append(tokens)
        sentences.append([b - a for a, b in zip(bounds, bounds[1:])])
    return documents, sentences


def takes_documents(name: str) -> bool:
    return getattr(objective_class(OBJECTIVES[name]["name"]), "example_format", "block") == "document"


def ours_step(trainer, examples, batch_index: int, pad_id: int, timings: dict | None = None, sync=None) -> None:
    """One training step as the Trainer runs it. With `timings`, the batch preparation (collate + masking) is
    synchronised and timed apart from the rest; without, nothing waits for the device inside the step."""
    t0 = time.perf_counter()
    if isinstance(examples, tuple):  # (documents, their sentence lengths): whole-document examples
        documents, sentences = examples
        batch = collate(documents, list(range(len(documents))), batch_index, 0, pad_id, 8, None, sentences)
    else:
        batch = collate(examples, list(range(len(examples))), batch_index, 0, pad_id, 8)
    prepared = trainer.prepare_batches([batch])
    if timings is not None:
        sync()
        t1 = time.perf_counter()
    trainer.accumulate_gradients(prepared)
    trainer.optimizer_step()
    if timings is not None:
        sync()
        timings.setdefault("prepare", []).append(t1 - t0)
        timings.setdefault("rest", []).append(time.perf_counter() - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from its package)")
    parser.add_argument("--arch", default=None, help="a random model of this family instead (e.g. modernbert)")
    parser.add_argument("--objectives", default="retromae,mlm",
                        help=f"comma-separated, or 'all': {', '.join(OBJECTIVES)}")
    parser.add_argument("--markdown", default=None, help="also write the table here (Markdown)")
    args = parser.parse_args()
    names = list(OBJECTIVES) if args.objectives == "all" else args.objectives.split(",")
    if "retromae" not in names:
        names.insert(0, "retromae")  # the ratio and the preparation share are RetroMAE's

    import transformers
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    transformers.logging.set_verbosity_error()
    precision = resolve_precision(args.precision, args.device)
    model_dir = args.model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.arch:
        import tempfile

        model_dir = family_model(args.arch, tokenizer, tempfile.mkdtemp(prefix=f"bench-{args.arch}-"),
                                 max(512, args.length))
    hf_examples = load_features(tokenizer, args.length, args.batch * (args.rounds * args.steps + 1))
    examples = [row["input_ids"] for row in hf_examples]
    batches = [examples[i : i + args.batch] for i in range(0, len(examples), args.batch)]

    # Our contenders share one accelerator (CPU or the GPU) and its precision.
    accelerator = make_accelerator(TrainConfig(mixed_precision=precision, report_to="none",
                                               cpu=args.device == "cpu"))
    device = accelerator.device
    period, specials = tokenizer.convert_tokens_to_ids("."), set(tokenizer.all_special_ids)
    documents = [as_documents(b, specials, period) for b in batches]
    token_counts = torch.bincount(torch.tensor([t for ids in examples for t in ids]), minlength=len(tokenizer))
    ours = {name: make_trainer(name, model_dir, tokenizer, accelerator, precision, token_counts) for name in names}

    # Hugging Face's standard MLM, as its users run it (whole-word masking needs offset mappings).
    hf_model = load_mlm(model_dir).to(device).train()
    hf_optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-5)
    hf_collator = DataCollatorForLanguageModeling(tokenizer, whole_word_mask=True, mlm_probability=0.3)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def hf_step(batch_index: int) -> None:
        rows = hf_examples[batch_index * args.batch : (batch_index + 1) * args.batch]
        batch = {k: v.to(device) for k, v in hf_collator(rows).items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = hf_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        hf_optimizer.step()
        hf_optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up: one step each (allocator, kernels, lazy initialisation).
    for name, trainer in ours.items():
        ours_step(trainer, (documents if takes_documents(name) else batches)[0], 0, tokenizer.pad_token_id)
    hf_step(0)

    rates = {**{f"ours-{n}": [] for n in names}, "hf-mlm": []}
    prepare_share: list[float] = []
    for r in range(args.rounds):
        for contender in rates:
            sync()
            start = time.perf_counter()
            for s in range(args.steps):
                index = 1 + r * args.steps + s
                if contender == "hf-mlm":
                    hf_step(index)
                else:
                    name = contender.removeprefix("ours-")
                    inputs = documents if takes_documents(name) else batches
                    ours_step(ours[name], inputs[index], index, tokenizer.pad_token_id)
            sync()
            elapsed = time.perf_counter() - start
            rates[contender].append(args.steps * args.batch / elapsed)
        # the preparation share, from steps synchronised around it (on a GPU the rounds above never wait)
        timings: dict = {}
        for s in range(args.steps):
            index = 1 + r * args.steps + s
            ours_step(ours["retromae"], batches[index], index, tokenizer.pad_token_id, timings, sync)
        prepare_share.append(sum(timings["prepare"]) / (sum(timings["prepare"]) + sum(timings["rest"])))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items()), flush=True)

    medians = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nmodel {args.arch or 'all-MiniLM-L6-v2'} architecture (6 x 384), batch {args.batch} x {args.length}, "
          f"precision {precision}, device {device}, {torch.get_num_threads()} threads")
    print(f"{'contender':<22}{'samples/s (median)':>20}{'vs hf-mlm':>12}")
    for k, v in medians.items():
        print(f"{k:<22}{v:>20.2f}{v / medians['hf-mlm']:>12.2f}")
    if args.markdown:
        rows = "".join(f"| {k} | {v:.2f} | {v / medians['hf-mlm']:.2f} |\n" for k, v in medians.items())
        Path(args.markdown).write_text(
            f"batch {args.batch} x {args.length}, precision {precision}, device {device}, "
            f"median of {args.rounds} rounds x {args.steps} steps\n\n| contender | samples/s | vs hf-mlm |\n"
            f"|---|---:|---:|\n{rows}")
    print(f"batch preparation share of the RetroMAE step: {100 * statistics.median(prepare_share):.2f}%")
    print(f"ratio={medians['ours-retromae'] / medians['hf-mlm']:.3f}")


if __name__ == "__main__":
    main()
