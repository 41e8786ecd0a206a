"""ONNX export of a checkpoint into a model bundle (needs PyTorch; serving does not)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def dropping(logger: str, *starts: str) -> Iterator[None]:
    """Drop ``logger``'s records whose message starts with one of ``starts``, inside the
    block: the libraries' advice that does not apply to these graphs (``""``: the root
    logger), so that an export prints its own progress and any warning that does apply."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(starts)

    target = logging.getLogger(logger)
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)
