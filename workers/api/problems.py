"""Every error as application/problem+json (RFC 9457), with a stable `code` a client can branch on."""

from __future__ import annotations

import redis
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fleettune.shared.errors import ConfigError, Refusal, StateError, StorageUnavailable

MEDIA_TYPE = "application/problem+json"
TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
          409: "Conflict", 412: "Precondition Failed", 413: "Content Too Large", 422: "Unprocessable Content",
          429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


class Problem(BaseModel):
    """An error (RFC 9457): branch on `code`; a route's own problems may add members (e.g. `serve`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    code: str
    detail: str


_MEANING = {400: "the HTTP request itself is malformed (answered by the server before any route)", 401: "no valid bearer token (checked before the body is read)", 403: "the token's scope or federation "
            "does not allow this", 404: "no such resource", 409: "the resource's state does not allow it now",
            413: "the body is over this route's bound", 422: "a field is invalid (strict JSON: named in `detail`)",
            429: "over the device's rate limit (Retry-After)", 503: "Redis or S3 is unreachable: retry (Retry-After)"}


def documented(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these statuses: each a problem+json document."""
    return {status: {"model": Problem, "description": _MEANING[status],
                     "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for status in statuses}


OPERATOR = documented(400, 401, 403, 404, 409, 413, 422, 503)
DEVICE = documented(400, 401, 403, 404, 409, 413, 422, 429, 503)


def problem(status: int, code: str, detail: str = "", headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    body = {"type": f"urn:fleettune:problem:{code}", "title": TITLES.get(status, "Error"), "status": status,
            "code": code, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("body", "query", "path", "header")) or ".".join(map(str, loc))


def invalid_request(errors: list[dict]) -> JSONResponse:
    """422 naming each invalid field (pydantic's errors, from FastAPI or from a model validated directly)."""
    listed = [{"field": _field(tuple(e["loc"])) or "body", "message": e["msg"]} for e in errors][:20]
    fields = ", ".join(sorted({e["field"] for e in listed}))
    return problem(422, "invalid_request", f"invalid fields: {fields}", errors=listed)


def install(app: FastAPI) -> None:
    @app.exception_handler(Refusal)
    async def refused(request: Request, exc: Refusal) -> JSONResponse:
        return problem(exc.status, exc.code, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(exc.errors())

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
        return problem(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ConfigError)
    async def config(request: Request, exc: ConfigError) -> JSONResponse:
        return problem(422, "invalid_config", str(exc))

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Redis is restarting or unreachable: the client should retry, not treat it as a bug
        return problem(503, "unavailable", "the state store is unreachable; retry shortly", {"Retry-After": "5"})

    @app.exception_handler(StorageUnavailable)
    async def storage(request: Request, exc: Exception) -> JSONResponse:
        return problem(503, "unavailable", "the object store is unreachable; retry shortly", {"Retry-After": "5"})

    @app.exception_handler(StateError)
    async def state(request: Request, exc: StateError) -> JSONResponse:
        return problem(409, "conflict", str(exc))
