"""`fleettune api`: a small read-only HTTP API over federation state, with /metrics.

Its /metrics carries the federation gauges (version, adapter norm, perplexity, forgetting), read
from Redis and the store at scrape time; the workers' carry the event counters.

Routes (JSON): /healthz, /v1/federations, /v1/federations/{name},
/v1/federations/{name}/versions/{version}, /v1/deadletters?n=20; and /metrics for Prometheus.
It holds the server's credentials and exposes no write: devices never talk to it with admin rights.
A WSGI app on the standard library's server: four read routes do not need a framework yet.
"""

from __future__ import annotations

import json
import re
import socketserver
import time
from collections.abc import Callable, Iterable
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app

from shared import versions
from shared.errors import ObjectNotFound
from shared.metrics import FederationCollector
from shared.runtime import Runtime

Response = tuple[str, object]


class Api:
    def __init__(self, runtime: Runtime, registry: CollectorRegistry | None = None) -> None:
        self.runtime = runtime
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("fleettune_api_requests", "API requests by route and status",
                                ["route", "code"], registry=self.registry)
        self.latency = Histogram("fleettune_api_request_seconds", "API request latency", ["route"],
                                 registry=self.registry)
        self.registry.register(FederationCollector(runtime.state, runtime.store))
        self.metrics_app = make_wsgi_app(self.registry)
        self.routes: list[tuple[str, re.Pattern, Callable[..., Response]]] = [
            ("healthz", re.compile(r"^/healthz$"), self.health),
            ("federations", re.compile(r"^/v1/federations$"), self.federations),
            ("federation", re.compile(r"^/v1/federations/([^/]+)$"), self.federation),
            ("version", re.compile(r"^/v1/federations/([^/]+)/versions/(\d+)$"), self.version),
            ("deadletters", re.compile(r"^/v1/deadletters$"), self.deadletters),
        ]

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self.metrics_app(environ, start_response)
        started = time.perf_counter()
        route, status, body = "unknown", "404 Not Found", {"error": "no such route"}
        if environ.get("REQUEST_METHOD") != "GET":
            status, body = "405 Method Not Allowed", {"error": "read-only API: GET only"}
        else:
            for name, pattern, handler in self.routes:
                if match := pattern.match(path):
                    route = name
                    status, body = handler(*match.groups(), query=parse_qs(environ.get("QUERY_STRING", "")))
                    break
        self.requests.labels(route, status.split()[0]).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)
        data = json.dumps(body, indent=2, default=str).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    def health(self, query) -> Response:
        self.runtime.redis.ping()
        return "200 OK", {"status": "ok"}

    def federations(self, query) -> Response:
        return "200 OK", {"federations": self.runtime.state.federations()}

    def federation(self, name: str, query) -> Response:
        state = self.runtime.state
        if state.config(name) is None:
            return "404 Not Found", {"error": f"unknown federation {name!r}"}
        status = state.status(name)
        info = state.round_info(name, state.current_round(name))
        return "200 OK", {"federation": name, "state": status, "round": info.__dict__ if info else None,
                          "stats": state.stats(name), "evaluation": state.evaluation(name, int(status["version"]))}

    def version(self, name: str, version: str, query) -> Response:
        try:
            return "200 OK", versions.manifest(self.runtime.store, name, int(version))
        except ObjectNotFound:
            return "404 Not Found", {"error": f"{name} has no version {version}"}

    def deadletters(self, query) -> Response:
        try:
            n = min(max(int(query.get("n", ["20"])[0]), 1), 1000)
        except ValueError:
            return "400 Bad Request", {"error": "n must be an integer"}
        return "200 OK", {"deadletters": self.runtime.state.deadletters(n)}


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # Prometheus scrapes every few seconds
        pass


def serve(runtime: Runtime, host: str, port: int) -> None:
    with make_server(host, port, Api(runtime), server_class=_ThreadingServer, handler_class=_QuietHandler) as server:
        server.serve_forever()
