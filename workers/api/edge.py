"""The API's edge, as plain ASGI in front of every route: authenticate, then bound the body.

FastAPI reads and parses a JSON body before it runs any dependency, auth included. So this
middleware runs first: it takes the bearer token from the headers, looks it up (redis.asyncio,
or the thread pool in embedded mode), and answers 401 before one byte of the body is read. A
request that passes carries its principal in `request.state.principal` for the route's own
checks (scope, federation, rate limit). Then the body is bounded by its route's class, by its
declared Content-Length at once and by counting while it streams (413 either way).

Routes without a bearer token: the local store's presigned objects (the URL's signature is the
credential, checked by the route), health and the API docs. /metrics takes an operator key.
"""

from __future__ import annotations

import json
import re

import redis
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from fleettune.shared.control.auth import OPERATOR_SCOPES, Principal, parse_token
from fleettune.shared.secagg.messages import MAX_MESSAGE_BYTES
from fleettune.workers.api import submit_path
from fleettune.workers.api.problems import MEDIA_TYPE, TITLES
from fleettune.workers.api.services import Services

PUBLIC = re.compile(r"^/(healthz|docs|docs/oauth2-redirect|redoc|openapi\.json)$")
OBJECTS = "/api/v1/objects/"
METRICS = "/metrics"
DEVICE = re.compile(r"^/api/v1/federations/[^/]+/(check-in|upload-url|updates|reports|receipts/[^/]+)$")
SPLIT_STEP = re.compile(r"^/api/v1/federations/[^/]+/split/[a-z_]+$")
SECAGG = re.compile(r"^/api/v1/federations/[^/]+/(identity|secagg/[0-9]+(/[a-z-]+)?)$")


class Edge:
    def __init__(self, app, services: Services) -> None:
        self.app, self.svc = app, services

    def _rate(self, path: str) -> tuple[str, int] | None:
        """(bucket, limit) of a device route's rate window; None for other routes."""
        settings = self.svc.runtime.settings
        if DEVICE.match(path):
            return "", settings.device_rate_limit
        if SPLIT_STEP.match(path):  # a step per batch, not per round: a bucket and limit of its own
            return ":split", settings.split_rate_limit
        if SECAGG.match(path):  # stage polls: a bucket of their own, so they never starve check-ins
            return ":secagg", settings.secagg_rate_limit
        return None

    def _limit(self, path: str) -> int:
        settings = self.svc.runtime.settings
        if path.startswith(OBJECTS):  # the grant says the exact size; this is the ceiling of any grant
            return max(settings.max_update_bytes, settings.max_model_bytes)
        if DEVICE.match(path):
            return settings.max_device_body_bytes
        if SPLIT_STEP.match(path):  # the route refines it to the federation's largest valid message
            return max(settings.max_update_bytes, settings.max_operator_body_bytes)
        if SECAGG.match(path):
            return MAX_MESSAGE_BYTES
        return settings.max_operator_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if not (PUBLIC.match(path) or path.startswith(OBJECTS)):
            try:
                who = await self._authenticate(scope, path)
            except (redis.ConnectionError, redis.TimeoutError):  # a Redis restart or failover: retry shortly
                return await _problem(send, 503, "unavailable", "the state store is unreachable; retry shortly",
                                      {"retry-after": "2"})
            if who is None:
                return await _problem(send, 401, "unauthenticated", "a valid bearer token is required",
                                      {"www-authenticate": "Bearer"})
            if path.startswith(METRICS) and who.scope not in OPERATOR_SCOPES:  # names, rounds and epsilon: operators'
                return await _problem(send, 403, "forbidden", "/metrics is for operator keys", {})
            scope.setdefault("state", {})["principal"] = who
        limit = self._limit(path)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await _problem(send, 413, "body_too_large", f"the body is {declared} bytes; this route takes at "
                                  f"most {limit}", {"connection": "close"})
        if (fed := submit_path.federation(scope)) is not None:  # the devices' hot path, as plain ASGI
            scope["endpoint"] = submit_path.submit  # its metrics label
            return await submit_path.submit(self.svc, fed, scope["state"]["principal"], scope,
                                            _bounded(receive, limit), send)
        await self.app(scope, _bounded(receive, limit), send)

    async def _authenticate(self, scope, path: str) -> Principal | None:
        """The token's principal; on a device route with redis.asyncio, the request is counted in the
        token's rate window by the same Redis script (`scope["state"]["rate"]`, judged by deps.device)."""
        token = _bearer(scope)
        if token is None:
            return None
        tokens, client = self.svc.tokens, self.svc.aredis
        if client is None:
            return await run_in_threadpool(tokens.authenticate, token)
        rate = self._rate(path)
        parsed = parse_token(token)
        if rate is None or parsed is None:
            return (await tokens.authenticate_async(client, token))[0]
        bucket, limit = rate
        key, ttl, now = self.svc.gateway.rate_window(parsed.key_id, bucket)
        who, count = await tokens.authenticate_async(client, token, key, ttl)
        scope.setdefault("state", {})["rate"] = (count, limit, now)
        return who


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _bearer(scope) -> str | None:
    raw = _header(scope, b"authorization")
    if raw is None or len(raw) > 256:
        return None
    scheme, _, token = raw.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _content_length(scope) -> int | None:
    raw = _header(scope, b"content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _bounded(receive, limit: int):
    """`receive` that counts body bytes and stops the request at `limit` (no Content-Length needed)."""
    seen = 0

    async def bounded():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"the body is over {limit} bytes, the most this route takes")
        return message

    return bounded


async def _problem(send, status: int, code: str, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"type": f"urn:fleettune:problem:{code}", "title": TITLES[status], "status": status,
                       "code": code, "detail": detail}).encode()
    raw = [(b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
