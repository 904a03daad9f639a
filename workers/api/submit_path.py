"""POST /api/v1/federations/{fed}/updates as plain ASGI: the devices' hot path, past FastAPI's routing,
dependency solving and response encoding (they were about 40 % of a submit's CPU).

The edge calls it once the token is authenticated and counted. It checks what the FastAPI route's
dependencies check (a device token of this federation, its rate window), validates the body with the
same strict model (SubmitIn), submits through the same Gateway.submit_async, and answers the same
documents. The FastAPI route in devices.py stays: it documents the route in the OpenAPI and serves
embedded mode (fakeredis, no redis.asyncio); anything unusual here is left to it.
"""

from __future__ import annotations

import json
import re

import redis
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from fleettune.shared import keys
from fleettune.shared.control.auth import Principal
from fleettune.shared.control.schemas import SubmitIn
from fleettune.shared.errors import Refusal
from fleettune.workers.api import problems
from fleettune.workers.api.services import Services

ROUTE = re.compile(rf"^/api/v1/federations/({keys.ID_RULE})/updates$")


def federation(scope) -> str | None:
    """The federation of a submit this path takes (a POST with JSON, counted by the edge), else None."""
    if scope["method"] != "POST" or "rate" not in scope.get("state", {}):
        return None
    found = ROUTE.match(scope["path"])
    return found.group(1) if found and len(found.group(1)) <= keys.ID_MAX_LENGTH else None


async def submit(svc: Services, fed: str, who: Principal, scope, receive, send) -> None:
    try:
        if who.scope != "device":
            raise Refusal(403, "forbidden", "this route is for device tokens")
        if who.federation != fed:
            raise Refusal(403, "forbidden", "this device token belongs to another federation")
        svc.gateway.within_rate(*scope["state"]["rate"])
        body = SubmitIn.model_validate_json(await _body(receive))
        receipt = await svc.gateway.submit_async(svc.aredis, fed, who.device, body.model_dump())
    except Refusal as refused:
        answer = problems.problem(refused.status, refused.code, refused.detail, refused.headers, **refused.extra)
    except ValidationError as invalid:
        answer = problems.invalid_request(invalid.errors())
    except HTTPException as too_large:  # the edge's bound on the body
        answer = problems.problem(too_large.status_code, "body_too_large", str(too_large.detail))
    except (redis.ConnectionError, redis.TimeoutError):
        answer = problems.problem(503, "unavailable", "the state store is unreachable; retry shortly",
                                  {"Retry-After": "5"})
    else:
        payload = json.dumps({"receipt": receipt.receipt, "federation": fed, "round": receipt.round,
                              "device": receipt.device, "received_at": receipt.received_at,
                              "duplicate": receipt.duplicate,
                              "status_url": f"/api/v1/federations/{fed}/receipts/{receipt.receipt}"}).encode()
        await send({"type": "http.response.start", "status": 202,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]})
        return await send({"type": "http.response.body", "body": payload})
    await answer(scope, receive, send)


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)
