"""Run under 1 or 2 processes: one contrastive step's loss and gradients (cross-device negatives on), written by
the main process to OUT. Used by test_finetune.py.
Usage: [accelerate launch ...] python finetune_probe.py MODEL_DIR TRAIN_JSONL OUT_DIR PER_DEVICE_BATCH [GRAD_CACHE] [DTYPE]
                                                        [OVERRIDES_JSON]
OVERRIDES_JSON: further settings, e.g. {"loss.representation": "splade"}; every named loss's global mean is recorded.
DTYPE float64 makes the comparison exact to 1e-12: in float32, gradients of a near-uniform softmax over nearly
identical random-model vectors cancel heavily, and rounding differences of a different summation order show
up as ~1% of the (tiny) gradients.
"""

import json
import sys
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retromae.finetune.run import build_batches, build_bi_encoder, load_finetune_config  # noqa: E402
from retromae.cli import end_process_group  # noqa: E402
from retromae.trainer import Trainer, make_accelerator  # noqa: E402


def main(model_dir: str, train: str, out: str, per_device: int, grad_cache: int = 0, dtype: str = "float32",
         extra: str = "{}") -> None:
    overrides = {
        "model.name_or_path": model_dir, "model.dropout": 0.0, "data.train": train, "data.group_size": 3,
        "data.query_max_len": 24, "data.passage_max_len": 48, "train.per_device_batch_size": per_device,
        "train.max_steps": 2, "train.report_to": "none", "train.cpu": True, "train.mixed_precision": "no",
        "train.output_dir": out, "loss.temperature": 0.5, "loss.grad_cache_chunk": grad_cache,
        **json.loads(extra),
    }
    cfg = load_finetune_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    accelerator = make_accelerator(cfg.train)
    bi_encoder, tokenizer = build_bi_encoder(cfg)
    bi_encoder.to(getattr(torch, dtype))
    batches = build_batches(cfg, tokenizer, accelerator)
    trainer = Trainer(bi_encoder, batches, cfg.train, accelerator)
    batch, _ = next(batches.iterate(trainer.position))
    sums, counts = trainer.accumulate_gradients(trainer.prepare_batches([batch]))
    names = list(sums)
    totals = accelerator.reduce(torch.stack([sums[n].detach() for n in names]), reduction="sum")
    total = totals[names.index("contrastive")]
    grads = {k: p.grad.detach().clone() for k, p in trainer.objective.named_parameters() if p.grad is not None}
    if accelerator.is_main_process:
        Path(out).mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(grads, str(Path(out) / "grads.safetensors"))
        record = {"loss": (total / counts["contrastive"]).item(), "queries": counts["contrastive"].item(),
                  "num_processes": accelerator.num_processes,
                  "losses": {n: (totals[i] / counts[n].clamp(min=1.0)).item() for i, n in enumerate(names)}}
        (Path(out) / "record.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0,
         sys.argv[6] if len(sys.argv) > 6 else "float32", sys.argv[7] if len(sys.argv) > 7 else "{}")
