"""Every bad (or harmless but unusual) input a user has met, run through the command line; one table row per case.

    python scripts/bad_inputs.py [--markdown docs/bad_inputs.md]

A case fails when it gives a traceback, when a bad input is accepted silently (exit 0), when a harmless input is
refused, when the message does not name what it must (file, line, key ...), or when it changes a file it must
leave alone. The last line is `failed=<count>`. Runs in-process on a tiny random model and data it builds, in
about a minute on 2 CPU cores; nothing is downloaded (the hub is never reached: the checks come first; the one
download case points at a port where no server listens).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Case:
    name: str  # what the user did
    argv: list[str]  # the command line (after `retromae`)
    expect: str  # "error" (one line, exit 2) | "ok" (accepted) | "warn" (accepted, warned) | "output" (accepted, says)
    must_say: list[str] = field(default_factory=list)  # regular expressions the message (warning, output) must match
    untouched: Path | None = None  # a folder whose files must not change
    setup: object = None  # called before the case (e.g. to take a lock); returns a cleanup function or None
    cwd: Path | None = None


class _Warnings(logging.Handler):
    """The warnings the toolkit logs during a case (what a "warn" case must say)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def snapshot(folder: Path | None) -> dict:
    if folder is None or not folder.exists():
        return {}
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_case(case: Case) -> dict:
    from retromae.cli import main

    before = snapshot(case.untouched)
    cleanup = case.setup() if case.setup else None
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    started = time.perf_counter()
    code, trace = None, None
    warned = _Warnings()
    logging.getLogger("retromae").addHandler(warned)
    try:
        if case.cwd:
            os.chdir(case.cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(case.argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    except BaseException:  # noqa: BLE001 (a traceback is what this script looks for)
        trace = traceback.format_exc()
    finally:
        logging.getLogger("retromae").removeHandler(warned)
        os.chdir(cwd)
        if cleanup:
            cleanup()
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
        GradientState._reset_state()
    message = next((line for line in err.getvalue().splitlines() if line.startswith("retromae: error:")), "")
    problems = []
    if trace:
        problems.append("traceback: " + trace.strip().splitlines()[-1])
    elif case.expect == "error" and code == 0:
        problems.append("accepted silently")
    elif case.expect == "error" and not message:
        problems.append(f"exit {code} without a one-line error")
    elif case.expect != "error" and code != 0:
        problems.append(f"refused (exit {code}): {message}")
    message = message.removeprefix("retromae: error: ")
    said = {"error": message, "warn": " ".join(warned.messages), "output": out.getvalue()}.get(case.expect, "")
    for pattern in case.must_say:
        if not trace and not re.search(pattern, said):
            problems.append(f"{'warning' if case.expect == 'warn' else 'message'} lacks /{pattern}/")
    if case.untouched is not None and snapshot(case.untouched) != before:
        problems.append("changed a file")
    shown = {"error": message, "warn": "accepted, warned: " + " ".join(warned.messages),
             "output": "accepted: " + next((line.strip() for line in out.getvalue().splitlines()
                                            if any(re.search(p, line) for p in case.must_say)), "")
             }.get(case.expect, "accepted")
    return {"case": case.name, "input": " ".join(case.argv), "result": shown, "problems": problems,
            "seconds": time.perf_counter() - started}


def build_cases(work: Path) -> list[Case]:
    from retromae.demo import docstring_corpus, write_retrieval_task
    from retromae.tiny import make_tiny_model

    docs = docstring_corpus(limit=300)
    model = make_tiny_model(work / "tiny", [d["text"] for d in docs])
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:200]))
    task = work / "task"
    write_retrieval_task(docs, task, train_every=2)

    def recipe(name: str, **sections) -> str:
        """A small pretraining recipe in `work`; `sections` replace whole sections."""
        base = {"model": {"name_or_path": str(model)},
                "data": {"corpus": [str(corpus)], "max_len": 48, "cache_dir": str(work / "cache")},
                "train": {"per_device_batch_size": 4, "max_steps": 1, "report_to": "none", "mixed_precision": "no",
                          "output_dir": str(work / "runs" / name)}}
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value}
        path = work / f"{name}.yaml"
        import yaml

        path.write_text(yaml.safe_dump(base, sort_keys=False))
        return str(path)

    def write(name: str, content: str | bytes) -> str:
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return str(path)

    def copy_task(name: str, replace: dict[str, str]) -> str:
        """A copy of the task folder with some files (by relative path) replaced."""
        import shutil

        folder = work / name
        shutil.copytree(task, folder)
        for rel, text in replace.items():
            (folder / rel).write_text(text)
        return str(folder)

    tokenizer_without_mask = work / "nomask"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.mask_token = None
    tok.save_pretrained(tokenizer_without_mask)

    # a finished run whose folder must stay as it is
    used = recipe("used")
    from retromae.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["pretrain", used]) == 0, "the reference run must succeed"
    used_dir = work / "runs" / "used"

    def hold_lock():
        from retromae.runs import _lock, _sign

        (work / "runs" / "locked").mkdir(parents=True, exist_ok=True)
        handle = _lock(work / "runs" / "locked")
        _sign(handle)
        return handle.close

    queries = (task / "queries.jsonl").read_text().splitlines()
    mined = write("mined.jsonl", '{"query_id": "q0", "query": "a question", "positive_ids": []}\n')
    other_dir = work / "elsewhere"
    other_dir.mkdir()
    relative_recipe = work / "relative.yaml"
    relative_recipe.write_text(Path(recipe("relative_base")).read_text().replace(str(corpus), "data/corpus.jsonl"))

    teacher = write("t.tsv", "q0\tdoc0\thigh\n")
    P, E = "pretrain", "evaluate"
    ev = ["--model", str(model), "--precision", "no"]
    issue19 = issue19_inputs(work, model, task, corpus, recipe, write, copy_task)
    return [
        # ---- issue 9: tracebacks instead of one-line errors
        Case("model folder that does not exist", [P, recipe("m1", model={"name_or_path": "runs/nothing/model"})],
             "error", [r"no such folder \(relative to "]),
        Case("hub id while the hub is unreachable", [P, recipe("m2", model={"name_or_path": "someone/no-such-model"})],
             "error", [r"not a local folder .* the hub could not provide it"]),
        Case("corpus smaller than one batch", [P, recipe("small", train={"per_device_batch_size": 4096})], "error",
             [r"fewer than one global batch"]),
        Case("scheduler misspelt", [P, recipe("sched"), "train.scheduler=cosin"], "error",
             [r"command-line override 'train.scheduler=cosin'", r"Did you mean 'cosine'"]),
        Case("negative learning rate", [P, recipe("lr"), "train.lr=-1"], "error", [r"train.lr=-1.0 must be > 0"]),
        Case("IVF index larger than the corpus", [E, *ev, "--dataset", str(task), "--index", "IVF4096,Flat"], "error",
             [r"4096 clusters need at least 4096 training vectors", r"use IVF\d+,Flat"]),
        # ---- bad data accepted silently
        Case("TSV row with the wrong number of columns",
             [P, recipe("tsv", data={"corpus": [write("c.tsv", "0\tfirst text\n6\n2\tthird text\n")]})], "error",
             [r"c\.tsv:2: has 1 tab-separated column"]),
        Case("duplicate query ids", [E, *ev, "--dataset", copy_task(
            "dupq", {"queries.jsonl": "\n".join(queries + [queries[0]]) + "\n"})], "error",
             [r"queries\.jsonl:\d+: query id 'q0' appears twice \(first at line 1\)"]),
        Case("duplicate document ids", [E, *ev, "--dataset", copy_task(
            "dupd", {"corpus.jsonl": (task / "corpus.jsonl").read_text()
                     + (task / "corpus.jsonl").read_text().splitlines()[0] + "\n"})], "error", [r"corpus\.jsonl:\d+: document id 'doc0' appears twice"]),
        # ---- harmless input refused
        Case("trailing blank lines in JSON lines", [P, recipe("blank", data={"corpus": [write(
            "blank.jsonl", corpus.read_text() + "\n\n")]})], "ok"),
        Case("UTF-8 byte-order mark", [P, recipe("bom", data={"corpus": [write(
            "bom.jsonl", b"\xef\xbb\xbf" + corpus.read_bytes())]})], "ok"),
        Case("mixed_precision: no in YAML", [P, write("mpno.yaml", Path(recipe("mpno")).read_text().replace(
            "mixed_precision: 'no'", "mixed_precision: no"))], "ok"),
        # ---- messages that point to the wrong place
        Case("bad command-line override", [P, recipe("over"), "train.per_device_batch_size=zero"], "error",
             [r"^command-line override 'train.per_device_batch_size=zero'"]),
        Case("recipe's relative path run from another folder", [P, str(relative_recipe)], "error",
             [r"data/corpus\.jsonl: file not found \(relative to .*elsewhere\)"], cwd=other_dir),
        Case("fine-tuning before mining", ["finetune", str(ROOT / "finetune" / "nfcorpus_small.yaml"),
                                           f"model.name_or_path={model}", f"train.output_dir={work / 'ft'}"],
             "error", [r"runs/nfcorpus_mined\.jsonl: training data not found", r"retromae mine"], cwd=other_dir),
        Case("--dataset NAME with no such folder, offline", [E, *ev, "--dataset", "adi"], "error",
             [r"adi: no local folder of that name"]),
        # ---- output folders
        Case("new run into a used output folder", [P, used], "error", [r"holds another run", r"train.overwrite=true"],
             untouched=used_dir),
        Case("resume with other settings", [P, used, "train.resume=latest", "objective.mask_ratio=0.4"], "error",
             [r"objective.mask_ratio: 0.3 -> 0.4"], untouched=used_dir),
        Case("second run while the folder is in use", [P, recipe("locked")], "error",
             [rf"in use by another run \(process {os.getpid()}"], setup=hold_lock),
        # ---- from the earlier issues: corpus, config, tokenizer, evaluation data, fine-tuning data
        Case("corpus line that is not JSON", [P, recipe("notjson", data={"corpus": [write(
            "bad.jsonl", '{"text": "fine"}\n{"text": "broken"\n')]})], "error", [r"bad\.jsonl:2: not valid JSON"]),
        Case("corpus line without a text field", [P, recipe("notext", data={"corpus": [write(
            "notext.jsonl", '{"text": "fine"}\n{"title": "no text"}\n')]})], "error",
             [r"notext\.jsonl:2: no 'text' field"]),
        Case("empty text", [P, recipe("empty", data={"corpus": [write(
            "empty.jsonl", '{"text": "fine"}\n{"text": "  "}\n')]})], "error", [r"empty\.jsonl:2: empty text"]),
        Case("corpus not in UTF-8", [P, recipe("latin", data={"corpus": [write(
            "latin.txt", b"fine\nd\xe9j\xe0 vu\n")]})], "error", [r"latin\.txt:2: not UTF-8"]),
        Case("missing corpus file", [P, recipe("missing", data={"corpus": [str(work / "none.jsonl")]})], "error",
             [r"none\.jsonl: file not found"]),
        Case("unknown config key", [P, recipe("unknown", train={"per_device_batchsize": 4})], "error",
             [r"unknown\.yaml:\d+: unknown key 'train.per_device_batchsize'. Did you mean 'per_device_batch_size'"]),
        Case("unknown objective", [P, recipe("obj"), "objective.name=retro"], "error",
             [r"'retro' is not a known objective"]),
        Case("tokenizer without a mask token", [P, recipe("nomask", model={"tokenizer": str(tokenizer_without_mask)})],
             "error", [r"has no mask token"]),
        Case("qrel naming an unknown query", [E, *ev, "--dataset", copy_task(
            "badqrel", {"qrels/test.tsv": "query-id\tcorpus-id\tscore\nq0\tdoc0\t1\nnope\tdoc1\t1\n"})], "error",
             [r"test\.tsv:3: query id 'nope' is not in the query file"]),
        Case("missing qrels split", [E, *ev, "--dataset", str(task), "--split", "dev"], "error",
             [r"qrels/dev\.tsv: file not found .*splits here: test, train"]),
        Case("unknown metric", [E, *ev, "--dataset", str(task), "--metrics", "ndcg"], "error",
             [r"metric 'ndcg' needs a cut-off"]),
        Case("mined query without a positive", ["finetune", str(ROOT / "finetune" / "nfcorpus_small.yaml"),
                                                f"model.name_or_path={model}", f"data.train={mined}",
                                                f"data.corpus={task}", f"dev.dataset={task}",
                                                f"train.output_dir={work / 'ft2'}"], "error",
             [r"mined\.jsonl:1: query 'q0' has no positive"]),
        Case("teacher score that is not a number", ["finetune", str(ROOT / "finetune" / "nfcorpus_small.yaml"),
                                                    f"model.name_or_path={model}", f"data.train={task}",
                                                    "data.negatives=null", "data.corpus=null",
                                                    f"data.teacher_scores={teacher}",
                                                    "dev.dataset=null", f"train.output_dir={work / 'ft3'}"],
             "error", [r"t\.tsv:1: score 'high' is not a number"]),
        *issue19,
    ]


