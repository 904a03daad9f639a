"""`fleettune api`: the control plane and device gateway (FastAPI on uvicorn), with /metrics.

Routers per resource: federations (operators), training sessions and keys, the model registry, the
device gateway, and the local store's presigned objects. The app is built by `create_app`, so tests
and the embedded demo run the same app under a real server.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from prometheus_client import multiprocess as prom_multiprocess

from fleettune.shared.metrics import FederationCollector, multiprocess
from fleettune.shared.runtime import Runtime
from fleettune.workers.api import (artifacts, devices, federations, models, objects, problems, rollouts, secagg,
                                   sessions, split)
from fleettune.workers.api.deps import documented_security
from fleettune.workers.api.edge import Edge
from fleettune.workers.api.responses import Health
from fleettune.workers.api.services import Enqueue, Publisher, Services

__all__ = ["app_from_env", "create_app", "serve", "serve_in_thread"]


# Idle keep-alive connections outlive the clients' (httpx drops its own after 5 s; load balancers
# commonly after 60 s): with both at uvicorn's default of 5 s, a request sent on a connection the
# server was closing at that moment failed with "Server disconnected without sending a response".
KEEP_ALIVE_S = 75


def create_app(runtime: Runtime, enqueue: Enqueue, registry: CollectorRegistry | None = None,
               clock: Callable[[], float] = time.time, publisher: Publisher | None = None,
               begin: Callable[[str], object] | None = None) -> FastAPI:
    """The API over `runtime`. `begin(fed)` has a worker do a recorded start (v0, the round's opening);
    without it the start runs in this process, for embedded use with no worker."""
    app = FastAPI(title="fleettune", version="1", summary="Federated fine-tuning of LLM adapters: control plane "
                  "and device gateway", docs_url="/docs", openapi_url="/openapi.json")
    app.state.services = Services.build(runtime, enqueue, clock, publisher, begin)
    problems.install(app)
    for module in (devices, split, secagg, federations, artifacts, rollouts, sessions, models, objects):  # the device hot path matches first
        app.include_router(module.router)

    registry = registry or CollectorRegistry()
    registry.register(FederationCollector(runtime.state, runtime.store))
    own = registry
    if multiprocess():  # `fleettune api --workers N`: each process counts into files, a scrape sums them all
        prom_multiprocess.MultiProcessCollector(registry)
        own = None
    requests = Counter("fleettune_api_requests", "API requests by route and status", ["route", "code"],
                       registry=own)
    latency = Histogram("fleettune_api_request_seconds", "API request latency", ["route"], registry=own)

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    def metrics() -> Response:
        """For operator keys (the edge checks): the collector reads Redis, so this runs in the thread pool."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Edge, services=app.state.services)  # runs inside _Measure: refusals are counted too
    app.add_middleware(_Measure, requests=requests, latency=latency)

    openapi = app.openapi
    app.openapi = lambda: app.openapi_schema or documented_security(openapi())  # type: ignore[method-assign]

    @app.get("/healthz", tags=["operations"], response_model=Health)
    def healthz() -> dict:
        runtime.redis.ping()
        return {"status": "ok"}

    return app


class _Measure:
    """Counts and times requests by handler, as plain ASGI (BaseHTTPMiddleware costs ~1 ms a request)."""

    def __init__(self, app, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # a bounded label: the handler's name, never the path (which holds ids)
            route = getattr(scope.get("endpoint"), "__name__", "unknown")
            self.requests.labels(route, str(status)).inc()
            self.latency.labels(route).observe(time.perf_counter() - started)


def app_from_env() -> FastAPI:
    """The API as `fleettune api` runs it, from FLEETTUNE_* (uvicorn's factory for `--workers N`)."""
    from fleettune.shared.settings import Settings
    from fleettune.workers.worker.app import app as celery_app
    from fleettune.workers.worker.app import enqueuer, starter
    from fleettune.workers.worker.publish import RedisPublisher

    settings = Settings.from_env()
    # the broker is the same Redis: record-and-enqueue is one script (workers/worker/publish.py says why)
    return create_app(Runtime.from_settings(settings), enqueuer(celery_app), publisher=RedisPublisher(celery_app),
                      begin=starter(celery_app))


def serve(app: FastAPI | str, host: str, port: int, workers: int = 1) -> None:
    """Serve `app`, or with `workers` > 1 the factory at that import path in as many processes."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, workers=workers,
                factory=isinstance(app, str), timeout_keep_alive=KEEP_ALIVE_S)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Run the app under uvicorn in a thread on a free port (the embedded demo); yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", access_log=False,
                                           timeout_keep_alive=KEEP_ALIVE_S))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
    thread = threading.Thread(target=server.run, name="fleettune-api", daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise RuntimeError("the embedded API did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
