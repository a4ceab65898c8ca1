"""Run under 1 or 2 processes (on one or two "machines"): one RetroMAE training step's losses and gradients, then
3 steps' weights, with ACCUMULATION micro-batches per step.

Written by the main process to OUT (safetensors for tensors, JSON for numbers). Used by test_multiprocess.py.
Usage: [accelerate launch ...] python ddp_probe.py MODEL_DIR CORPUS OUT_DIR PER_DEVICE_BATCH [ACCUMULATION [OBJECTIVE]]
(OBJECTIVE: the objective section as JSON; default RetroMAE)
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


def main(model_dir: str, corpus: str, out: str, per_device: int, accumulation: int = 1,
         objective: dict | None = None) -> None:
    cfg = tiny_config(model_dir, corpus, out, model={"dropout": 0.0}, objective=objective or {"name": "retromae"},
                      train={"per_device_batch_size": per_device, "max_steps": 3, "lr": 2e-2, "warmup_ratio": 0.0,
                             "gradient_accumulation_steps": accumulation})
    accelerator = make_accelerator(cfg.train)
    torch.manual_seed(0)
    objective, tokenizer = build_objective(cfg)
    batches = build_batches(cfg, tokenizer, accelerator)
    trainer = Trainer(objective, batches, cfg.train, accelerator)
    stream = batches.iterate(trainer.position)
    record = {"num_processes": accelerator.num_processes, "steps": []}
    for step in range(3):
        prepared = trainer.prepare_batches([next(stream)[0] for _ in range(accumulation)])
        sums, counts = trainer.accumulate_gradients(prepared)
        items = [objective.num_items(b) for b in prepared]
        local_counts = {n: sum(i[n] for i in items) for n in items[0]}
        global_sums = accelerator.reduce(torch.stack([sums[n] for n in sums]), reduction="sum")
        means = {n: (global_sums[i] / counts[n]).item() for i, n in enumerate(sums)}
        # What averaging per-process (and per-micro-batch) means would give instead of the global token mean:
        local_means = torch.stack([sums[n] / local_counts[n] for n in sums]) if accumulation == 1 else torch.stack(
            [sum(objective(b)[n] / items[j][n] for j, b in enumerate(prepared)).detach() / accumulation for n in sums])
        naive = accelerator.reduce(local_means, reduction="mean")
        record["steps"].append({
            "means": means,
            "naive": {n: naive[i].item() for i, n in enumerate(sums)},
            "local_counts": accelerator.gather(torch.stack([local_counts[n] for n in sums])[None]).tolist(),
        })
        if step == 0:
            grads = {f"grad.{k}": p.grad.detach().clone() for k, p in trainer.objective.named_parameters()
                     if p.grad is not None}
        trainer.optimizer_step()
    if accelerator.is_main_process:
        Path(out).mkdir(parents=True, exist_ok=True)
        final = {f"param.{k}": v.detach().clone().contiguous() for k, v in trainer.objective.named_parameters()}
        safetensors.torch.save_file({**grads, **final}, str(Path(out) / "tensors.safetensors"))
        (Path(out) / "record.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 1,
         json.loads(sys.argv[6]) if len(sys.argv) > 6 else None)
