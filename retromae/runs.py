"""Output folders a user can trust: one run per folder, a lock against two runs at once, resumption only of the
same run, and no debris left by a killed run.

`claim_output_dir` is called by `pretrain` and `finetune` before any model is loaded and before anything is
written. On the main process it
- takes an exclusive lock on `OUTPUT/.lock` (held until the run ends; the kernel drops it if the process dies),
  refusing a second concurrent run with the holder's process id;
- removes the temporary files and folders that a killed run left (`.checkpoint-N.tmp`, `.model.XXXX.tmp` ...);
- refuses to start a new run into a folder that holds another run's state (checkpoints, logs, an exported
  model) unless `train.overwrite` is set, in which case that state is removed first;
- on `train.resume`, compares the settings the run was started with (saved as `run_config.yaml`, and in each
  checkpoint) with the current ones and names every key that differs;
- writes the run's settings to `OUTPUT/run_config.yaml`.
The other processes wait for its verdict (a broadcast, seconds at most) and stop with the same message. Then every
process of the launch checks that it sees the same folder as the main process (`check_same_folder`): on machines
that do not share it, one machine would resume a checkpoint while another started afresh, and DDP would average the
gradients of different weights without an error.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import secrets
import socket
from pathlib import Path

import yaml

from retromae.config import ConfigError, dump_yaml
from retromae.io import atomic_write_text, remove_path, stale_temporaries

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.yaml"
LOCK = ".lock"
RUN_STATE = ("checkpoints", "logs", "model", RUN_CONFIG)

# Settings that may change between a run and its resumption without making it another run: where and how it
# logs, saves, stops and reads its data. Everything else (objective, corpus, seed, schedule, precision ...) must
# be the same.
OPERATIONAL = (
    "export", "train.output_dir", "train.resume", "train.overwrite", "train.stop_at_step", "train.logging_steps",
    "train.save_steps", "train.save_total_limit", "train.report_to", "train.timeout_minutes", "train.cpu",
    "train.deterministic", "data.num_workers", "data.num_proc", "data.cache_dir", "dev.batch_size",
)


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(stored: dict, current: dict) -> list[str]:
    """'key: stored -> current' for every setting that differs, operational ones aside."""
    old, new = flatten(stored), flatten(current)
    keys = sorted((set(old) | set(new)) - set(OPERATIONAL))
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys if old.get(k) != new.get(k)]


def _checkpoints(output_dir: Path) -> list[Path]:
    from retromae.trainer import checkpoint_dirs

    return checkpoint_dirs(output_dir)


def _describe_state(output_dir: Path) -> str:
    parts = []
    found = _checkpoints(output_dir)
    if found:
        parts.append(f"checkpoints up to step {found[-1].name.split('-')[1]}")
    if (output_dir / "model").exists():
        parts.append("an exported model")
    if (output_dir / "logs").exists():
        parts.append("logs")
    if not parts and (output_dir / RUN_CONFIG).exists():
        parts.append(f"the {RUN_CONFIG} of a run that wrote nothing else yet")
    return ", ".join(parts)


def _stored_config(output_dir: Path, resume: str | None) -> tuple[dict | None, str]:
    """The settings of the run being resumed: from the checkpoint it resumes, else from run_config.yaml."""
    checkpoint = None
    if resume == "latest":
        found = _checkpoints(output_dir)
        checkpoint = found[-1] if found else None
    elif resume:
        checkpoint = Path(resume)
    state_file = checkpoint / "trainer_state.json" if checkpoint else None
    if state_file is not None and state_file.is_file():
        config = json.loads(state_file.read_text(encoding="utf-8")).get("config")
        if config:
            return config, str(state_file)
    run_file = output_dir / RUN_CONFIG
    if run_file.is_file():
        return yaml.safe_load(run_file.read_text(encoding="utf-8")) or {}, str(run_file)
    return None, ""


def _lock(output_dir: Path):
    """An exclusive, non-blocking lock on OUTPUT/.lock (`_sign` writes this process's id in it once the run is
    accepted: a refused run leaves the folder as it found it)."""
    path = output_dir / LOCK
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"{output_dir} is in use by another run ({holder}); wait for it to end, or choose another "
            "train.output_dir"
        ) from None
    return handle


def _sign(handle) -> None:
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {started}\n")
    handle.flush()


def _clean_debris(output_dir: Path) -> None:
    debris = stale_temporaries(output_dir) + stale_temporaries(output_dir / "checkpoints")
    for path in debris:
        remove_path(path)
    if debris:
        logger.info("removed %d unfinished file(s) left by an interrupted run in %s: %s", len(debris), output_dir,
                    ", ".join(p.name for p in debris))


def _check_and_prepare(output_dir: Path, train_cfg, run_config: dict) -> None:
    state = [name for name in RUN_STATE if (output_dir / name).exists()]
    if train_cfg.resume or train_cfg.overwrite or not state:
        _clean_debris(output_dir)
    if train_cfg.resume:
        stored, where = _stored_config(output_dir, train_cfg.resume)
        if stored is not None:
            differences = config_differences(stored, run_config)
            if differences:
                raise ConfigError(
                    f"train.resume={train_cfg.resume}: {where} was made with other settings: "
                    + "; ".join(differences)
                    + ". Resume with the settings it was started with, or start a new run (another "
                    "train.output_dir, or train.overwrite=true)"
                )
        if train_cfg.resume != "latest" and not (Path(train_cfg.resume) / "trainer_state.json").is_file():
            raise ConfigError(f"train.resume={train_cfg.resume}: not a checkpoint (no trainer_state.json); "
                              "train.resume takes 'latest' or a checkpoint folder")
    elif state:
        if not train_cfg.overwrite:
            raise ConfigError(
                f"{output_dir} holds another run ({_describe_state(output_dir)}); resume it with "
                "train.resume=latest, choose another train.output_dir, or set train.overwrite=true to replace it"
            )
        for name in state:
            remove_path(output_dir / name)
        logger.info("train.overwrite: removed the previous run's %s from %s", ", ".join(state), output_dir)
    dump_yaml(run_config, output_dir / RUN_CONFIG)


def check_same_folder(folder: str | Path, setting: str) -> None:
    """Stop, on every process, if some process of the launch does not see `folder` as the main process does: the
    main process writes a file with a fresh random name there and every process looks for it (one collective, a
    second at most). A folder that is the same path on every machine but not on a filesystem they share fails too."""
    from retromae.distributed import broadcast_decision, gather_objects, world

    rank, size = world()
    if size == 1:
        return
    folder = Path(folder)
    marker = None
    if rank == 0:
        marker = folder / f".launch-check-{secrets.token_hex(8)}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, marker.name)
        except OSError as err:
            marker = None
            logger.warning("%s: could not write the folder check (%s)", folder, err)
    name = broadcast_decision(marker.name if marker else None)
    if name is None:
        return
    seen = (folder / name).is_file()
    views = gather_objects((seen, socket.gethostname(), os.getpid()))
    if marker is not None:
        marker.unlink(missing_ok=True)
    blind = [f"process {r} (pid {pid} on {host})" for r, (ok, host, pid) in enumerate(views) if not ok]
    if blind:
        raise ConfigError(f"{setting}={folder}: the processes of this launch do not see the same folder: "
                          f"{', '.join(blind)} cannot see a file that process 0 wrote there. Every machine must "
                          f"see it at the same path, on a filesystem they share (an absolute path on a shared "
                          "filesystem; a relative path is relative to each machine's working folder)")


@contextlib.contextmanager
def claim_output_dir(train_cfg, run_config: dict, accelerator):
    """Hold `train_cfg.output_dir` for the length of the block (see the module docstring)."""
    from accelerate.utils import broadcast_object_list

    output_dir = Path(train_cfg.output_dir)
    handle, verdict = None, [None]
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            handle = _lock(output_dir)
            _check_and_prepare(output_dir, train_cfg, run_config)
            _sign(handle)
        except ConfigError as err:
            verdict = [str(err)]
        except OSError as err:
            verdict = [f"{output_dir}: cannot be used as the output folder ({err.strerror or err})"]
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict, from_process=0)
    try:
        if verdict[0] is not None:
            raise ConfigError(verdict[0])
        check_same_folder(output_dir, "train.output_dir")
        yield output_dir
    finally:
        if handle is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()
