"""Memory of the fine-tuning data, `retromae mine` and `retromae evaluate` at MS MARCO's size, per process of a
launch: measured on a real 2-process launch at a chosen size, projected to one of 8 processes on MS MARCO.

    python scripts/bench_scale.py [--passages 1000000] [--queries 100000] [--triples 20000000] [--dev 2000]

Generates MS MARCO-format files with synthetic text (collection.tsv, queries.train.tsv, qrels.train.tsv,
qidpidtriples.train.tsv, a teacher-score file of 30 pairs per query, queries/qrels.dev.small.tsv; nothing is
downloaded) and tiny random encoders (2 layers, 32 and 128 dims: the point is the data structures, not the model),
then runs each stage as `accelerate launch --multi_gpu --num_processes 2` on the CPU, with the settings a user gets
by default (`MineConfig()`: depth 100; evaluation with eval/msmarco_dev.yaml's metrics, MRR@10, R@50, R@1000, so
depth 1000; the default search backend, index and work folder; texts cut to 40 tokens, the encoder's own limit
being 64):
- data:     the fine-tuning data (collection, queries, positives, a per-query sample of 30 negatives from the
            triples, teacher scores) and 20 batches built from it, in every process;
- mine:     `retromae mine` of every training query;
- evaluate: `retromae evaluate` on the dev queries.

Each process samples its own /proc/self/smaps_rollup every 0.2 s and reports, above its memory after the imports:
the peak of its private memory (USS: pages no other process maps, Private_Clean + Private_Dirty, the part that is
its own to pay for), and apart from it the clean file-backed part of that (pages of memory-mapped files read by this
process alone, which the kernel can drop), its anonymous memory, and the peak of the shared pages (memory-mapped
files that both processes read: the collection table, the id index, the query shards; paid once per machine).

Projection to one of 8 processes on MS MARCO (8.8M passages, 502,939 training queries, 6,980 dev queries, 768
dims): each stage runs at half and at full size (passages, queries and triples together), which splits the larger
process's private peak into a fixed part and a part that grows; the grown part is scaled by the larger of MS MARCO's
ratios (passages per process, training or dev queries per process's search) to the measured ones, which over-counts
whichever grows less. Each stage also runs at 128 dims at full size: the difference to 32 dims, per dimension, times
(768 - 32), is the part that grows with the vectors' width. The main process of `evaluate` merges every process's
results (8 at MS MARCO, 2 here) a block of 2,048 queries at a time, so that part does not grow with the processes.
Printed: a table, and last, projected_gb=<the largest stage>.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MS_MARCO = {"passages": 8_841_823, "queries": 502_939, "dev": 6_980, "dim": 768, "processes": 8}
PROCESSES = 2  # the measured launch
FIELDS = ("Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty", "Anonymous", "Pss")


def smaps() -> dict[str, float]:
    """This process's memory in MB from /proc/self/smaps_rollup: uss, file (private clean: file pages), anon, shared."""
    values = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in FIELDS:
                values[name] = int(rest.split()[0]) / 1024
    return {"uss": values["Private_Clean"] + values["Private_Dirty"], "file": values["Private_Clean"],
            "anon": values["Anonymous"], "shared": values["Shared_Clean"] + values["Shared_Dirty"], "pss": values["Pss"]}


class Monitor:
    """Samples smaps() every `every` seconds in a thread; the peak of each measure, and the measures at the USS peak."""

    def __init__(self, every: float = 0.2):
        self.baseline = smaps()
        self.peaks = dict(self.baseline)
        self.at_peak = dict(self.baseline)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.2):
            self.sample()

    def sample(self) -> None:
        now = smaps()
        if now["uss"] > self.peaks["uss"]:
            self.at_peak = now
        self.peaks = {k: max(v, now[k]) for k, v in self.peaks.items()}

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        self.sample()
        return {"baseline": self.baseline, "peak": self.peaks, "at_peak": self.at_peak}


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


# ----- a stage, in each process of the launch ------------------------------------------------------------------


