"""Authentication and authorisation as FastAPI dependencies: who may call which route."""

from __future__ import annotations

from fastapi import Depends, Path, Request
from starlette.concurrency import run_in_threadpool

from fleettune.shared import keys
from fleettune.shared.control.auth import Principal
from fleettune.shared.errors import Refusal
from fleettune.workers.api.services import Services

BEARER = {"type": "http", "scheme": "bearer",
          "description": "an operator API key (ftk_...) or a device token (ftd_...)"}
# one Path() object per parameter: two route parameters that shared one both read the same value
# (PUT .../groups/{group} made a group named after its federation)
FedName = Path(max_length=keys.ID_MAX_LENGTH, pattern=keys.ID_PATTERN)
GroupName = Path(max_length=keys.ID_MAX_LENGTH, pattern=keys.ID_PATTERN)
DeviceId = Path(max_length=keys.ID_MAX_LENGTH, pattern=keys.ID_PATTERN)


_DECLARED: dict[int, frozenset[str]] = {}  # route -> the query parameters it declares


async def known_query(request: Request) -> None:
    """Refuse query parameters a route does not declare (422), as bodies refuse unknown fields."""
    route = request.scope.get("route")
    if route is None or not request.query_params:
        return
    declared = _DECLARED.get(id(route))
    if declared is None:
        declared = _DECLARED[id(route)] = frozenset(_query_names(route.dependant))
    unknown = sorted(set(request.query_params) - declared)
    if unknown:
        raise Refusal(422, "invalid_request", f"unknown query parameters: {', '.join(unknown)[:200]}")


def _query_names(dependant) -> set[str]:
    """The query parameters a route and its dependencies declare."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def services(request: Request) -> Services:
    return request.app.state.services  # async: no I/O, so no hop to the thread pool


async def principal(request: Request) -> Principal:
    """Who is calling, as the edge authenticated them before the body was read (see edge.py; the
    OpenAPI documents the bearer scheme on every route that needs it: see documented_security)."""
    who = getattr(request.state, "principal", None)
    if who is None:
        raise Refusal(401, "unauthenticated", "a valid bearer token is required",
                      headers={"WWW-Authenticate": "Bearer"})
    return who


def documented_security(schema: dict) -> dict:
    """The OpenAPI with the bearer scheme on every route the edge authenticates (not run per request:
    a FastAPI security dependency would parse the header again on the hot path)."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = BEARER
    for path, operations in schema.get("paths", {}).items():
        if path.startswith("/api/v1/") and not path.startswith("/api/v1/objects/"):
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]
    return schema


async def reader(who: Principal = Depends(principal)) -> Principal:
    """Operators with a read-only or admin key."""
    if who.scope not in ("admin", "read"):
        raise Refusal(403, "forbidden", "this route is for operator keys")
    return who


async def admin(who: Principal = Depends(principal)) -> Principal:
    if who.scope != "admin":
        raise Refusal(403, "forbidden", "this route needs an admin key")
    return who


def _device(who: Principal, name: str) -> Principal:
    if who.scope != "device":
        raise Refusal(403, "forbidden", "this route is for device tokens")
    if who.federation != name:
        raise Refusal(403, "forbidden", "this device token belongs to another federation")
    return who


async def device(request: Request, name: str = FedName, who: Principal = Depends(principal),
                 svc: Services = Depends(services)) -> Principal:
    """A device token of this federation, within its rate limit."""
    return await _within_rate(request, svc, _device(who, name), svc.runtime.settings.device_rate_limit, "")


async def split_device(request: Request, name: str = FedName, who: Principal = Depends(principal),
                       svc: Services = Depends(services)) -> Principal:
    """A device token of this federation, within its split-step limit (a step per batch, not per round)."""
    return await _within_rate(request, svc, _device(who, name), svc.runtime.settings.split_rate_limit, ":split")


async def secagg_device(request: Request, name: str = FedName, who: Principal = Depends(principal),
                        svc: Services = Depends(services)) -> Principal:
    """A device token of this federation, within its secure-aggregation limit (stage polls)."""
    return await _within_rate(request, svc, _device(who, name), svc.runtime.settings.secagg_rate_limit, ":secagg")


async def _within_rate(request: Request, svc: Services, who: Principal, limit: int, bucket: str) -> Principal:
    counted = getattr(request.state, "rate", None)  # the edge counted it with the token's lookup
    if counted is not None:
        svc.gateway.within_rate(*counted)
    else:  # embedded mode (fakeredis): count it now, in the thread pool
        await run_in_threadpool(svc.gateway.throttle, who.key_id, limit, bucket)
    return who
