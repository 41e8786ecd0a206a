"""What the app holds between requests, kept on ``app.state.service`` (never module globals).

Created by ``create_app`` (the middleware needs the registry and the traffic counter from the
first request on); the lifespan fills in the engine and everything that depends on the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from seq2serve.engine.scheduler import Engine
from seq2serve.service.middleware import HttpMetrics, Traffic
from seq2serve.service.settings import Limits, Settings


@dataclass
class ServiceState:
    settings: Settings
    registry: CollectorRegistry
    http_metrics: HttpMetrics
    traffic: Traffic
    engine: Engine | None = None
    limits: Limits | None = None
    model_id: str = ""
    runtime: str = ""
    provider: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