def issue19_inputs(work: Path, model: Path, task: Path, corpus: Path, recipe, write, copy_task) -> list[Case]:
    """A newcomer's first hour (issue 19): inputs that gave a traceback or a silent wrong result."""
    import shutil

    import datasets

    weights_only = work / "weights_only"  # a model folder whose tokenizer files were not copied
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, weights_only / name)
    saved = work / "saved_dataset"
    datasets.Dataset.from_dict({"body": ["a text", "another text"] * 20}).save_to_disk(str(saved))
    greek = write("greek.txt", "Η γρήγορη καφέ αλεπού πηδάει πάνω από το τεμπέλικο σκυλί και τρέχει μακριά\n" * 40)
    zwsp_jsonl = write("zwsp.jsonl", corpus.read_text() + json.dumps({"text": "\u200b\u200b"}) + "\n")
    zwsp_txt = write("zwsp.txt", "".join(json.loads(line)["text"] + "\n\u200b\n" for line in
                                         corpus.read_text().splitlines()[:60]))
    other_ids = copy_task("other_ids", {"qrels/test.tsv": "query-id\tcorpus-id\tscore\nq0\tMED-10\t1\nq1\tMED-11\t1\n"})
    pairs = write("pairs.tsv", "what is a cat\ta small animal\njust one column here\n")
    study = tiny_study(work, model, task, write)
    P, E, F = "pretrain", "evaluate", "finetune"
    ev = ["--model", str(model), "--precision", "no"]
    ft = [F, str(ROOT / "finetune" / "own_data.yaml"), f"model.name_or_path={model}", f"data.train={task}",
          "train.mixed_precision=no", "train.report_to=none"]
    return [
        Case("model folder without tokenizer files (pretrain)", [P, recipe("notok", model={"name_or_path": str(
            weights_only)})], "error", [r"weights_only': the folder .* holds no tokenizer"]),
        Case("model folder without tokenizer files (evaluate)", [E, "--model", str(weights_only), "--dataset",
                                                                 str(task)], "error",
             [r"--model='.*weights_only': the folder .* holds no tokenizer"]),
        Case("model folder without tokenizer files (fine-tuning)", [F, str(ROOT / "finetune" / "own_data.yaml"),
                                                                    f"model.name_or_path={weights_only}",
                                                                    f"data.train={task}"], "error",
             [r"holds no tokenizer"]),
        Case("a BEIR folder as data.corpus", [P, recipe("folder", data={"corpus": [str(task)]})], "error",
             [r"task: is a folder, not a corpus file; give the corpus file in it: data\.corpus=\[.*corpus\.jsonl\]"]),
        Case("a dataset folder without the text field", [P, recipe("hfdir", data={"corpus": [str(saved)]})],
             "error", [r"saved_dataset row 0: no 'text' field \(fields: body\)"]),
        Case("data.max_len above the model's positions", [P, recipe("long", data={"max_len": 2048})], "error",
             [r"data\.max_len=2048 is more than the 128 positions of model"]),
        Case("--passage-max-len above the model's positions", [E, *ev, "--dataset", str(task), "--passage-max-len",
                                                               "2048"], "error",
             [r"--passage-max-len=2048 is more than the 128 positions"]),
        Case("--query-max-len above the model's positions (suite)", [E, *ev, "--suite", str(
            ROOT / "eval" / "local.yaml"), "--query-max-len", "512"], "error",
             [r"--query-max-len=512 is more than the 128 positions"]),
        Case("data.passage_max_len above the model's positions (fine-tuning)",
             [*ft, "data.passage_max_len=1024", f"train.output_dir={work / 'ft_long'}"], "error",
             [r"data\.passage_max_len=1024 is more than the 128 positions"]),
        Case("judgements that name no document of the corpus", [E, *ev, "--dataset", other_ids], "error",
             [r"test\.tsv:2: none of the 2 judgements names a document of the corpus \(e\.g\. 'MED-10'\)"]),
        Case("a line of zero-width spaces in JSON lines", [P, recipe("zwsp", data={"corpus": [zwsp_jsonl]})],
             "error", [r"zwsp\.jsonl:201: empty text \(only invisible characters"]),
        Case("lines of zero-width spaces in plain text (blank lines)", [P, recipe("zwsptxt", data={
            "corpus": [zwsp_txt]})], "ok"),
        Case("a corpus the tokenizer cannot read", [P, recipe("greek", data={"corpus": [greek]})], "warn",
             [r"greek\.txt: \d+\.\d% of the tokens of 40 sampled texts are \[UNK\]"]),
        Case("a study whose control has 2 seeds", ["study", study], "output",
             [r"\| BM25 \(reference\) \|.*\(noise unknown\) \|", r"σ: not given, noise unknown: the control has 2 seed"]),
        Case("a suite that finds none of its datasets", [E, *ev, "--suite", str(ROOT / "eval" / "local.yaml")],
             "error", [r"none of its datasets \(nfcorpus, cranfield, cisi, medline, adi\) is under",
                       r"`retromae data get nfcorpus`"]),
        Case("retromae data get: a misspelt name", ["data", "get", "nfcorpu"], "error",
             [r"nfcorpu: not a dataset `retromae data get` knows\. Did you mean 'nfcorpus'\?"]),
        Case("retromae data get: a BEIR dataset that is not public", ["data", "get", "bioasq"], "error",
             [r"bioasq: a BEIR dataset that is not public"]),
        Case("retromae data get: no server answers", ["data", "get", "scifact", "--root", str(work / "data"),
                                                      "--mirror", "http://127.0.0.1:9"], "error",
             [r"scifact\.zip: download failed \(.*refused.*\)"], untouched=work / "data"),
        Case("retromae data pairs: a line without a tab", ["data", "pairs", pairs, "--output", str(work / "mine")],
             "error", [r"pairs\.tsv:2: expected 'query<TAB>passage', got 1 tab-separated column"]),
    ]


