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
from prometheus_client import CollectorRegistry, Counter, Histogram, make_asgi_app

from shared.metrics import FederationCollector
from shared.runtime import Runtime
from workers.api import devices, federations, models, objects, problems, sessions
from workers.api.services import Enqueue, Services

__all__ = ["create_app", "serve", "serve_in_thread"]


def create_app(runtime: Runtime, enqueue: Enqueue, registry: CollectorRegistry | None = None,
               clock: Callable[[], float] = time.time) -> FastAPI:
    app = FastAPI(title="fleettune", version="1", summary="Federated fine-tuning of LLM adapters: control plane "
                  "and device gateway", docs_url="/docs", openapi_url="/openapi.json")
    app.state.services = Services.build(runtime, enqueue, clock)
    problems.install(app)
    for module in (federations, sessions, models, devices, objects):
        app.include_router(module.router)

    registry = registry or CollectorRegistry()
    registry.register(FederationCollector(runtime.state, runtime.store))
    requests = Counter("fleettune_api_requests", "API requests by route and status", ["route", "code"],
                       registry=registry)
    latency = Histogram("fleettune_api_request_seconds", "API request latency", ["route"], registry=registry)
    app.mount("/metrics", make_asgi_app(registry))

    @app.middleware("http")
    async def measure(request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        endpoint = request.scope.get("endpoint")
        route = getattr(endpoint, "__name__", "unknown")  # a bounded label: the handler, never the path
        requests.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - started)
        return response

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict:
        runtime.redis.ping()
        return {"status": "ok"}

    return app


def serve(app: FastAPI, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Run the app under uvicorn in a thread on a free port (the embedded demo); yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", access_log=False))
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
