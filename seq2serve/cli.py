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


def _export(args: argparse.Namespace) -> int:
    from seq2serve.export.bundle import export_bundle

    try:
        manifest = export_bundle(
            args.checkpoint, args.out, quantize=args.quantize, verify=args.verify
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = {
        "bundle": str(args.out),
        "files": {name: entry["bytes"] for name, entry in manifest["files"].items()},
        "weights": manifest["weights"],
    }
    if "parity" in manifest:
        summary["parity"] = manifest["parity"]
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2serve", description="Train, export and serve Transformer encoder-decoder models."
    )
    parser.add_argument(
        "--log-level", default="INFO", help="seq2serve's logging level (default INFO)"
    )
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

    p = commands.add_parser(
        "export",
        help="write an ONNX model bundle from a checkpoint",
        description="Export a checkpoint to a model bundle: encoder.onnx, decoder.onnx (weights "
        "shared in model.onnx.data), config, tokenizer, weights and manifest.json.",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (from train or import-hf)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--quantize", choices=["int8"], help="also write dynamic-int8 graphs")
    p.add_argument("--verify", action="store_true", help="check parity against PyTorch")
    p.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Libraries (onnxruntime's quantizer among them) log chatty INFO lines on the root logger.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("seq2serve").setLevel(args.log_level.upper())
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