def tiny_study(work: Path, model: Path, task: Path, write) -> str:
    """A study of the control alone, 2 seeds of 1 fine-tuning step each, on the tiny model."""
    finetune = write("study_ft.yaml", json.dumps({
        "data": {"train": str(task), "group_size": 1, "query_max_len": 24, "passage_max_len": 32},
        "loss": {"similarity": "cosine", "pooling": "mean"},
        "train": {"per_device_batch_size": 8, "max_steps": 1, "report_to": "none", "mixed_precision": "no"}}))
    suite = write("study_suite.yaml", f"name: s\ndata_root: {task.parent}\ndatasets: [{task.name}]\n"
                  "search:\n  metrics: [ndcg@10]\nencode:\n  precision: 'no'\n")
    return write("study.yaml", json.dumps({
        "name": "two seeds", "output_dir": str(work / "study"), "model": str(model), "finetune": finetune,
        "suite": suite, "arms": [{"name": "control", "objective": None, "seeds": [1, 2]}]}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    import logging

    logging.disable(logging.INFO)  # the table is the output (warnings are read by "warn" cases)
    with tempfile.TemporaryDirectory(prefix="retromae-bad-inputs-") as tmp:
        work = Path(tmp)
        os.environ["RETROMAE_DATA"] = str(work / "no_data")  # the recipes' data root: nothing in it
        rows = [run_case(case) for case in build_cases(work)]
    lines = ["| case | outcome | message (one line) |", "|---|---|---|"]
    for r in rows:
        verdict = "ok" if not r["problems"] else "FAILED: " + "; ".join(r["problems"])
        message = r["result"].replace(str(work), "<tmp>").replace(os.getcwd(), "<cwd>").replace("|", "\\|")
        lines.append(f"| {r['case']} | {verdict} | {message} |")
    failed = sum(1 for r in rows if r["problems"])
    table = "\n".join(lines)
    print(table)
    print(f"{len(rows)} cases in {sum(r['seconds'] for r in rows):.0f} s")
    print(f"failed={failed}")
    if args.markdown:
        from retromae.io import atomic_write_text

        atomic_write_text(args.markdown, "# Bad inputs: what each gives\n\nMade by `python scripts/bad_inputs.py "
                          f"--markdown {args.markdown}`. A case fails on a traceback, a bad input accepted, a harmless "
                          "one refused, a message that does not name what it must, or a file changed.\n\n"
                          + table + f"\n\nfailed={failed}\n")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
