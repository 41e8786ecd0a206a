"""The ``seq2serve`` console script. Heavy modules are imported inside each command so that
``seq2serve --help`` is instant and serving never imports PyTorch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from seq2serve.data.files import DataError
    from seq2serve.train import PRESETS, train

    if args.preset not in PRESETS:
        print(f"error: --preset must be one of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    try:
        metrics = train(
            args.out, data=args.data, steps=args.steps, preset_name=args.preset, seed=args.seed
        )
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2serve", description="Train, export and serve Transformer encoder-decoder models."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "train",
        help="train a model (the built-in default task, or --data FILE)",
        description="Train an encoder-decoder model. Without --data, the built-in default task: "
        "verbalizing numbers and dates in 7 languages and identifying the language.",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="checkpoint directory (resumes if present)"
    )
    p.add_argument("--data", type=Path, help="TSV or JSONL of source, target[, label]")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--preset", default="default", help="model/training size: default or tiny")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
