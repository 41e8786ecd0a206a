"""The serving baseline ``seq2serve bench`` measures the server against: CTranslate2 behind
FastAPI, as people put it behind HTTP today.

One ``ctranslate2.Translator``; each streaming request iterates its own ``generate_tokens``
on a worker thread and sends a Server-Sent Event per token (TGI's event shape, as seq2serve's
``/v1/generate`` sends). ``generate_tokens`` decodes one request at a time: CTranslate2 has no
continuous batching, so concurrent streams take turns on its ``inter_threads`` workers. The
workers get one thread each, as many as the cores (``--threads``): CTranslate2's setting for
throughput, which served 16 concurrent int8 streams at twice the tokens/s of one worker with
every thread (opus-mt-sized, 2 cores).

    python -m seq2serve.hf.ct2_server --model CT2_DIR --tokenizer tokenizer.json --port 8001
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import iterate_in_threadpool
from tokenizers import Tokenizer


class Parameters(BaseModel):
    max_new_tokens: int = Field(64, ge=1)


class GenerateRequest(BaseModel):
    inputs: str
    parameters: Parameters = Parameters()
    stream: bool = False


def workers(threads: int | None) -> int:
    """How many requests the server decodes at once: one per worker, a worker per thread
    (``--threads``, default every core)."""
    return threads or os.cpu_count() or 1


def create_app(model: Path, tokenizer_file: Path, threads: int | None = None) -> FastAPI:
    import ctranslate2

    translator = ctranslate2.Translator(
        str(model), device="cpu", inter_threads=workers(threads), intra_threads=1
    )
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/generate", response_model=None)
    async def generate(request: GenerateRequest) -> StreamingResponse | dict[str, Any]:
        # CTranslate2 takes token strings; they come from the same vocabulary.
        source = tokenizer.encode(request.inputs).tokens
        steps = translator.generate_tokens(
            source, max_decoding_length=request.parameters.max_new_tokens
        )
        if not request.stream:
            ids = [step.token_id async for step in iterate_in_threadpool(iter(steps))]
            return {"generated_text": tokenizer.decode(ids)}

        async def events() -> AsyncIterator[str]:
            async for step in iterate_in_threadpool(iter(steps)):
                token = {"id": step.token_id, "text": step.token}
                yield f"data: {json.dumps({'token': token})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def command(model: Path, tokenizer_file: Path, port: int, threads: int | None) -> list[str]:
    """This server on 127.0.0.1:``port``, in a Python process of its own."""
    cmd = [sys.executable, "-m", "seq2serve.hf.ct2_server", "--model", str(model)]
    cmd += ["--tokenizer", str(tokenizer_file), "--port", str(port)]
    return cmd + (["--threads", str(threads)] if threads else [])


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a CTranslate2 model directory")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the bundle's tokenizer.json")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=None, help="default: every core")
    args = parser.parse_args(argv)
    app = create_app(args.model, args.tokenizer, args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
