"""Command line: `retromae pretrain CONFIG.yaml [key=value ...]`, `retromae demo`.

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
    d = sub.add_parser("demo", help="pretrain all-MiniLM-L6-v2 with RetroMAE on standard-library docstrings")
    d.add_argument("--output-dir", default="runs/demo", help="where the corpus, logs and model go")
    d.add_argument("--config", default=None, help="recipe to use instead of pretrain/demo.yaml")
    d.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    return parser


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
    except USER_ERRORS as err:
        print(f"retromae: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
