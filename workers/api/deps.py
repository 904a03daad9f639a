"""Authentication and authorisation as FastAPI dependencies: who may call which route."""

from __future__ import annotations

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleettune.shared.control.auth import Principal
from fleettune.shared.errors import Refusal
from fleettune.workers.api.services import Services

bearer = HTTPBearer(auto_error=False, description="an operator API key (ftk_...) or a device token (ftd_...)")
# one Path() object per parameter: two route parameters that shared one both read the same value
# (PUT .../groups/{group} made a group named after its federation)
FedName = Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
GroupName = Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


async def services(request: Request) -> Services:
    return request.app.state.services  # async: no I/O, so no hop to the thread pool


async def principal(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    """Who is calling, as the edge authenticated them before the body was read (see edge.py).

    `creds` only documents the scheme in the OpenAPI; the edge has checked the same header."""
    who = getattr(request.state, "principal", None)
    if who is None:
        raise Refusal(401, "unauthenticated", "a valid bearer token is required",
                      headers={"WWW-Authenticate": "Bearer"})
    return who


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


async def device(name: str = FedName, who: Principal = Depends(principal),
                 svc: Services = Depends(services)) -> Principal:
    """A device token of this federation, within its rate limit (redis.asyncio: the loop never blocks)."""
    _device(who, name)
    await svc.throttle(name, who.device)
    return who


async def split_device(name: str = FedName, who: Principal = Depends(principal),
                       svc: Services = Depends(services)) -> Principal:
    """A device token of this federation, within its split-step limit (a step per batch, not per round)."""
    _device(who, name)
    await svc.throttle(name, who.device, svc.runtime.settings.split_rate_limit, ":split")
    return who
