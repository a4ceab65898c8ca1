"""Command line: `retromae pretrain | finetune CONFIG.yaml [key=value ...]`, `retromae evaluate`, `retromae mine`,
`retromae encode`, `retromae demo`.

Runs the same under `accelerate launch -m retromae ...` on one CPU or many GPUs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from retromae.config import ConfigError
from retromae.data.corpus import CorpusError
from retromae.masking import TokenizerError

USER_ERRORS = (ConfigError, CorpusError, TokenizerError, FileNotFoundError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retromae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain an encoder with a masked-autoencoder objective")
    p.add_argument("config", help="YAML recipe, e.g. pretrain/retromae_nfcorpus_small.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5 objective.decoding=basic")
    f = sub.add_parser("finetune", help="contrastive fine-tuning of a bi-encoder (in-batch, hard, cross-device negatives)")
    f.add_argument("config", help="YAML recipe, e.g. finetune/nfcorpus_small.yaml")
    f.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 data.group_size=16")
    m = sub.add_parser("mine", help="mine hard negatives for every training query with a model's dense retrieval")
    m.add_argument("--model", required=True, help="the model that retrieves (e.g. the stage-1 fine-tuned model)")
    m.add_argument("--data", required=True, help="BEIR folder (qrels split) or MS MARCO folder with training queries")
    m.add_argument("--output", required=True, help="the mined training file (JSON lines)")
    m.add_argument("--split", default="train", help="qrels split of a BEIR folder")
    m.add_argument("--depth", type=int, default=100, help="negatives kept per query")
    m.add_argument("--skip-top", type=int, default=0, help="ranks skipped after removing positives")
    m.add_argument("--index", default="Flat", help="faiss factory string")
    m.add_argument("--title-separator", default=" ")
    _add_encode_arguments(m)
    d = sub.add_parser("demo", help="pretrain all-MiniLM-L6-v2 with RetroMAE on standard-library docstrings")
    d.add_argument("--output-dir", default="runs/demo", help="where the corpus, logs and model go")
    d.add_argument("--config", default=None, help="recipe to use instead of pretrain/demo.yaml")
    d.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    e = sub.add_parser("evaluate", help="encode, index (FAISS), search and score a model on MS MARCO / BEIR data")
    e.add_argument("--model", required=True, help="model folder, hub id, or pkg:MODULE")
    target = e.add_mutually_exclusive_group(required=True)
    target.add_argument("--dataset", help="local BEIR or MS MARCO folder, or a BEIR name on the hub (e.g. nfcorpus)")
    target.add_argument("--suite", help="a suite recipe, e.g. eval/beir13.yaml (datasets found locally)")
    e.add_argument("--split", default=None, help="qrels split (default: test; dev.small for MS MARCO)")
    e.add_argument("--output", default=None, help="JSON of the results (a Markdown table with --suite)")
    e.add_argument("--run", default=None, help="write the run in TREC format here")
    e.add_argument("--data-root", default=None, help="with --suite: folder holding the datasets")
    _add_encode_arguments(e)
    e.add_argument("--metrics", nargs="+", default=None, help="e.g. ndcg@10 recall@100 mrr@10 map")
    e.add_argument("--depth", type=int, default=0, help="documents retrieved per query (0: largest cut-off, >= 100)")
    e.add_argument("--index", default="Flat", help="faiss factory string (Flat = exact inner product)")
    e.add_argument("--gpu-index", default="auto", choices=["auto", "true", "false"], help="faiss index on GPUs")
    e.add_argument("--keep-identical-ids", action="store_true", help="do not drop documents whose id is the query id")
    e.add_argument("--title-separator", default=None, help='between title and text (default " ")')
    e.add_argument("--representation", default="dense", choices=["dense", "dupmae"],
                   help="dupmae: [W h ; top-k mu] scored as dense dot + sparse dot")
    e.add_argument("--hybrid-search", default="exact", choices=["exact", "pooled"],
                   help="dupmae: exact sparse product, or a FAISS pool re-scored (large corpora)")
    e.add_argument("--candidate-pool", type=int, default=1000, help="dupmae pooled search: candidates per query")
    c = sub.add_parser("encode", help="encode a corpus into memory-mapped shards (one per process)")
    c.add_argument("--model", required=True)
    c.add_argument("--corpus", required=True, help="BEIR / MS MARCO folder, or a BEIR corpus.jsonl")
    c.add_argument("--output", required=True, help="folder for shard-*.npy and shard-*.ids")
    c.add_argument("--title-separator", default=" ")
    _add_encode_arguments(c)
    return parser


def _add_encode_arguments(p: argparse.ArgumentParser) -> None:
    """Encoding options; left out, they keep the recipe's (or EncodeConfig's) values."""
    p.add_argument("--pooling", choices=["auto", "cls", "mean"], help="default: auto (the model's own, else cls)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                   help="L2-normalise (default: as the model's sentence-transformers config says)")
    p.add_argument("--query-max-len", type=int, help="default 64")
    p.add_argument("--passage-max-len", type=int, help="default 256")
    p.add_argument("--query-prefix")
    p.add_argument("--passage-prefix")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--precision", choices=["auto", "no", "bf16", "fp16"], help="default: auto")


_ENCODE_FIELDS = ("pooling", "normalize", "query_max_len", "passage_max_len", "query_prefix", "passage_prefix",
                  "batch_size", "precision")


def _encode_config(args, base=None):
    from dataclasses import replace

    from retromae.retrieval.encoder import EncodeConfig

    given = {k: getattr(args, k) for k in _ENCODE_FIELDS if getattr(args, k) is not None}
    return replace(base or EncodeConfig(), **given)


def _evaluate(args) -> None:
    from dataclasses import asdict

    from retromae.retrieval.evaluate import SearchConfig, check_metrics, evaluate_model, format_table, load_suite, run_suite

    search_overrides = {"depth": args.depth, "index": args.index, "use_gpu": args.gpu_index,
                        "ignore_identical_ids": not args.keep_identical_ids, "representation": args.representation,
                        "hybrid_search": args.hybrid_search, "candidate_pool": args.candidate_pool}
    if args.metrics:
        check_metrics(args.metrics)
        search_overrides["metrics"] = args.metrics
    if args.title_separator is not None:
        search_overrides["title_separator"] = args.title_separator
    if args.suite:
        suite = load_suite(args.suite)
        suite.search = SearchConfig(**{**asdict(suite.search), **search_overrides,
                                       **({} if args.metrics else {"metrics": suite.search.metrics})})
        suite.encode = _encode_config(args, suite.encode)
        if args.data_root:
            suite.data_root = args.data_root
        if args.split:
            suite.split = args.split
        _, table = run_suite(args.model, suite, args.output)
        print("\n" + table)
        return
    search = SearchConfig(**search_overrides)
    result = evaluate_model(args.model, args.dataset, args.split, _encode_config(args), search, args.run, args.output)
    if result is not None:
        print(format_table([result], search.metrics))
        print(f"{result['num_queries']} queries, {result['num_documents']} documents, {result['seconds']} s; "
              f"settings: {result['settings']}")


def _encode(args) -> None:
    from pathlib import Path

    from retromae.distributed import process_state
    from retromae.retrieval.data import load_dataset, read_beir_corpus
    from retromae.retrieval.encoder import TextEncoder, encode_shard

    state = process_state()
    path = Path(args.corpus)
    if path.is_file():
        corpus = read_beir_corpus(path)
        ids = list(corpus)
        texts = [f"{d['title']}{args.title_separator}{d['text']}" if d["title"] else d["text"] for d in corpus.values()]
    else:
        ids, texts = load_dataset(args.corpus, None, args.title_separator).passages(args.title_separator)
    encoder = TextEncoder(args.model, _encode_config(args), device=state.device)
    shard = encode_shard(encoder, ids, texts, args.output, state.process_index, state.num_processes,
                         show_progress=state.is_main_process)
    print(f"process {state.process_index}: wrote {shard}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "pretrain":
            from retromae.pretrain import load_config, run

            run(load_config(args.config, args.overrides))
        elif args.command == "demo":
            from retromae.demo import run_demo

            run_demo(args.output_dir, args.config, args.overrides)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "encode":
            _encode(args)
        elif args.command == "finetune":
            from retromae.finetune.run import load_finetune_config, run as run_finetune

            run_finetune(load_finetune_config(args.config, args.overrides))
        elif args.command == "mine":
            from retromae.finetune.mine import MineConfig, mine_negatives

            summary = mine_negatives(args.model, args.data, args.output, args.split, _encode_config(args),
                                     MineConfig(args.depth, args.skip_top, args.index, args.title_separator))
            if summary:
                print(f"mined {summary['negatives_per_query']:.1f} negatives for each of {summary['queries']} "
                      f"queries into {summary['output']}")
    except USER_ERRORS as err:
        print(f"retromae: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
