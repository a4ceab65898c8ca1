"""The shared training loop: one accelerate loop for every objective.

Why not `transformers.Trainer`: every objective returns several named losses, each of which must be the
mean over its own items (masked tokens of the encoder, decoded tokens ...) of the *global* batch, across
processes and gradient-accumulation steps. Trainer normalises one loss by one item count. Here the loop
sums each objective's `num_items` over all micro-batches and processes before the backward pass, then
back-propagates sum / global count for every named loss. It runs on `accelerate` (devices, DDP, mixed
precision, state checkpoints), uses transformers' schedulers, tqdm and TensorBoard.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from retromae.config import ConfigError
from retromae.data.batches import Position
from retromae.hardware import precision_reason, resolve_precision
from retromae.interrupt import StopSignals, StopVote, TrainingInterrupted
from retromae.io import atomic_write_text, replace_directory, share_like_umask

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"  # checkpoints, TensorBoard logs and the exported model go here
    seed: int = 42  # run seed: data order, masks, head initialisation, dropout
    per_device_batch_size: int = 32  # examples per process in one micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the corpus (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs (needed for streamed corpora)
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay (not applied to biases and LayerNorm weights)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_epsilon: float = 1e-8  # AdamW epsilon
    warmup_ratio: float = 0.1  # share of the steps spent warming the learning rate up linearly
    warmup_steps: int = 0  # warm-up steps; > 0 overrides warmup_ratio
    scheduler: str = "linear"  # decay after warm-up: linear | cosine | constant_with_warmup (transformers names)
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    mixed_precision: str = "auto"  # auto (bf16 where the hardware has it) | no | bf16 | fp16
    cpu: bool = False  # train on the CPU even when a GPU is present
    logging_steps: int = 10  # log the named losses every N steps (console and TensorBoard)
    save_steps: int = 0  # write a resumable checkpoint every N steps (0: none before the end)
    save_total_limit: int = 2  # checkpoints kept; older ones are deleted
    resume: str | None = None  # 'latest' (newest checkpoint in output_dir), a checkpoint folder, or null
    overwrite: bool = False  # start afresh in an output_dir that holds another run, removing its state
    stop_at_step: int = 0  # stop after this step with a checkpoint, schedule unchanged (job time limits); 0: off
    report_to: str = "tensorboard"  # tensorboard | none
    find_unused_parameters: bool = False  # DDP option for objectives whose heads are not all used every step
    timeout_minutes: float = 30.0  # how long a process waits for the others in a collective before giving up
    deterministic: bool = False  # deterministic GPU kernels (slower): makes resumed GPU runs exact, as CPU runs are

    def validate(self) -> None:
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"train.mixed_precision={self.mixed_precision!r} must be one of {', '.join(PRECISIONS)}",
                              key="mixed_precision")
        for key in ("per_device_batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1", key=key)
        if self.report_to not in ("tensorboard", "none"):
            raise ConfigError(f"train.report_to={self.report_to!r} must be 'tensorboard' or 'none'", key="report_to")
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0", key="lr")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            raise ConfigError("train.warmup_ratio must be in [0, 1) and train.warmup_steps >= 0", key="warmup_ratio")
        if self.max_steps < 0 or (self.max_steps == 0 and not self.epochs > 0):
            raise ConfigError("set train.max_steps > 0 or train.epochs > 0", key="max_steps")
        schedulers = scheduler_names()
        if self.scheduler not in schedulers:
            close = difflib.get_close_matches(self.scheduler, schedulers, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"train.scheduler={self.scheduler!r} is not a transformers scheduler.{hint} Known: "
                              f"{', '.join(schedulers)}", key="scheduler")
        if self.resume and self.overwrite:
            raise ConfigError("train.resume and train.overwrite exclude each other: resume a run, or replace it",
                              key="overwrite")
        if not self.timeout_minutes > 0:
            raise ConfigError("train.timeout_minutes must be > 0", key="timeout_minutes")


def scheduler_names() -> list[str]:
    from transformers import SchedulerType

    return [s.value for s in SchedulerType]


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    from retromae.distributed import configure_timeout

    configure_timeout(cfg.timeout_minutes)  # the same patience for waits outside collectives (run_on_main, the cache)
    device_type = "cpu" if cfg.cpu or not torch.cuda.is_available() else "cuda"
    if cfg.deterministic:
        use_deterministic_kernels()
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "logs"))
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters, broadcast_buffers=False)
    group = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    # broadcast_buffers=False (our buffers are per-vocabulary constants, identical everywhere) is what we mean;
    # torch 2.13 renamed it and warns on every launch
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    precision = resolve_precision(cfg.mixed_precision, device_type)
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=cfg.cpu,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=project,
        kwargs_handlers=[ddp, group],
    )
    if accelerator.is_main_process:
        why = f" (train.mixed_precision: auto, {precision_reason(device_type)})" if cfg.mixed_precision == "auto" else ""
        logger.info("%d process(es) on %s, precision %s%s", accelerator.num_processes, accelerator.device,
                    "fp32" if precision == "no" else precision, why)
    return accelerator


def _fault_point(where: str, step: int) -> None:
    """Fault injection for the kill-and-resume test: RETROMAE_FAULT=checkpoint:N kills this process (SIGKILL, as a
    node failure or the OOM killer would) halfway through writing checkpoint N."""
    if os.environ.get("RETROMAE_FAULT") == f"{where}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def use_deterministic_kernels() -> None:
    """CUDA backward passes add into shared buffers with atomics, in an order that changes from run to run, so a
    resumed GPU run drifts from an uninterrupted one by float rounding; deterministic kernels remove that (and some
    speed). Ops that have no deterministic CUDA kernel are reported, not refused."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement for reproducible GEMMs
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and normalisation weights (BERT's recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def agree_on_checkpoint(output_dir: str | Path, where: str) -> Path | None:
    """The checkpoint every process resumes: the main process chooses it ('latest': the newest in output_dir, None
    if there is none) and tells the others, and every process checks that it can read it. Each process choosing
    'latest' on its own resumed step N on one machine and started afresh on another whose folder was not shared."""
    from retromae.distributed import broadcast_decision, gather_objects, world

    chosen = None
    if world()[0] == 0:
        if where == "latest":
            found = checkpoint_dirs(output_dir)
            chosen = str(found[-1]) if found else None
        else:
            chosen = str(where)
    chosen = broadcast_decision(chosen)
    if chosen is None:
        return None
    path = Path(chosen)
    missing = [r for r, seen in enumerate(gather_objects((path / "trainer_state.json").is_file())) if not seen]
    if 0 in missing:
        raise ConfigError(f"{path}: not a checkpoint (no trainer_state.json); train.resume takes 'latest' or a "
                          "checkpoint folder")
    if missing:
        raise ConfigError(f"{path}: process 0 resumes this checkpoint but process(es) {missing} cannot read it: "
                          "train.output_dir must be on a filesystem every machine shares")
    return path


def _examples(batch: dict) -> int:
    """Examples in a micro-batch: the leading size of its first tensor (texts for pretraining, queries for
    fine-tuning)."""
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """Trains an objective over a batch source; saves resumable checkpoints; logs each named loss."""

    def __init__(self, objective, batches, cfg: TrainConfig, accelerator, run_config: dict | None = None,
                 callbacks: list | None = None, log_name: str = "pretrain"):
        """`callbacks`: functions called with the trainer after every optimizer step, on every process
        (e.g. evaluation on a dev set and keeping the best model). `log_name`: the TensorBoard run's folder
        under `output_dir/logs`."""
        self.cfg, self.accelerator, self.batches, self.log_name = cfg, accelerator, batches, log_name
        self.callbacks = list(callbacks or [])
        self.run_config = run_config or {}
        self.total_steps = self._total_steps()
        optimizer = torch.optim.AdamW(
            parameter_groups(objective, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
        )
        from transformers import get_scheduler

        warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * self.total_steps))
        # Not passed through accelerator.prepare: its scheduler wrapper steps once per process per step,
        # which would make the schedule depend on the number of processes.
        self.scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total_steps)
        self.model, self.optimizer = accelerator.prepare(objective, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        self.step, self.position = 0, Position()
        self.history: list[dict] = []

    @property
    def objective(self):
        return self.accelerator.unwrap_model(self.model)

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps > 0:
            return cfg.max_steps
        per_epoch = self.batches.batches_per_epoch
        if per_epoch is None:
            raise ConfigError("a streamed corpus has no known length: set train.max_steps")
        return max(1, int(cfg.epochs * per_epoch) // cfg.gradient_accumulation_steps)

    # ----- one optimizer step -------------------------------------------------------------------------
    def prepare_batches(self, micro_batches: list[dict]) -> list[dict]:
        """Move the micro-batches of one step to the device and let the objective prepare them (masking)."""
        objective, device = self.objective, self.accelerator.device
        with torch.no_grad():
            return [objective.prepare(_to_device(b, device)) for b in micro_batches]

    def accumulate_gradients(self, prepared: list[dict]) -> tuple[dict, dict]:
        """Forward and backward over the prepared micro-batches of one step (gradients are left in .grad).

        Returns ({name: local loss sum}, {name: global item count}). Every named loss enters the backward pass
        as its local sum over the global item count, times the number of processes because DDP averages
        gradients over processes: the gradient is that of the global mean, however the batch is split.
        """
        acc = self.accelerator
        objective = self.objective
        with torch.no_grad():
            counts = [objective.num_items(b) for b in prepared]
        names = list(counts[0])
        local = torch.stack([sum(c[n] for c in counts).float() for n in names])
        global_counts = dict(zip(names, acc.reduce(local, reduction="sum")))
        weights = objective.loss_weights
        sums = {n: torch.zeros((), dtype=torch.float64, device=acc.device) for n in names}
        for j, batch in enumerate(prepared):
            sync = j == len(prepared) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                losses = self.model(batch)
                if set(losses) != set(names):
                    raise RuntimeError(
                        f"objective {objective.name!r}: forward() returned losses {sorted(losses)} but num_items() "
                        f"counted {sorted(names)}; they must name the same losses"
                    )
                total = sum(
                    weights.get(n, 1.0) * losses[n] / global_counts[n].clamp(min=1.0) for n in names
                ) * acc.num_processes
                acc.backward(total)
            for n in names:
                sums[n] += losses[n].detach().double()  # logged sums in float64: exact to report
        return sums, global_counts

    def optimizer_step(self) -> None:
        if self.cfg.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ----- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """accelerate's state (weights as safetensors, optimizer, scheduler, every process's RNG) plus our data
        position, written under a temporary name and renamed once complete."""
        acc = self.accelerator
        root = Path(self.cfg.output_dir) / "checkpoints"
        final = root / f"checkpoint-{self.step}"
        tmp = root / f".checkpoint-{self.step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        _fault_point("checkpoint", self.step)
        if self.position.cursors is not None:  # a streamed corpus: every process has its own place in it
            atomic_write_text(tmp / f"data_position_{acc.process_index}.json", json.dumps(asdict(self.position)))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "step": self.step,
                "epoch": self.position.epoch,
                "offset": self.position.offset,
                "total_steps": self.total_steps,
                "global_batch": self.cfg.per_device_batch_size * acc.num_processes,
                "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
                "num_processes": acc.num_processes,
                "config": self.run_config,
            }
            atomic_write_text(tmp / "trainer_state.json", json.dumps(state, indent=2))
            share_like_umask(tmp)
            replace_directory(tmp, final)
            for old in checkpoint_dirs(self.cfg.output_dir)[: -max(1, self.cfg.save_total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self, where: str) -> None:
        path = agree_on_checkpoint(self.cfg.output_dir, where)
        if path is None:
            logger.info("no checkpoint in %s: starting fresh", self.cfg.output_dir)
            return
        state_file = path / "trainer_state.json"
        state = json.loads(state_file.read_text())
        global_batch = self.cfg.per_device_batch_size * self.accelerator.num_processes
        if (state["global_batch"], state["gradient_accumulation_steps"], state["num_processes"]) != (
            global_batch, self.cfg.gradient_accumulation_steps, self.accelerator.num_processes
        ):
            raise ConfigError(
                f"{state_file}: the checkpoint was made with {state['num_processes']} process(es), global batch "
                f"{state['global_batch']} and {state['gradient_accumulation_steps']} accumulation steps; resume with "
                "the same settings, or the data order and random states would not continue exactly"
            )
        self.accelerator.load_state(str(path))
        self.step = int(state["step"])
        self.position = Position(int(state["epoch"]), int(state["offset"]))
        own = path / f"data_position_{self.accelerator.process_index}.json"
        if own.is_file():
            self.position = Position(**json.loads(own.read_text(encoding="utf-8")))
        if self.accelerator.is_main_process:
            logger.info("resumed from %s at step %d", path, self.step)

    # ----- the loop ---------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        if cfg.resume:
            self.resume(cfg.resume)
        if cfg.report_to != "none":
            acc.init_trackers(self.log_name)
        self.model.train()
        stream = self.batches.iterate(self.position)
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not acc.is_main_process,
                        desc=self.objective.name, dynamic_ncols=True)
        try:
            with StopSignals(announce=acc.is_main_process) as signals:
                self._loop(stream, progress, StopVote(acc, signals))
        finally:
            progress.close()
            # The trackers only: accelerator.end_training() would also destroy the process group, which the export
            # and the final barrier still need (the command line destroys it when the command is done).
            for tracker in acc.trackers:
                tracker.finish()
        return self.history

    def _loop(self, stream, progress, vote) -> None:
        """The steps up to the end (or train.stop_at_step); after a SIGTERM / SIGINT that the processes agree on
        (`vote`), a checkpoint and TrainingInterrupted (see retromae.interrupt)."""
        acc, cfg = self.accelerator, self.cfg
        window_sums, window_counts, window_start, window_samples = None, None, time.perf_counter(), 0
        stop = min(self.total_steps, self.cfg.stop_at_step or self.total_steps)
        while self.step < stop:
            micro = []
            for _ in range(cfg.gradient_accumulation_steps):
                batch, self.position = next(stream)
                micro.append(batch)
            sums, counts = self.accumulate_gradients(self.prepare_batches(micro))
            self.optimizer_step()
            self.step += 1
            progress.update(1)
            window_samples += sum(_examples(b) for b in micro) * acc.num_processes
            if window_sums is None:
                window_sums, window_counts = sums, counts
            else:
                window_sums = {n: window_sums[n] + sums[n] for n in sums}
                window_counts = {n: window_counts[n] + counts[n] for n in counts}
            last = self.step == stop
            if self.step % max(1, cfg.logging_steps) == 0 or last:
                elapsed = time.perf_counter() - window_start
                record = self._log(window_sums, window_counts, window_samples / max(elapsed, 1e-9))
                progress.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k.startswith("loss")})
                window_sums, window_counts, window_start, window_samples = None, None, time.perf_counter(), 0
            saved = None
            if (cfg.save_steps > 0 and (self.step % cfg.save_steps == 0 or last)) or (last and stop < self.total_steps):
                saved = self.save_checkpoint()
            signum = vote()
            if signum and not last:
                # the callbacks (a dev evaluation due at this step) are skipped: the grace period is for the
                # checkpoint
                raise TrainingInterrupted(signum, self.step, self.total_steps, str(saved or self.save_checkpoint()))
            for callback in self.callbacks:
                callback(self)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def _log(self, sums: dict, counts: dict, samples_per_second: float) -> dict:
        acc = self.accelerator
        names = list(sums)
        global_sums = acc.reduce(torch.stack([sums[n] for n in names]), reduction="sum")
        means = {n: (global_sums[i] / counts[n].clamp(min=1.0)).item() for i, n in enumerate(names)}
        weights = self.objective.loss_weights
        record = {"loss": sum(weights.get(n, 1.0) * v for n, v in means.items())}
        record.update({f"loss/{n}": v for n, v in means.items()})
        record["lr"] = self.scheduler.get_last_lr()[0]
        record["samples_per_second"] = samples_per_second
        self.history.append({"step": self.step, **record})
        if self.cfg.report_to != "none":
            acc.log(record, step=self.step)
        if acc.is_main_process:
            parts = "  ".join(f"{k.removeprefix('loss/')} {v:.4f}" for k, v in record.items() if k.startswith("loss"))
            from tqdm.auto import tqdm

            tqdm.write(f"step {self.step:>6}/{self.total_steps}  {parts}  lr {record['lr']:.2e}  "
                       f"{samples_per_second:.1f} samples/s")
        return record
