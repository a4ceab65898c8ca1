"""Run under 1 or 2 processes: one training step of an objective; the global mean of each named loss and the
gradients, written by the main process to OUT. Used by test_objective_family.py.
Usage: [accelerate launch ...] python objective_probe.py MODEL CORPUS OUT PER_DEVICE OBJECTIVE_JSON [DTYPE]
"""

import json
import sys
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_config  # noqa: E402
from retromae.pretrain import build_batches, build_objective  # noqa: E402
from retromae.cli import end_process_group  # noqa: E402
from retromae.trainer import Trainer, make_accelerator  # noqa: E402


def main(model_dir, corpus, out, per_device, objective, dtype="float32"):
    cfg = tiny_config(model_dir, corpus, out, model={"dropout": 0.0}, objective=json.loads(objective),
                      train={"per_device_batch_size": per_device, "max_steps": 1})
    accelerator = make_accelerator(cfg.train)
    torch.manual_seed(0)
    obj, tokenizer = build_objective(cfg)
    obj.to(getattr(torch, dtype))
    batches = build_batches(cfg, tokenizer, accelerator)
    trainer = Trainer(obj, batches, cfg.train, accelerator)
    batch, _ = next(batches.iterate(trainer.position))
    sums, counts = trainer.accumulate_gradients(trainer.prepare_batches([batch]))
    names = list(sums)
    totals = accelerator.reduce(torch.stack([sums[n] for n in names]), reduction="sum")
    grads = {k: p.grad.detach().clone() for k, p in trainer.objective.named_parameters() if p.grad is not None}
    if accelerator.is_main_process:
        Path(out).mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(grads, str(Path(out) / "grads.safetensors"))
        means = {n: (totals[i] / counts[n]).item() for i, n in enumerate(names)}
        (Path(out) / "record.json").write_text(json.dumps({"means": means, "num_processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6] if len(sys.argv) > 6 else "float32")
