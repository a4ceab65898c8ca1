"""Command line: `retromae pretrain | finetune CONFIG.yaml [key=value ...]`, `retromae evaluate`, `retromae mine`,
`retromae encode`, `retromae data get | list | pairs`, `retromae demo`.

Runs the same under `accelerate launch -m retromae ...` on one CPU or many GPUs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from retromae.config import ConfigError
from retromae.data.corpus import CorpusError
from retromae.interrupt import TrainingInterrupted
from retromae.masking import TokenizerError
from retromae.retrieval.metrics import DEFAULT_METRICS

DESCRIPTION = ("Retrieval-oriented pretraining of text encoders (RetroMAE and its family), contrastive fine-tuning and "
               "FAISS evaluation. Every command runs the same under `accelerate launch -m retromae ...`.")

USER_ERRORS = (ConfigError, CorpusError, TokenizerError, FileNotFoundError)

# Libraries that log routine events at INFO (accelerate at every checkpoint, faiss's loader about optional builds)
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock", "datasets", "accelerate", "faiss", "huggingface_hub",
                 "sentence_transformers", "torch.distributed", "tensorboard")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one worth showing (not None / False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _objective_names() -> str:
    from retromae.objectives.base import _REGISTRY, objective_class

    objective_class("mlm")  # imports every objective module
    return ", ".join(sorted(_REGISTRY))


def _parser() -> argparse.ArgumentParser:
    from retromae import __version__

    parser = argparse.ArgumentParser(prog="retromae", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"retromae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = _HelpFormatter
    p = sub.add_parser("pretrain", help="pretrain an encoder with a masked-autoencoder objective",
                       description="Pretrain an encoder. Objectives (objective.name): " + _objective_names()
                       + ". Recipes: pretrain/*.yaml.")
    p.add_argument("config", help="YAML recipe, e.g. pretrain/retromae_nfcorpus_small.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5 objective.decoding=basic")
    p.add_argument("--show-config", action="store_true", help="print every key (recipe and overrides applied) with "
                   "its value and what it does, and stop")
    r = sub.add_parser("prepare", help="tokenize and cut a pretraining corpus into the example cache, in parallel",
                       description="Build the example cache of a pretraining recipe with data.num_proc processes "
                       "(pretrain reuses it). Prints examples=<n> mean_length=<tokens per example> last.")
    r.add_argument("config", help="YAML recipe, e.g. pretrain/retromae_bert_base_wiki_bookcorpus.yaml")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.num_proc=16 data.corpus=[books.txt]")
    f = sub.add_parser("finetune", help="contrastive fine-tuning of a bi-encoder (in-batch, hard, cross-device negatives)")
    f.add_argument("config", help="YAML recipe, e.g. finetune/nfcorpus_small.yaml")
    f.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 data.group_size=16")
    f.add_argument("--show-config", action="store_true", help="print every key (recipe and overrides applied) with "
                   "its value and what it does, and stop")
    st = sub.add_parser("study", help="compare pretraining objectives on equal terms (pretrain, fine-tune, evaluate)",
                        description="Run every arm of a study (pretraining objective or none, the same fine-tuning "
                        "and evaluation), resumably; write study.json, study.md and study.png.")
    st.add_argument("config", help="YAML study, e.g. study/cpu.yaml")
    st.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=runs/s seeds=[1,2]")
    m = sub.add_parser("mine", help="mine hard negatives for every training query with a model's dense retrieval",
                       formatter_class=defaults)
    m.add_argument("--model", required=True, help="the model that retrieves (e.g. the stage-1 fine-tuned model)")
    m.add_argument("--data", required=True, help="BEIR folder (qrels split) or MS MARCO folder with training queries")
    m.add_argument("--output", required=True, help="the mined training file (JSON lines)")
    m.add_argument("--split", default="train", help="qrels split of a BEIR folder")
    m.add_argument("--depth", type=int, default=100, help="negatives kept per query")
    m.add_argument("--skip-top", type=int, default=0, help="ranks skipped after removing positives")
    m.add_argument("--index", default="Flat", help="faiss factory string")
    m.add_argument("--title-separator", default=" ")
    m.add_argument("--representation", choices=["dense", "splade"], default="dense",
                   help="splade: retrieve with the model's SPLADE vectors (exact sparse search)")
    _add_scratch_arguments(m)
    _add_encode_arguments(m)
    d = sub.add_parser("demo", help="pretrain all-MiniLM-L6-v2 with RetroMAE on standard-library docstrings")
    d.add_argument("--output-dir", default="runs/demo", help="where the corpus, logs and model go")
    d.add_argument("--config", default=None, help="recipe to use instead of pretrain/demo.yaml")
    d.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    e = sub.add_parser("evaluate", help="encode, index (FAISS), search and score a model on MS MARCO / BEIR data",
                       formatter_class=defaults)
    e.add_argument("--model", required=True, help="model folder, hub id, pkg:MODULE, or bm25 (the lexical baseline)")
    target = e.add_mutually_exclusive_group(required=True)
    target.add_argument("--dataset", help="local BEIR or MS MARCO folder, or a BEIR name on the hub (e.g. nfcorpus)")
    target.add_argument("--suite", help="a suite recipe, e.g. eval/beir13.yaml (datasets found locally)")
    e.add_argument("--split", default=None, help="qrels split (default: test; dev.small for MS MARCO)")
    e.add_argument("--output", default=None, help="JSON of the results (a Markdown table with --suite)")
    e.add_argument("--run", default=None, help="write the run in TREC format here")
    e.add_argument("--data-root", default=None, help="with --suite: folder holding the datasets")
    _add_scratch_arguments(e)
    _add_encode_arguments(e)
    # Search options default to None: left out, they keep the suite's (or SearchConfig's) values.
    e.add_argument("--metrics", nargs="+", help="e.g. ndcg@10 recall@100 mrr@10 map (default: " +
                   " ".join(DEFAULT_METRICS) + ")")
    e.add_argument("--depth", type=int, help="documents retrieved per query (default: the largest cut-off, >= 100)")
    e.add_argument("--index", help="faiss factory string (default: Flat, exact inner product)")
    e.add_argument("--gpu-index", choices=["auto", "true", "false"], help="search on GPUs (default: auto)")
    e.add_argument("--keep-identical-ids", action="store_const", const=True,
                   help="do not drop documents whose id is the query id (BEIR's rule; off by default for MS MARCO)")
    e.add_argument("--title-separator", help='between title and text (default " ")')
    e.add_argument("--representation", choices=["dense", "dupmae", "splade"],
                   help="dupmae: [W h ; top-k mu] scored as dense dot + sparse dot; splade: the MLM head's max-pooled "
                   "log(1 + ReLU) vocabulary vector, sparse search (default: dense)")
    e.add_argument("--sparse-index", choices=["exact", "seismic"],
                   help="splade: exact sparse products over an inverted index, or Seismic (default: exact)")
    e.add_argument("--seismic-query-cut", type=int, help="seismic: query terms visited (default: 10)")
    e.add_argument("--seismic-heap-factor", type=float, help="seismic: block pruning factor (default: 0.8)")
    e.add_argument("--seismic-postings", type=int, help="seismic: postings kept per term (default: 3500)")
    e.add_argument("--fuse", nargs="+", metavar="MODEL[:REPRESENTATION]",
                   help="fuse this model's run with these (e.g. runs/dense/model bm25): hybrid dense + sparse + BM25")
    e.add_argument("--fusion", choices=["rrf", "linear"], default="rrf",
                   help="with --fuse: reciprocal rank fusion, or a weighted sum of min-max normalised scores")
    e.add_argument("--fusion-weights", type=float, nargs="+", help="with --fuse: one weight per run, this model first")
    e.add_argument("--hybrid-search", choices=["exact", "pooled"],
                   help="dupmae: exact sparse product, or a FAISS pool re-scored (large corpora; default: exact)")
    e.add_argument("--candidate-pool", type=int, help="dupmae pooled search: candidates per query (default: 1000)")
    e.add_argument("--matryoshka", action="store_true", help="score every (layer, dim) pair (Starbucks): a table, and "
                   "with --output a heatmap (OUTPUT.matryoshka.png); default grid: the model's layers 2, 4, ... x "
                   "dims 32, 64, ... up to its width")
    e.add_argument("--layers", type=int, nargs="+", help="with --matryoshka: the layers")
    e.add_argument("--dims", type=int, nargs="+", help="with --matryoshka: the prefix sizes")
    _add_data_parser(sub)
    c = sub.add_parser("encode", help="encode a corpus into memory-mapped shards (one per process)",
                       formatter_class=defaults)
    c.add_argument("--model", required=True)
    c.add_argument("--corpus", required=True, help="BEIR / MS MARCO folder, or a BEIR corpus.jsonl")
    c.add_argument("--output", required=True, help="folder for shard-*.npy and shard-*.ids")
    c.add_argument("--title-separator", default=" ")
    _add_encode_arguments(c)
    return parser


def _add_scratch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", help="scratch folder for the vector shards (default: $RETROMAE_WORK, else beside "
                   "--output; several machines need one they all see)")
    p.add_argument("--shard-dtype", choices=["float32", "float16"], help="vectors in the scratch shards (default "
                   "float32; float16 takes half the disk)")


def _add_data_parser(sub) -> None:
    from retromae.config import DATA_ENV, DEFAULT_DATA_ROOT

    root_help = f"the data root (default: ${DATA_ENV}, else {DEFAULT_DATA_ROOT}/ here): where recipes and suites look"
    data = sub.add_parser("data", help="get public datasets (BEIR, MS MARCO) or make a task from your own pairs",
                          description=f"Datasets go under the data root, ${DATA_ENV} (default: {DEFAULT_DATA_ROOT}/ "
                          "in the current folder), where the recipes (${RETROMAE_DATA}/beir/...), suites and studies "
                          "look for them.")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    get = actions.add_parser("get", help="download datasets: BEIR names (nfcorpus, scifact, ...) or msmarco-passage",
                             description="Download and unpack datasets into ROOT/beir/NAME (BEIR) or ROOT/msmarco "
                             "(msmarco-passage: collection.tsv, queries and qrels of train, dev, eval). An archive "
                             "is checked against its published MD5; a dataset already there is kept.")
    get.add_argument("names", nargs="+", metavar="NAME", help="`retromae data list` shows them")
    get.add_argument("--root", help=root_help)
    get.add_argument("--mirror", help="base URL serving the same archives (default: BEIR's and Microsoft's servers)")
    get.add_argument("--md5", help="the archive's MD5 when a mirror serves another build (one NAME only)")
    get.add_argument("--force", action="store_true", help="download again and replace what is there")
    get.add_argument("--triples", action="store_true", help="msmarco-passage: also qidpidtriples.train.full.2.tsv.gz "
                     "(the 397M training triples fine-tuning samples negatives from, kept gzipped)")
    actions.add_parser("list", help="the datasets `retromae data get` knows, and where each goes")
    pairs = actions.add_parser("pairs", help="a retrieval task (BEIR layout) from your own query<TAB>passage pairs",
                               description="Write a BEIR folder from a TSV of query<TAB>passage pairs (and your "
                               "corpus): corpus.jsonl, queries.jsonl, qrels/train.tsv, qrels/test.tsv. Fine-tuning "
                               "(data.train=FOLDER) and `retromae evaluate --dataset FOLDER --split test` read it.")
    pairs.add_argument("pairs", help="TSV file: one query<TAB>relevant passage a line")
    pairs.add_argument("--texts", help="your corpus (one passage a line, JSON lines or TSV): searched with the "
                       "paired passages")
    pairs.add_argument("--output", required=True, help="the folder to write (e.g. data/my_task)")
    pairs.add_argument("--test-share", type=float, default=0.2, help="share of the queries kept for testing")
    pairs.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    pairs.add_argument("--force", action="store_true", help="replace --output if it is not empty")


def _data(args) -> None:
    from pathlib import Path

    from retromae.data import download

    if args.action == "list":
        for name in download.names():
            kind = "MS MARCO passage, TSV" if name == download.MSMARCO_PASSAGE else "BEIR"
            print(f"{name:18s} {kind:22s} -> {download.target_folder(name)}")
        return
    if args.action == "pairs":
        from retromae.data.pairs import write_task

        done = write_task(args.pairs, args.output, args.texts, args.test_share, args.seed, args.force)
        print(f"wrote {done['folder']}: {done['documents']} documents, {done['queries']} queries ({done['train']} "
              f"train, {done['test']} test)")
        return
    if args.md5 and len(args.names) > 1:
        raise ConfigError("--md5 checks one archive: give one NAME with it")
    for name in args.names:  # every name checked before anything is downloaded
        download.check_name(name)
    for name in args.names:
        fetched = download.fetch(name, Path(args.root) if args.root else None, args.mirror, args.md5, args.force,
                                 args.triples)
        print(download.describe(fetched))


def _add_encode_arguments(p: argparse.ArgumentParser) -> None:
    """Encoding options; left out, they keep the recipe's (or EncodeConfig's) values."""
    p.add_argument("--pooling", choices=["auto", "cls", "mean"], help="default: the model's own (sentence-transformers "
                   "config), else cls")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                   help="L2-normalise (default: as the model declares: a Normalize module or cosine similarity)")
    p.add_argument("--query-max-len", type=int, help="default: the model's max_seq_length, as encode_query")
    p.add_argument("--passage-max-len", type=int, help="default: the model's max_seq_length (else its position limit)")
    p.add_argument("--query-prefix", help='default: the model\'s "query" prompt')
    p.add_argument("--passage-prefix", help='default: the model\'s "document" prompt')
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--precision", choices=["auto", "no", "bf16", "fp16"], help="default: auto (bf16 where the "
                   "hardware has it)")
    p.add_argument("--timeout-minutes", type=float, help="under accelerate launch: how long a process waits for the "
                   "others (default 30)")


_ENCODE_FIELDS = ("pooling", "normalize", "query_max_len", "passage_max_len", "query_prefix", "passage_prefix",
                  "batch_size", "precision")


def _encode_config(args, base=None):
    from dataclasses import replace

    from retromae.retrieval.encoder import EncodeConfig

    given = {k: getattr(args, k) for k in _ENCODE_FIELDS if getattr(args, k) is not None}
    return replace(base or EncodeConfig(), **given)


def _check_model(model: str, encode, suite: str | None = None, args=None) -> None:
    """Before any data is read: the model folder has a tokenizer, and the lengths asked for (on the command line,
    or by the suite's encode section) fit its positions."""
    from retromae.inputs import check_lengths, check_tokenizer_files, model_position_limit
    from retromae.retrieval.bm25 import is_bm25

    if is_bm25(model):
        return
    check_tokenizer_files(model, "--model")

    def key(field: str) -> str:
        given = args is None or suite is None or getattr(args, field) is not None
        return f"--{field.replace('_', '-')}" if given else f"{suite}: encode.{field}"

    asked = {key("query_max_len"): encode.query_max_len, key("passage_max_len"): encode.passage_max_len}
    if any(v is not None for v in asked.values()):
        check_lengths(asked, model_position_limit(model, what="--model"), model)


_SEARCH_OPTIONS = {"depth": "depth", "index": "index", "gpu_index": "use_gpu", "representation": "representation",
                   "hybrid_search": "hybrid_search", "candidate_pool": "candidate_pool", "metrics": "metrics",
                   "title_separator": "title_separator", "work_dir": "work_dir", "shard_dtype": "shard_dtype"}


def _evaluate(args) -> None:
    from dataclasses import replace

    from retromae.retrieval.evaluate import SearchConfig, check_metrics, evaluate_model, format_table, load_suite, run_suite

    search_overrides = {field: getattr(args, option) for option, field in _SEARCH_OPTIONS.items()
                        if getattr(args, option) is not None}
    if args.keep_identical_ids:
        search_overrides["ignore_identical_ids"] = False
    if args.matryoshka:
        search_overrides["layers"], search_overrides["dims"] = _matryoshka_grid(args)
    if args.metrics:
        check_metrics(args.metrics)
    if args.suite:
        suite = load_suite(args.suite)
        suite.search = replace(suite.search, **search_overrides)
        _sparse_options(args, suite.search)
        suite.encode = _encode_config(args, suite.encode)
        _check_model(args.model, suite.encode, args.suite, args)
        if args.data_root:
            suite.data_root = args.data_root
        if args.split:
            suite.split = args.split
        _, table = run_suite(args.model, suite, args.output)
        from retromae.distributed import process_state

        if process_state().is_main_process:
            print("\n" + table)
        return
    search = SearchConfig(**search_overrides)
    _sparse_options(args, search)
    if args.fuse:
        return _evaluate_fused(args, search)
    _check_model(args.model, _encode_config(args))
    result = evaluate_model(args.model, args.dataset, args.split, _encode_config(args), search, args.run, args.output)
    if result is not None and search.layers:
        from retromae.retrieval.evaluate import matryoshka_table

        print(matryoshka_table(result, search))
    if result is not None and result.get("sparsity"):
        from retromae.retrieval.sparse import format_sparsity

        print(format_sparsity(result["sparsity"]))
    if result is not None:
        print(format_table([result], search.metrics))
        print(f"{result['num_queries']} queries, {result['num_documents']} documents, {result['seconds']} s; "
              f"settings: {result['settings']}")


def _sparse_options(args, search) -> None:
    """--sparse-index and the Seismic settings into the search's sparse section."""
    for option, key in (("sparse_index", "index"), ("seismic_query_cut", "query_cut"),
                        ("seismic_heap_factor", "heap_factor"), ("seismic_postings", "n_postings")):
        if getattr(args, option, None) is not None:
            setattr(search.sparse, key, getattr(args, option))


def _evaluate_fused(args, search) -> None:
    """--fuse: each model's run, then their fusion (retromae.retrieval.sparse.evaluate_fused)."""
    from retromae.retrieval.evaluate import format_table
    from retromae.retrieval.sparse import FusionConfig, evaluate_fused

    def parse(item: str) -> tuple[str, str]:
        model, _, representation = item.rpartition(":") if item.endswith((":dense", ":splade", ":dupmae")) else \
            (item, "", "")
        return model, representation or ("dense" if model != "bm25" else "dense")

    models = [(args.model, search.representation)] + [parse(item) for item in args.fuse]
    fusion = FusionConfig(method=args.fusion, weights=args.fusion_weights or [])
    result = evaluate_fused(models, args.dataset, args.split, _encode_config(args), search, fusion, args.output,
                            args.run)
    if result is not None:
        rows = [{"dataset": f"{p['model']} ({p['representation']})", **p} for p in result["parts"]]
        rows.append({**result, "dataset": f"fused ({args.fusion})"})
        print(format_table(rows, search.metrics))


def _matryoshka_grid(args) -> tuple[list[int], list[int]]:
    """The (layer, dim) grid asked for, or the default one: every second layer, dims doubling from 32 to the
    width (the width itself included), read from the model's config."""
    if args.layers and args.dims:
        return args.layers, args.dims
    from transformers import AutoConfig

    from retromae.modeling import from_pretrained

    config = from_pretrained(AutoConfig, args.model, "--model")
    layers = args.layers or list(range(2, config.num_hidden_layers + 1, 2))
    dims = args.dims or sorted({d for d in (32, 64, 128, 256, 512, 1024) if d < config.hidden_size}
                               | {config.hidden_size})
    return layers, dims


def _encode(args) -> None:
    from pathlib import Path

    from retromae.distributed import process_state
    from retromae.retrieval.collection import load_collection
    from retromae.retrieval.encoder import TextEncoder, encode_shard

    _check_model(args.model, _encode_config(args))
    state = process_state()
    path = Path(args.corpus)
    if path.is_dir():
        path = path / "collection.tsv" if (path / "collection.tsv").is_file() else path / "corpus.jsonl"
    ids, texts = load_collection(path, "msmarco" if path.suffix == ".tsv" else "beir").passages(args.title_separator)
    encoder = TextEncoder(args.model, _encode_config(args), device=state.device)
    shard = encode_shard(encoder, ids, texts, args.output, state.process_index, state.num_processes,
                         show_progress=state.is_main_process)
    print(f"process {state.process_index}: wrote {shard}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # accelerate warns at every checkpoint that tied weights (the MLM head's matrix is the word embeddings) are
    # saved once: expected here, and they are tied again on load
    logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())
    try:
        from retromae.distributed import configure_timeout

        configure_timeout(getattr(args, "timeout_minutes", None))  # evaluate, mine, encode: before the process group
        if args.command == "pretrain":
            from retromae.pretrain import load_config, run

            cfg = load_config(args.config, args.overrides)
            if args.show_config:
                print("\n".join(describe_config(cfg)))
                return 0
            run(cfg)
        elif args.command == "study":
            from retromae.study import load_study, run_study

            report = run_study(load_study(args.config, args.overrides))
            if report is not None:  # the main process's (the others have none)
                print("\n" + report["table"])
        elif args.command == "prepare":
            from retromae.pretrain import load_config, prepare

            summary = prepare(load_config(args.config, args.overrides))
            print(f"cache: {summary['folder']} ({summary['seconds']} s to build)")
            print(f"examples={summary['examples']} mean_length={summary['mean_length']:.1f}")
        elif args.command == "demo":
            from retromae.demo import run_demo

            run_demo(args.output_dir, args.config, args.overrides)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "encode":
            _encode(args)
        elif args.command == "data":
            _data(args)
        elif args.command == "finetune":
            from retromae.finetune.run import load_finetune_config, run as run_finetune

            cfg = load_finetune_config(args.config, args.overrides)
            if args.show_config:
                print("\n".join(describe_config(cfg)))
                return 0
            run_finetune(cfg)
        elif args.command == "mine":
            from retromae.finetune.mine import MineConfig, mine_negatives

            _check_model(args.model, _encode_config(args))
            summary = mine_negatives(args.model, args.data, args.output, args.split, _encode_config(args),
                                     MineConfig(args.depth, args.skip_top, args.index, args.title_separator,
                                                representation=args.representation,
                                                work_dir=args.work_dir, shard_dtype=args.shard_dtype or "float32"))
            if summary:
                print(f"mined {summary['negatives_per_query']:.1f} negatives for each of {summary['queries']} "
                      f"queries into {summary['output']}")
    except USER_ERRORS as err:
        print(f"retromae: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:
        if _is_main_process():
            print(f"retromae: {stopped}. {_how_to_resume(args)}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading, data preparation, evaluation)
        if _is_main_process():
            print("retromae: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    finally:
        end_process_group()
    return 0


def describe_config(cfg, prefix: str = "") -> list[str]:
    """`section.key=value  # what it does` for every key of a config, as an override would set it: the keys a
    recipe does not mention included."""
    import dataclasses
    import json

    from retromae.config import field_docs

    docs: dict[str, str] = {}
    for klass in reversed(type(cfg).__mro__):  # an objective's Config inherits `name` from ObjectiveConfig
        if dataclasses.is_dataclass(klass):
            docs.update(field_docs(klass))
    lines = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            lines += describe_config(value, key + ".")
            continue
        shown = value if isinstance(value, str) and value.strip() == value and value else json.dumps(value)
        lines.append(f"{key}={shown}" + (f"  # {docs[f.name]}" if f.name in docs else ""))
    return lines


def _is_main_process() -> bool:
    """Rank 0 of a launch (torchrun / accelerate launch set RANK), or a plain process; read from the environment,
    which works however far the process got (before or after its process group)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _how_to_resume(args) -> str:
    if args.command in ("pretrain", "finetune"):
        return "To resume, run the same command with train.resume=latest"
    if args.command == "study":
        return ("To go on, run the same `retromae study` command again: finished stages are kept, the interrupted "
                "one starts over")
    return f"Run `retromae {args.command}` again to start over"


def end_process_group() -> None:
    """Destroy the launch's process group once the command is done (not before: exports and final barriers use it;
    accelerate's end_training would destroy it too early)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
