"""`retromae study`: two arms (the control and RetroMAE), one step each, end to end on tiny models; a finished cell
is not run again."""

import json

import pytest

from conftest import accelerate_launch, tiny_config


def write_study(tiny_model, corpus_file, beir_task, tmp_path, **extra):
    """A two-arm study of the tiny model (its recipes written under tmp_path); the study file's path."""
    from retromae.config import dump_yaml

    pretrain = tmp_path / "pretrain.yaml"
    dump_yaml(tiny_config(tiny_model, corpus_file, tmp_path / "unused", train={"max_steps": 1}), pretrain)
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(json.dumps({
        "data": {"train": str(beir_task), "group_size": 1, "query_max_len": 24, "passage_max_len": 32},
        "loss": {"similarity": "cosine", "temperature": 0.05, "pooling": "mean"},
        "train": {"per_device_batch_size": 8, "max_steps": 1, "report_to": "none", "cpu": True,
                  "mixed_precision": "no"}}))
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\ndata_root: {beir_task.parent}\ndatasets: [{beir_task.name}]\n"
                     "search:\n  metrics: [ndcg@10]\nencode:\n  precision: 'no'\n")
    study = tmp_path / "study.yaml"
    study.write_text(json.dumps({
        "name": "tiny", "output_dir": str(tmp_path / "out"), "model": str(tiny_model), "seeds": [1],
        "pretrain": str(pretrain), "budget_tokens": 8 * 64 * 2, "finetune": str(finetune), "suite": str(suite),
        "arms": [{"name": "control", "objective": None, "seeds": [1, 2]}, {"name": "retromae",
                                                                           "objective": {"name": "retromae"}}],
        **extra}))
    return study


def test_two_arm_study_end_to_end_and_resume(tiny_model, corpus_file, beir_task, tmp_path):
    from retromae.study import load_study, run_study

    study = write_study(tiny_model, corpus_file, beir_task, tmp_path)
    cfg = load_study(str(study))
    report = run_study(cfg)
    out = tmp_path / "out"
    assert set(report["arms"]) == {"control", "retromae"}
    assert report["arms"]["control"]["average"]["n"] == 2 and report["arms"]["control"]["average"]["std"] is not None
    assert (out / "retromae" / "seed1" / "model" / "model.safetensors").is_file(), "the arm's model, predictable path"
    import yaml

    assert (out / "retromae" / "seed1" / "pretrain" / "model").is_dir()
    assert not (out / "control" / "seed1" / "pretrain").exists(), "the control is not pretrained"
    run_config = yaml.safe_load((out / "retromae" / "seed1" / "pretrain" / "run_config.yaml").read_text())
    assert run_config["train"]["max_steps"] == 2, "the budget: 1024 tokens = 2 steps of 8 texts x 64 tokens"
    for name in ("study.json", "study.md", "study.png"):
        assert (out / name).is_file()
    table = (out / "study.md").read_text()
    assert "BM25 (reference)" in table and "untouched (reference)" in table and "| control | 2 |" in table
    control, retromae = report["arms"]["control"]["average"], report["arms"]["retromae"]["average"]
    difference = retromae["mean"] - control["mean"]
    row = next(line for line in table.splitlines() if line.startswith("| retromae |"))
    # 2 control seeds do not measure the noise: the difference is given without a multiple of their spread
    assert row.endswith(f"| {difference:+.4f} (noise unknown) |"), row
    assert "σ: not given, noise unknown: the control has 2 seed(s)" in table
    # resume: finished cells are not run again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    (out / "retromae" / "seed1" / "results.json").unlink()  # this cell's models are kept: only evaluated again
    models = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    run_study(load_study(str(study)))
    after = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    assert {p: t for p, t in after.items() if "retromae" not in str(p)} == {
        p: t for p, t in before.items() if "retromae" not in str(p)}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == models, "nothing trained again"


@pytest.mark.slow
def test_a_study_under_a_two_process_launch_keeps_its_bm25_row(tiny_model, corpus_file, beir_task, tmp_path):
    """Under `accelerate launch`, the processes other than the main one used to write baselines.json first (BM25 runs
    on the main process only, so theirs had an empty BM25 entry), and the main process then skipped BM25: the table
    said `BM25 | –`. Every process also wrote the reports and printed a table. Now the main process decides and
    writes, and the table is printed once."""
    study = write_study(tiny_model, corpus_file, beir_task, tmp_path, seeds=[1], mine=str(beir_task),
                        arms=[{"name": "control", "objective": None}, {"name": "retromae", "objective":
                                                                        {"name": "retromae"}}])
    done = accelerate_launch(["-m", "retromae", "study", str(study)], cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = tmp_path / "out"
    baselines = json.loads((out / "baselines.json").read_text())
    assert baselines["bm25"] and baselines["initial"], baselines
    table = (out / "study.md").read_text()
    bm25 = next(line for line in table.splitlines() if line.startswith("| BM25"))
    assert "–" not in bm25, table
    assert done.stdout.count("### tiny: ndcg@10") == 1, "the table is printed once, by the main process"
    for arm in ("control", "retromae"):
        record = json.loads((out / arm / "seed1" / "results.json").read_text())
        assert record["rows"], f"{arm}: the main process's results, with its rows"
    assert not list(out.rglob("*.tmp*")), "nothing half-written"


def _cells(control: list[float], arm: float) -> list[dict]:
    return [{"arm": "control", "seed": i, "rows": {"d": {"ndcg@10": v}}} for i, v in enumerate(control)] + [
        {"arm": "x", "seed": 1, "rows": {"d": {"ndcg@10": arm}}}]


def test_control_spread_is_used_only_when_it_measures_noise():
    from retromae.study import ArmConfig, StudyConfig, summarize

    cfg = StudyConfig(finetune="f.yaml", pretrain="p.yaml", arms=[ArmConfig("control"), ArmConfig("x", {"name": "mlm"})])
    baselines = {"bm25": {"d": {"ndcg@10": 0.8}}}

    def row(report, label):
        return next(line for line in report["table"].splitlines() if line.startswith(f"| {label} |"))

    # the case: 2 seeds 0.001 apart; BM25 0.383 above their mean was reported as "+383.3 σ"
    two = summarize(cfg, _cells([0.4165, 0.4175], 0.43), baselines)
    assert row(two, "BM25 (reference)").endswith("| +0.3830 (noise unknown) |")
    assert "σ" not in row(two, "x") and two["noise_unknown"].startswith("the control has 2 seed(s)")
    # 3 seeds 0.40, 0.41, 0.42: std 0.01 (by hand: deviations -0.01, 0, 0.01; sum of squares 2e-4 / 2 = 1e-4)
    three = summarize(cfg, _cells([0.40, 0.41, 0.42], 0.43), baselines)
    assert row(three, "x").endswith("| +0.0200 (+2.0 σ) |") and three["noise_unknown"] is None
    assert "noise unknown" not in three["table"]
    # 3 seeds that agree exactly: the seed does not vary fine-tuning, so there is no noise estimate
    same = summarize(cfg, _cells([0.41, 0.41, 0.41], 0.43), baselines)
    assert row(same, "x").endswith("| +0.0200 (noise unknown) |") and "below 0.001" in same["noise_unknown"]
