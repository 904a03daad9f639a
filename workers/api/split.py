"""Split learning through the gateway: devices' steps forwarded to the split server, and its config.

The gateway authenticates the device (its token, its federation, its split-step rate limit),
refuses a body larger than the largest valid message for the federation's config before reading
more of it, and forwards the bytes to the split server (FLEETTUNE_SPLIT_URL) with the device's id
and the shared secret. The split server parses strictly and answers; its problems pass through.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import httpx
from fastapi import APIRouter, Depends, Query, Request, Response

from fleettune.shared import keys
from fleettune.shared.control.auth import Principal
from fleettune.shared.control.schemas import SplitIn
from fleettune.shared.errors import Refusal
from fleettune.shared.split import config as split_config
from fleettune.shared.split import wire
from fleettune.shared.split.wire import STEP_ID, shared_secret
from fleettune.shared.split.config import SplitConfig
from fleettune.workers.api import problems
from fleettune.workers.api.deps import FedName, admin, known_query, reader, services, split_device
from fleettune.workers.api.responses import SplitStatus, Typed
from fleettune.workers.api.services import Services

router = APIRouter(prefix="/api/v1/federations/{name}/split", tags=["split learning"], responses=problems.DEVICE,
                   dependencies=[Depends(known_query)], route_class=Typed)
PASSED = ("x-loss", "x-step")


def _config(svc: Services, name: str) -> SplitConfig:
    svc.control.config(name)
    config = split_config.load(svc.runtime.redis, name)
    if config is None:
        raise Refusal(404, "split_not_configured", f"{name} has no split-learning config")
    return config


@router.put("", summary="Configure split learning: the cut, its mode, DP at the cut, and bounds",
            response_model=SplitStatus)
def put_split(body: SplitIn, name: str = FedName, who: Principal = Depends(admin),
              svc: Services = Depends(services)) -> dict:
    fed = svc.control.config(name)
    try:
        config = SplitConfig(**body.model_dump())
        config.server_layers(fed.model.layers)  # a cut that leaves the server no layer is refused now
        if config.bottleneck > fed.model.hidden:
            raise ValueError(f"bottleneck {config.bottleneck} is wider than the model's hidden size {fed.model.hidden}")
    except ValueError as exc:
        raise Refusal(422, "invalid_config", str(exc)) from None
    if fed.adapter.kind == "prompt_tuning":
        raise Refusal(422, "invalid_config", "split learning trains LoRA on both sides, not a soft prompt")
    split_config.save(svc.runtime.redis, name, config)
    return split_status(name, who, svc)


@router.get("", summary="The split config, the server part's version, and each device's steps and epsilon",
            response_model=SplitStatus)
def split_status(name: str = FedName, who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    config = _config(svc, name)
    r = svc.runtime.redis
    state = {k.decode(): int(v) for k, v in r.hgetall(keys.split_state(name)).items()}
    steps = {k.decode(): int(v) for k, v in r.hgetall(keys.split_steps(name)).items()}
    return {"federation": name, "config": dataclasses.asdict(config), "server_part_version": state.get("version", 0),
            "server_steps": state.get("steps", 0),
            "rejected": {k.split(":", 1)[1]: v for k, v in state.items() if k.startswith("rejected:")},
            "devices": {d: {"steps": n} for d, n in sorted(steps.items())},
            "privacy": _privacy(config, steps)}


def _privacy(config: SplitConfig, steps: dict[str, int]) -> str:
    """What the accountant can say, and what DP at the cut protects in this mode."""
    protects = ("activations only: the labels (the text, shifted by one token) reach the server in the clear"
                if config.mode == "two_part" else
                "one example's activations at the cut; inputs and labels never leave the device, but the gradient "
                "a device returns for the server's layers is not noised")
    if config.sigma == 0:
        return f"no noise at the cut (sigma 0): no DP; {protects}"
    if config.sample_rate is None:
        return (f"each device's epsilon is its own: it depends on its sampling rate (batch / its sequences), which "
                f"only it knows; sigma={config.sigma}, delta={config.delta}; protects {protects}")
    worst = max(steps.values(), default=0)
    return (f"(epsilon, delta={config.delta:g}) per device from its steps at q={config.sample_rate:g}, "
            f"sigma={config.sigma:g}: the most-stepped device is at epsilon {config.epsilon(worst):.3g} after "
            f"{worst} steps; protects {protects}")


@router.post("/{action}", summary="One split step of this device: step (two_part), forward or backward (u_shaped)",
             response_class=Response, responses={200: {
                 "description": "the split server's answer: safetensors (`grad` or `residual`); x-loss, x-step headers",
                 "content": {wire.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}})
async def split_step(action: Literal["step", "forward", "backward"], request: Request, name: str = FedName,
                     batch: int | None = Query(None, ge=1, le=1024), step: str | None = Query(None, pattern=STEP_ID),
                     who: Principal = Depends(split_device), svc: Services = Depends(services)) -> Response:
    config = _config(svc, name)
    if not svc.runtime.settings.split_url:
        raise Refusal(503, "split_unavailable", "no split server is configured (FLEETTUNE_SPLIT_URL)")
    if (action == "backward") != (step is not None) or (action != "backward") != (batch is not None):
        raise Refusal(422, "invalid_request", "step and forward take ?batch=; backward takes ?step=")
    hidden = svc.control.config(name).model.hidden
    limit = wire.max_bytes(config.max_batch, config.seq_len, hidden)
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Refusal(413, "too_large", f"a split message is at most {limit} bytes for this config")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refusal(413, "too_large", f"a split message is at most {limit} bytes for this config")
    client = _http(request)
    params = {"batch": batch} if batch is not None else {"step": step}
    try:
        answer = await client.post(f"{svc.runtime.settings.split_url.rstrip('/')}/internal/{name}/{action}",
                                   content=bytes(body), params=params,
                                   headers={"x-fleettune-device": who.device,
                                            "x-fleettune-secret": _secret(request, svc)})
    except httpx.HTTPError as exc:
        raise Refusal(503, "split_unavailable", f"the split server did not answer: {type(exc).__name__}",
                      {"Retry-After": "1"}) from None
    headers = {k: answer.headers[k] for k in PASSED if k in answer.headers}
    return Response(answer.content, status_code=answer.status_code, headers=headers,
                    media_type=answer.headers.get("content-type"))


def _http(request: Request) -> httpx.AsyncClient:
    state = request.app.state
    if getattr(state, "split_http", None) is None:
        state.split_http = httpx.AsyncClient(timeout=120)
    return state.split_http


def _secret(request: Request, svc: Services) -> str:
    state = request.app.state
    if getattr(state, "split_secret", None) is None:
        state.split_secret = shared_secret(svc.runtime.redis).hex()
    return state.split_secret
