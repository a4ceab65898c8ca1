"""Memory of the fine-tuning data, `retromae mine` and `retromae evaluate` on MS MARCO-format data, measured at a
chosen size and projected to MS MARCO's: does a process of an 8-GPU run fit?

    python scripts/bench_scale.py [--passages 1000000] [--queries 100000] [--triples 20000000] [--dev 2000]

Generates MS MARCO-format files with synthetic text (collection.tsv, queries.train.tsv, qrels.train.tsv,
qidpidtriples.train.tsv, a teacher-score file of 30 pairs per query, queries/qrels.dev.small.tsv; nothing is
downloaded) and a tiny random encoder (2 layers, 32 dims: the point is the data structures, not the model), then
runs each stage in a fresh process and reads its peak resident memory (above the memory of the imports):
- data:     the fine-tuning data (collection, queries, positives, a per-query sample of 30 negatives streamed from
            the triples, teacher scores), and a few batches built from it;
- mine:     `retromae mine` of every training query (depth 50);
- evaluate: `retromae evaluate` on the dev queries (depth 1000).
Each stage runs at half and at full size, so that its memory splits into a fixed part and a part that grows with
the data; mine and evaluate also run at 128 dims, which checks the count of the vector arrays (the part that grows
with the dimension) against what the code holds: the corpus shard twice (its memory-mapped file and the index's
copy) and every query vector twice (the shards and their concatenation).

Projection to MS MARCO (8.8M passages, 500k training queries, 6,980 dev queries, 397M triples, 768 dims) for one
process of an 8-process launch: fixed + data part x (8.8M / passages measured) + the vector arrays at 768 dims with
1/8 of the corpus per process (the stages shard the corpus by process; queries, results and the collection's id
index are not sharded and are counted whole). Printed: a table, and last, projected_gb=<the largest stage>.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MS_MARCO = {"passages": 8_841_823, "queries": 502_939, "dev": 6_980, "dim": 768, "processes": 8}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----- the data --------------------------------------------------------------------------------------------


def generate(folder: Path, passages: int, queries: int, triples: int, dev: int, seed: int = 0) -> None:
    """MS MARCO-format files with synthetic text: passages of 30-60 words drawn from 2,000 words, queries of 4-9."""
    import numpy as np
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array([f"{a}{b}" for a in ("pre", "con", "dis", "re", "un", "sub", "inter", "over") for b in
                      _stems()])
    with open(folder / "collection.tsv", "w", encoding="utf-8") as f:
        for start in range(0, passages, 100_000):
            n = min(100_000, passages - start)
            lengths = rng.integers(30, 61, n)
            ids = rng.integers(0, len(words), int(lengths.sum()))
            cuts = np.cumsum(lengths)[:-1]
            f.write("".join(f"{start + i}\t{' '.join(w)}\n" for i, w in enumerate(np.split(words[ids], cuts))))
    positive = rng.integers(0, passages, queries)
    for name, count, offset in (("train", queries, 0), ("dev.small", dev, 10_000_000)):
        lengths = rng.integers(4, 10, count)
        ids = rng.integers(0, len(words), int(lengths.sum()))
        texts = [" ".join(w) for w in np.split(words[ids], np.cumsum(lengths)[:-1])]
        (folder / f"queries.{name}.tsv").write_text("".join(f"{offset + q}\t{t}\n" for q, t in enumerate(texts)))
        relevant = positive if name == "train" else rng.integers(0, passages, count)
        (folder / f"qrels.{name}.tsv").write_text("".join(f"{offset + q} 0 {p} 1\n" for q, p in enumerate(relevant)))
    for start in range(0, triples, 2_000_000):  # qid, its positive, a random negative (as BM25 triples look)
        n = min(2_000_000, triples - start)
        q = rng.integers(0, queries, n)
        frame = pd.DataFrame({"q": q, "p": positive[q], "n": rng.integers(0, passages, n)})
        frame.to_csv(folder / "qidpidtriples.train.tsv", sep="\t", header=False, index=False,
                     mode="w" if start == 0 else "a")
    q = np.repeat(np.arange(queries), 30)
    frame = pd.DataFrame({"q": q, "p": rng.integers(0, passages, len(q)), "s": rng.standard_normal(len(q))})
    frame.to_csv(folder / "teacher.tsv", sep="\t", header=False, index=False, float_format="%.3f")


def _stems() -> list[str]:
    return [f"{c}{v}{e}" for c in "bcdfglmnprst" for v in ("a", "e", "i", "o", "u") for e in ("n", "r", "s", "t")]


# ----- the stages (each in its own process) ------------------------------------------------------------------


def stage(name: str, folder: Path, model: Path, dim_model: Path) -> dict:
    import faiss  # noqa: F401  (the libraries first: their code is not the data's memory)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from retromae.finetune import data as _data, mine as _mine  # noqa: F401
    from retromae.retrieval import evaluate as _evaluate  # noqa: F401
    from retromae.retrieval.encoder import EncodeConfig

    before = rss_mb()
    started = time.perf_counter()

    encode = EncodeConfig(precision="no", passage_max_len=40, query_max_len=16, batch_size=512)
    if name == "data":
        from transformers import AutoTokenizer

        from retromae.finetune.data import GroupBatch, check_teacher_coverage, load_training_data, read_teacher_scores

        data = load_training_data(str(folder), "msmarco", negatives=str(folder / "qidpidtriples.train.tsv"),
                                  negatives_per_query=30)
        teacher = read_teacher_scores(str(folder / "teacher.tsv"))
        check_teacher_coverage(data, teacher, "teacher.tsv")
        make = GroupBatch(data, AutoTokenizer.from_pretrained(model), 16, 16, 40, 1, teacher=teacher)
        for b in range(20):
            make([(b * 64 + j) % len(data) for j in range(64)], 0)
        detail = {"queries": len(data), "negatives": int(data.negatives.values.size), "teacher_pairs": len(teacher)}
    elif name == "mine":
        from retromae.finetune.mine import MineConfig, mine_negatives

        summary = mine_negatives(str(dim_model), str(folder), str(folder / "mined.jsonl"), "train", encode,
                                 MineConfig(depth=50))
        detail = {"queries": summary["queries"]}
    else:
        from retromae.retrieval.evaluate import SearchConfig, evaluate_model

        result = evaluate_model(str(dim_model), str(folder), "dev.small", encode,
                                SearchConfig(metrics=["mrr@10", "recall@1000"]))
        detail = {"queries": result["num_queries"], "mrr@10": round(result["mrr@10"], 4)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"stage": name, "peak_mb": peak - before, "imports_mb": before, "seconds": time.perf_counter() - started,
            **detail}


def run_stage(name: str, folder: Path, model: Path, dim_model: Path, cache: Path) -> dict:
    env = {**os.environ, "RETROMAE_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, __file__, "--stage", name, "--folder", str(folder), "--model", str(model),
                           "--dim-model", str(dim_model)], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"stage {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def vector_mb(stage_name: str, passages: int, queries: int, dev: int, dim: int, processes: int = 1) -> float:
    """The vector arrays a process holds (see the module docstring), in MB."""
    shard = passages / processes
    count = {"data": 0, "mine": 2 * shard + 2 * queries, "evaluate": 2 * shard + 2 * dev}[stage_name]
    return count * dim * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--triples", type=int, default=20_000_000)
    parser.add_argument("--dev", type=int, default=2000)
    parser.add_argument("--work", default=None, help="folder for the generated data (default: a temporary one)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dim-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, Path(args.folder), Path(args.model), Path(args.dim_model))))
        return
    import shutil

    work = Path(args.work or tempfile.mkdtemp(prefix="retromae-bench-scale-"))
    try:
        measure(work, args)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def measure(work: Path, args) -> None:
    from retromae.tiny import make_tiny_model

    sizes = {"half": 0.5, "full": 1.0}
    models = {d: work / f"model-{d}" for d in (32, 128)}
    for dim, path in models.items():
        make_tiny_model(path, [" ".join(_stems())] * 20, vocab_size=1000, hidden=dim, layers=2, max_positions=64)
    rows = []
    for size, fraction in sizes.items():
        counts = {k: int(getattr(args, k) * fraction) for k in ("passages", "queries", "triples")}
        folder = work / size
        started = time.perf_counter()
        generate(folder, counts["passages"], counts["queries"], counts["triples"], args.dev)
        print(f"{size}: generated {counts} in {time.perf_counter() - started:.0f} s", flush=True)
        for name in ("data", "mine", "evaluate"):
            for dim in (32, 128) if size == "full" and name != "data" else (32,):
                result = run_stage(name, folder, models[32], models[dim], work / f"cache-{size}-{dim}")
                rows.append({**result, "size": size, "dim": dim, **counts})
                print(f"  {name:9s} dim {dim:3d}: peak {result['peak_mb']:8.0f} MB above "
                      f"{result['imports_mb']:.0f} MB of imports, {result['seconds']:.0f} s", flush=True)
        shutil_rmtree(folder)
    report(rows, args)


def shutil_rmtree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def report(rows: list[dict], args) -> None:
    full_scale = MS_MARCO["passages"] / args.passages
    print("\n| stage | half size MB | full size MB | 128 dims MB (vectors predicted) | fixed MB | grows MB per 1M "
          "passages | MS MARCO, 1 of 8 processes, GB |\n|---|---:|---:|---:|---:|---:|---:|")
    projections = []
    for name in ("data", "mine", "evaluate"):
        get = {(r["size"], r["dim"]): r for r in rows if r["stage"] == name}
        half, full = get[("half", 32)], get[("full", 32)]
        vec = lambda r, dim, procs=1: vector_mb(name, r["passages"], r["queries"], args.dev, dim, procs)  # noqa: E731
        rest_full, rest_half = full["peak_mb"] - vec(full, 32), half["peak_mb"] - vec(half, 32)
        grows = (rest_full - rest_half) / (full["passages"] - half["passages"]) * 1e6
        fixed = rest_full - grows * full["passages"] / 1e6
        queries_full = MS_MARCO["queries"] / args.queries * full["queries"]
        projected = (fixed + grows * MS_MARCO["passages"] / 1e6 + full["imports_mb"]
                     + vector_mb(name, MS_MARCO["passages"], queries_full, MS_MARCO["dev"], MS_MARCO["dim"],
                                 MS_MARCO["processes"])) / 1024
        projections.append(projected)
        check = "–"
        if ("full", 128) in get:
            measured = get[("full", 128)]["peak_mb"] - full["peak_mb"]
            check = f"{get[('full', 128)]['peak_mb']:.0f} (+{measured:.0f}; {vec(full, 128) - vec(full, 32):.0f})"
        print(f"| {name} | {half['peak_mb']:.0f} | {full['peak_mb']:.0f} | {check} | {fixed:.0f} | {grows:.0f} | "
              f"{projected:.1f} |")
    print(f"\nscale to MS MARCO: x{full_scale:.1f} passages, x{MS_MARCO['queries'] / args.queries:.1f} queries, "
          f"768 dims; {MS_MARCO['processes']} processes")
    print(f"projected_gb={max(projections):.1f}")


if __name__ == "__main__":
    main()