def stage(name: str, folder: Path, model: Path, out: Path) -> None:
    import faiss  # noqa: F401  (the libraries first: their code is not the data's memory)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from retromae.distributed import process_state
    from retromae.finetune import data as _data, mine as _mine  # noqa: F401
    from retromae.retrieval import evaluate as _evaluate  # noqa: F401
    from retromae.retrieval.encoder import EncodeConfig

    state = process_state()
    state.wait_for_everyone()
    monitor = Monitor()
    started = time.perf_counter()
    encode = EncodeConfig(passage_max_len=40, query_max_len=16)
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

        summary = mine_negatives(str(model), str(folder), str(folder / "mined.jsonl"), "train", encode, MineConfig())
        detail = {"depth": MineConfig().depth, **({"negatives_per_query": round(summary["negatives_per_query"], 1)}
                                                  if summary else {})}
    else:
        from retromae.retrieval.evaluate import evaluate_model, load_suite

        search = load_suite(str(ROOT / "eval" / "msmarco_dev.yaml")).search
        result = evaluate_model(str(model), str(folder), "dev.small", encode, search,
                                output=str(folder / "dev.json"))
        detail = {"depth": search.retrieval_depth(), **({"mrr@10": round(result["mrr@10"], 4)} if result else {})}
    state.wait_for_everyone()
    record = {"stage": name, "rank": state.process_index, "seconds": time.perf_counter() - started, **monitor.stop(),
              **detail}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(record))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(name: str, folder: Path, model: Path, cache: Path, out: Path) -> list[dict]:
    """The stage under a 2-process CPU launch; each process's record."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RETROMAE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), __file__, "--stage", name, "--folder", str(folder), "--model", str(model), "--out",
               str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(PROCESSES)
               if (out / f"rank{r}.json").is_file()]
    if done.returncode != 0 or len(records) != PROCESSES:
        raise SystemExit(f"stage {name} failed:\n{done.stderr[-3000:]}")
    return records


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
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage(args.stage, Path(args.folder), Path(args.model), Path(args.out))
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

    models = {d: work / f"model-{d}" for d in (32, 128)}
    for dim, path in models.items():
        make_tiny_model(path, [" ".join(_stems())] * 20, vocab_size=1000, hidden=dim, layers=2, max_positions=64)
    rows = []
    for size, fraction in (("half", 0.5), ("full", 1.0)):
        counts = {k: int(getattr(args, k) * fraction) for k in ("passages", "queries", "triples")}
        folder = work / size
        started = time.perf_counter()
        generate(folder, counts["passages"], counts["queries"], counts["triples"], args.dev)
        print(f"{size}: generated {counts} in {time.perf_counter() - started:.0f} s", flush=True)
        for name in ("data", "mine", "evaluate"):
            for dim in (32, 128) if size == "full" and name != "data" else (32,):
                records = run_stage(name, folder, models[32 if name == "data" else dim], work / f"cache-{size}-{dim}",
                                    work / "records" / f"{size}-{name}-{dim}")
                for record in records:
                    rows.append({**record, "size": size, "dim": dim, **counts})
                    above = {k: record["peak"][k] - record["baseline"][k] for k in ("uss", "file", "anon", "shared")}
                    print(f"  {name:9s} dim {dim:3d} process {record['rank']}: private peak {above['uss']:7.0f} MB "
                          f"(file-backed {above['file']:.0f}, anonymous {above['anon']:.0f}), shared peak "
                          f"{record['peak']['shared']:.0f} MB; imports {record['baseline']['uss']:.0f} MB; "
                          f"{record['seconds']:.0f} s", flush=True)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    report(rows, args)


def private_peak(rows: list[dict], name: str, size: str, dim: int) -> dict:
    """The process with the larger private peak (above its imports) for this stage, size and width."""
    found = [r for r in rows if (r["stage"], r["size"], r["dim"]) == (name, size, dim)]
    return max(found, key=lambda r: r["peak"]["uss"] - r["baseline"]["uss"])


def above(record: dict, key: str = "uss") -> float:
    return record["peak"][key] - record["baseline"][key]


def report(rows: list[dict], args) -> None:
    print("\n| stage | half size, private MB | full size, private MB (file-backed; anonymous) | shared MB (peak) | "
          "128 dims, private MB | fixed MB | grows MB | per dim MB | MS MARCO, 1 of 8 processes, GB |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    projections = {}
    for name in ("data", "mine", "evaluate"):
        half, full = private_peak(rows, name, "half", 32), private_peak(rows, name, "full", 32)
        grows_by = above(full) - above(half)
        fixed = above(full) - grows_by / 0.5  # the fit at zero size: full = fixed + grows (half = fixed + grows / 2)
        grown = 2 * grows_by  # the growing part at full size
        ratios = [MS_MARCO["passages"] / MS_MARCO["processes"] / (args.passages / PROCESSES)]
        if name in ("data", "mine"):
            ratios.append(MS_MARCO["queries"] / args.queries)
        else:
            ratios.append(MS_MARCO["dev"] / args.dev)
        scale = max(ratios)
        per_dim = 0.0
        wide = "–"
        if name != "data":
            at128 = private_peak(rows, name, "full", 128)
            per_dim = (above(at128) - above(full)) / (128 - 32)
            wide = f"{above(at128):.0f}"
        imports = full["baseline"]["uss"]
        projected = (imports + fixed + max(0.0, grown) * scale + per_dim * (MS_MARCO["dim"] - 32)) / 1024
        projections[name] = projected
        print(f"| {name} | {above(half):.0f} | {above(full):.0f} ({above(full, 'file'):.0f}; {above(full, 'anon'):.0f}) "
              f"| {full['peak']['shared']:.0f} | {wide} | {fixed:.0f} | {grown:.0f} (x{scale:.1f}) | {per_dim:.2f} | "
              f"{projected:.1f} |")
    print(f"\nmeasured: {PROCESSES} processes, {args.passages:,} passages ({args.passages // PROCESSES:,} per process), "
          f"{args.queries:,} training queries, {args.dev:,} dev queries; projected: {MS_MARCO['processes']} processes, "
          f"{MS_MARCO['passages']:,} passages, {MS_MARCO['queries']:,} queries, {MS_MARCO['dev']:,} dev, 768 dims; "
          "private = USS above the imports (imports added back in the projection)")
    print(f"projected_gb={max(projections.values()):.1f}")


if __name__ == "__main__":
    main()
