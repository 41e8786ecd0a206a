"""Training examples and the reader for user-supplied data files (TSV or JSONL).

The reader is strict on purpose: a malformed row found at training time costs a wasted run, so
every problem is reported up front as ``file:line: what is wrong``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataError", "Example", "load_examples"]


@dataclass(frozen=True, slots=True)
class Example:
    """One training example.

    A seq2seq example has ``target`` set; a classification example has ``label`` set and no
    ``target``. User files may give both (a target and an optional label). Slots keep the
    hundreds of thousands of generated examples cheap in memory.
    """

    source: str
    target: str | None
    label: str | None

    def __post_init__(self) -> None:
        if self.target is None and self.label is None:
            raise ValueError("an Example needs a target, a label, or both")


class DataError(ValueError):
    """A user data file is malformed; the message names the file and the 1-based line."""


_TSV_HEADERS = ("source\ttarget", "source\ttarget\tlabel")
_JSON_KEYS = ("source", "target", "label")


def load_examples(path: str | Path, labels: Sequence[str] | None = None) -> list[Example]:
    """Read examples from a ``.tsv`` or ``.jsonl`` file.

    TSV rows are ``source<TAB>target[<TAB>label]`` (an optional header line ``source\\ttarget``
    or ``source\\ttarget\\tlabel`` is skipped); JSONL rows are objects with ``source``,
    ``target`` and optionally ``label``. When ``labels`` is given, every label must be one of
    them. Raises ``DataError`` naming the file and line for the first problem found.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix!r} (expected .tsv or .jsonl)")
    known = tuple(labels) if labels is not None else None
    parse = _parse_tsv if suffix == ".tsv" else _parse_jsonl

    data = path.read_bytes()
    if not data:
        raise DataError(f"{path}: file is empty")
    # Split the bytes on b"\n" only: str.splitlines() would also break on \x0b, \x1c or U+2028,
    # which are legitimate characters inside a field, and decoding per line lets an encoding
    # error be reported with its line number.
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()  # the final newline terminates the last line, it does not start a new one

    examples: list[Example] = []
    for lineno, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{lineno}"
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark, as some spreadsheet exports write
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: invalid UTF-8 at byte {exc.start}") from None
        if not line.strip():
            raise DataError(f"{where}: empty line")
        if lineno == 1 and suffix == ".tsv" and line in _TSV_HEADERS:
            continue
        source, target, label = parse(line, where)
        if not source.strip():
            raise DataError(f"{where}: empty source")
        if not target.strip():
            raise DataError(f"{where}: empty target")
        if label is not None and known is not None and label not in known:
            raise DataError(f"{where}: unknown label {label!r} (known: {', '.join(known)})")
        examples.append(Example(source=source, target=target, label=label))

    if not examples:
        raise DataError(f"{path}: no examples (only a header)")
    return examples


def _parse_tsv(line: str, where: str) -> tuple[str, str, str | None]:
    fields = line.split("\t")
    if len(fields) == 1:
        raise DataError(f"{where}: missing target column")
    if len(fields) > 3:
        raise DataError(f"{where}: {len(fields)} columns, expected source, target[, label]")
    if len(fields) == 3:
        if not fields[2].strip():
            # An empty third column is more likely a mistake than a wish for "no label";
            # a row without a label simply has two columns.
            raise DataError(f"{where}: empty label")
        return fields[0], fields[1], fields[2]
    return fields[0], fields[1], None


def _parse_jsonl(line: str, where: str) -> tuple[str, str, str | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_JSON_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(_JSON_KEYS)})")
    for key in ("source", "target"):
        if key not in obj:
            raise DataError(f"{where}: missing {key}")
    for key, value in obj.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: {key} must be a string, got {_json_type(value)}")
    label = obj.get("label")
    if label is not None and not label.strip():
        raise DataError(f"{where}: empty label")
    return obj["source"], obj["target"], label


def _json_type(value: object) -> str:
    """Name a JSON value's type as JSON calls it, since the user wrote JSON, not Python."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object"


# A checkpoint's held-out rows, seq2seq and classification alike: training writes them, export
# evaluates the ONNX graphs (fp32 and int8) on the same rows.
HELDOUT_FILE = "heldout.jsonl"


def write_heldout(path: Path, examples: Sequence[Example]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            row = {"source": e.source, "target": e.target, "label": e.label}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_heldout(path: Path) -> list[Example]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [Example(r["source"], r.get("target"), r.get("label")) for r in rows]
