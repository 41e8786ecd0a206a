"""The web layer: ``create_app(settings)`` builds the FastAPI app; the lifespan loads the model
(unless an engine is handed in), starts the engine and, on shutdown, drains it.

Serving never imports PyTorch: with ``runtime == "torch"`` the torch backend is imported
inside ``build_engine``, only then.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry
from starlette.routing import Route
from tokenizers import Tokenizer

import seq2serve
from seq2serve import contract
from seq2serve.engine.bundle import BundleError, load_bundle
from seq2serve.engine.metrics import EngineMetrics
from seq2serve.engine.runtime import Backend, OnnxBackend
from seq2serve.engine.scheduler import Engine, EngineLimits
from seq2serve.service.deps import require_api_key
from seq2serve.service.errors import install_error_handlers
from seq2serve.service.middleware import HttpMetrics, RequestMiddleware, Traffic
from seq2serve.service.openapi import install_openapi
from seq2serve.service.routes import encode, generate, health, openai
from seq2serve.service.settings import Limits, Settings
from seq2serve.service.state import ServiceState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    engine: Engine
    model_id: str
    runtime: str
    provider: str


def build_engine(settings: Settings, registry: CollectorRegistry) -> LoadedModel:
    """Load the bundle named by the settings and wrap it in an (unstarted) engine.

    Raises ``BundleError`` naming the file when the bundle must not be served.
    """
    path = settings.model_dir
    backend: Backend
    if settings.runtime == "torch":
        # Imported here and only here, by name: an ONNX server must not pay for (or need)
        # PyTorch, and the service's type check stays out of the model package too.
        torch_backend = importlib.import_module("seq2serve.model.backend")
        try:
            backend = torch_backend.TorchBackend.from_bundle(path, settings.device)
        except (OSError, ValueError, RuntimeError) as err:
            raise BundleError(f"{path}: cannot be loaded for the torch runtime ({err})") from err
        tokenizer_file = path / contract.TOKENIZER_FILE
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the tokenizers library raises a bare Exception
            raise BundleError(f"{tokenizer_file}: cannot be loaded ({err})") from err
        provider = f"torch:{settings.device}"
    else:
        bundle = load_bundle(
            path,
            quantized=settings.quantized,
            device=settings.device,
            threads=settings.num_threads,
        )
        backend = OnnxBackend(bundle)
        tokenizer = bundle.tokenizer
        provider = bundle.provider
    limits = EngineLimits(
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
    )
    engine = Engine(backend, tokenizer, limits, EngineMetrics(registry), settings.engine_nice)
    return LoadedModel(engine, path.name, settings.runtime, provider)


def describe(engine: Engine, settings: Settings) -> LoadedModel:
    """What ``/info`` says about an engine that was handed in rather than built here."""
    backend = engine.backend
    if isinstance(backend, OnnxBackend):
        return LoadedModel(engine, backend.bundle.model_id, "onnx", backend.bundle.provider)
    # ``serve()`` builds the engine before the app, so the torch runtime arrives here too.
    provider = f"torch:{settings.device}" if settings.runtime == "torch" else type(backend).__name__
    return LoadedModel(engine, settings.model_dir.name, settings.runtime, provider)


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The app. Pass ``engine`` to serve one built elsewhere (tests, embedding); pass the
    ``registry`` its ``EngineMetrics`` use so that ``/metrics`` shows them."""
    settings = settings or Settings()
    registry = registry or CollectorRegistry()
    state = ServiceState(
        settings=settings,
        registry=registry,
        http_metrics=HttpMetrics(registry),
        traffic=Traffic(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is None:
            try:
                loaded = await asyncio.to_thread(build_engine, settings, registry)
            except BundleError as err:
                log.error("cannot serve %s: %s", settings.model_dir, err)
                raise
        else:
            loaded = describe(engine, settings)
        state.engine = loaded.engine
        state.model_id = loaded.model_id
        state.runtime = loaded.runtime
        state.provider = loaded.provider
        state.limits = Limits.resolve(settings, loaded.engine.config)
        await loaded.engine.start()
        log.info(
            "serving %s",
            state.model_id,
            extra={"runtime": state.runtime, "provider": state.provider},
        )
        try:
            yield
        finally:
            # Refuse new work first, then let the engine finish what it holds.
            state.traffic.draining = True
            await loaded.engine.stop()

    app = FastAPI(
        title="seq2serve",
        version=seq2serve.__version__,
        description="Serve a Transformer encoder-decoder: encode, classify and generate "
        "(streamed over Server-Sent Events), with OpenAI- and TGI-compatible routes.",
        lifespan=lifespan,
        # InferenceClient posts JSON without a Content-Type header; a body is JSON here.
        strict_content_type=False,
    )
    app.state.service = state
    install_openapi(app, state)
    install_error_handlers(app)
    app.add_middleware(
        RequestMiddleware,
        metrics=state.http_metrics,
        traffic=state.traffic,
        max_body_bytes=settings.max_body_bytes,
        plain_paths=frozenset(r.path for r in app.routes if isinstance(r, Route)),
    )
    # Declared only with a key configured, so the OpenAPI document's security matches what
    # the server enforces.
    auth = [Depends(require_api_key)] if settings.api_key is not None else []
    app.include_router(health.router)
    for module in (generate, encode, openai):
        app.include_router(module.router, dependencies=auth)
    return app
