"""The ``seq2serve`` console script. Heavy modules are imported inside each command so that
``seq2serve --help`` is instant and serving never imports PyTorch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"


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
            args.checkpoint,
            args.out,
            quantize=args.quantize,
            verify=args.verify,
            screen={"auto": None, "on": True, "off": False}[args.screen_head],
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


def _import_hf(args: argparse.Namespace) -> int:
    try:
        from seq2serve.hf.convert import UnsupportedModel, import_hf
    except ImportError as err:
        print(
            f"error: import-hf needs the optional 'hf' dependencies ({err}); "
            "install them with: pip install 'seq2serve[hf]'",
            file=sys.stderr,
        )
        return 2
    try:
        result = import_hf(args.hf_dir, args.out)
    except (FileNotFoundError, UnsupportedModel) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"checkpoint": str(args.out), "model_type": result.model_type}, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from seq2serve.service.server import serve
    from seq2serve.service.settings import Settings

    flags = {
        "model_dir": args.model,
        "runtime": args.runtime,
        "device": args.device,
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
    }
    from pydantic import ValidationError

    try:
        # Flags given on the command line override SEQ2SERVE_* environment variables.
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:
        for problem in err.errors():
            field = ".".join(str(p) for p in problem["loc"])
            print(f"error: setting {field}: {problem['msg']}", file=sys.stderr)
        return 2
    from seq2serve.engine.bundle import BundleError

    try:
        serve(settings)
    except BundleError as err:
        print(f"error: cannot serve: {err}", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    from seq2serve.bench import BenchConfig, main, table

    cfg = BenchConfig(
        model=args.model,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        source_tokens=args.source_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
        server_clients=args.clients,
        server_seconds=args.seconds,
        server=not args.no_server,
        decode=not args.no_decode,
        hf_model=args.hf_model,
    )
    results = main(cfg, args.json)
    print(table(results))
    print(f"\nJSON: {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2serve", description="Train, export and serve Transformer encoder-decoder models."
    )
    parser.add_argument(
        "--log-level",
        help="logging level (default INFO; for serve, SEQ2SERVE_LOG_LEVEL or INFO)",
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
    p.add_argument(
        "--screen-head",
        choices=["auto", "on", "off"],
        default="auto",
        help="screen the step graphs' LM heads and rescore their best tokens exactly (the "
        "same greedy tokens). auto: the fp32 head in int8 when it is 16 MB or more (a quarter "
        "of its bytes per step); on: that, and the int8 head in 4 bits at batch 1 (half its "
        "bytes: about 10%% off a batch-1 int8 step, for the 4-bit head's memory and a copy of "
        "the logits at larger batches); off: neither",
    )
    p.set_defaults(run=_export)

    p = commands.add_parser(
        "import-hf",
        help="convert a local Hugging Face MarianMT or BART checkpoint",
        description="Convert a local Hugging Face MarianMT or BART directory (config.json, "
        "model.safetensors or pytorch_model.bin, tokenizer files) into a seq2serve checkpoint "
        "(config.json, tokenizer.json, model.safetensors) for `seq2serve export`. Options the "
        "model cannot reproduce exactly are refused with a message naming them. Needs the "
        "'hf' extra.",
    )
    p.add_argument("hf_dir", type=Path, help="Hugging Face model directory (local)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.set_defaults(run=_import_hf)

    p = commands.add_parser(
        "serve",
        help="start the HTTP server",
        description="Start the HTTP server. Settings come from SEQ2SERVE_* environment "
        "variables; these flags override them.",
    )
    p.add_argument("--model", type=Path, help="bundle directory (default: the bundled model)")
    p.add_argument("--runtime", choices=["onnx", "torch"], help="inference runtime (default onnx)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="execution device (default cpu)")
    p.add_argument("--host", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.set_defaults(run=_serve)

    p = commands.add_parser(
        "bench",
        help="benchmark decoding and serving",
        description="Decode speed per engine (onnx fp32/int8, torch with and without the KV "
        "cache), step-16 vs step-256 cost, and a streaming load run against a local server. "
        "Prints a table and writes JSON.",
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="bundle directory")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--source-tokens", type=int, default=32, help="source length (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: the torch rows on the GPU, onnx on CUDA's execution provider (default cpu)",
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each load run")
    p.add_argument("--no-server", action="store_true", help="skip the serving runs")
    p.add_argument("--no-decode", action="store_true", help="skip the per-engine decode rows")
    p.add_argument(
        "--hf-model",
        type=Path,
        help="Hugging Face directory of the same weights, for the transformers and CTranslate2 "
        "peer rows (default: the hf_source recorded by import-hf, when present)",
    )
    p.add_argument("--json", type=Path, default=Path("bench-results/bench.json"), help="output")
    p.set_defaults(run=_bench)
    return parser


def console_logging(level: str = "INFO") -> None:
    """Plain lines on stderr for a command's progress. Libraries (onnxruntime's quantizer,
    onnxscript's optimizer) log chatty INFO lines on the root logger: they get WARNING,
    seq2serve's own progress ``level``."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("seq2serve").setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":  # the server configures its own JSON logging from its settings
        console_logging(args.log_level or "INFO")
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
