"""Print the image's pinned runtime requirements, one a line, from pyproject.toml.

    python3 image_requirements.py [--pyproject FILE] [--variant cpu|cuda] [--onnxruntime-gpu V]

cpu: the project's ``dependencies`` as they are (what ``pip install .`` installs; no PyTorch).
cuda: the same with ``onnxruntime`` replaced by ``onnxruntime-gpu==V``: both wheels ship the
same ``onnxruntime`` module, so installing one after the other would leave a mix of files.

Standard library only: the Dockerfile's builder stage runs it before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirements(pyproject: Path, variant: str, onnxruntime_gpu: str) -> list[str]:
    with pyproject.open("rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    if variant == "cpu":
        return list(deps)
    out = []
    swapped = False
    for dep in deps:
        match = _NAME.match(dep)
        name = match.group(1).lower().replace("_", "-") if match else ""
        if name == "onnxruntime":
            out.append(f"onnxruntime-gpu=={onnxruntime_gpu}")
            swapped = True
        else:
            out.append(dep)
    if not swapped:
        raise SystemExit(f"error: {pyproject} has no onnxruntime dependency to swap for the GPU")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--variant", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--onnxruntime-gpu", default="", help="onnxruntime-gpu version (cuda)")
    args = parser.parse_args(argv)
    if args.variant == "cuda" and not args.onnxruntime_gpu:
        parser.error("--variant cuda needs --onnxruntime-gpu VERSION")
    sys.stdout.write(
        "".join(f"{r}\n" for r in requirements(args.pyproject, args.variant, args.onnxruntime_gpu))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
