"""Secure aggregation through the gateway: a device's identity key, and the SecAgg+ stages of a round.

The stage bodies and answers are msgpack (they carry keys, signatures and sealed shares as bytes);
the edge has authenticated the device and bounded the body before a byte is read. The masked
input itself goes to the object store through a write-once URL bound to its sha256 and exact size.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgpack
from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import Field, StringConstraints
from starlette.concurrency import run_in_threadpool

from fleettune.shared.control.auth import Principal
from fleettune.shared.control.schemas import Strict
from fleettune.shared.errors import Refusal
from fleettune.shared.federation import FederationConfig
from fleettune.shared.secagg.messages import MAX_MESSAGE_BYTES, Reason, SecAggError
from fleettune.workers.api import problems
from fleettune.workers.api.deps import FedName, known_query, secagg_device, services
from fleettune.workers.api.responses import ObjectUpload, Out, Typed
from fleettune.workers.api.services import Services

router = APIRouter(prefix="/api/v1/federations/{name}", tags=["secure aggregation"], responses=problems.DEVICE,
                   dependencies=[Depends(known_query)], route_class=Typed)
MEDIA_TYPE = "application/msgpack"
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
RoundNo = Path(ge=1, lt=2**53)
# how each refusal maps to HTTP: the named reason travels as the problem's code
STATUS = {Reason.STAGE_CLOSED: 409, Reason.DUPLICATE_STAGE: 409, Reason.NOT_IN_STAGE: 403,
          Reason.UNKNOWN_IDENTITY: 403}
BINARY = {"content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}


class IdentityIn(Strict):
    public_key: Hex64 = Field(description="the device's Ed25519 identity public key, hex")


class IdentityOut(Out):
    federation: str
    device: str
    public_key: str


class MaskedUrlIn(Strict):
    sha256: Hex64


class StageAck(Out):
    round: int
    attempt: int
    stage: str
    accepted: bool


def refusal(err: SecAggError) -> Refusal:
    return Refusal(STATUS.get(err.reason, 422), err.reason.value, err.detail)


def _setting(svc: Services, fed: str, round_no: int):
    """The secure-aggregation setting of the config this round runs under; 404/409 without one."""
    state = svc.runtime.state
    info = state.rounds.round_info(fed, round_no)
    config: FederationConfig | None = state.federations.config(fed, info.config_rev) if info else None
    if config is None:
        raise Refusal(404, "unknown_round", f"{fed} has no round {round_no}")
    if config.aggregation.secure_aggregation is None:
        raise Refusal(409, "not_secure", f"round {round_no} of {fed} does not use secure aggregation")
    if info.status != "open":
        raise Refusal(409, "stage_closed", f"round {round_no} is {info.status}")
    return config.aggregation.secure_aggregation


@router.put("/identity", summary="Register this device's identity key (once): it signs its secure-aggregation keys",
            response_model=IdentityOut)
def put_identity(body: IdentityIn, name: str = FedName, who: Principal = Depends(secagg_device),
                 svc: Services = Depends(services)) -> dict:
    svc.control.config(name)
    if not svc.runtime.coordinator.secure.register_identity(name, who.device, bytes.fromhex(body.public_key)):
        raise Refusal(409, "identity_conflict", "this device registered another identity key; it cannot be replaced")
    return {"federation": name, "device": who.device, "public_key": body.public_key}


@router.get("/secagg/{round_no}", summary="The secure-aggregation stage of a round, and this device's input for it",
            response_class=Response, responses={200: {"description": "msgpack: round, attempt, stage, deadline, "
                                                                     "answered, input", **BINARY}})
def get_stage(round_no: int = RoundNo, name: str = FedName, who: Principal = Depends(secagg_device),
              svc: Services = Depends(services)) -> Response:
    setting = _setting(svc, name, round_no)
    try:
        out = svc.runtime.coordinator.secure.stage_for(name, round_no, who.device, setting)
    except SecAggError as err:
        raise refusal(err) from None
    return Response(msgpack.packb(out, use_bin_type=True), media_type=MEDIA_TYPE)


@router.post("/secagg/{round_no}/masked-url", summary="A write-once upload URL for this device's masked input",
             response_model=ObjectUpload)
def masked_url(body: MaskedUrlIn, request: Request, round_no: int = RoundNo, name: str = FedName,
               who: Principal = Depends(secagg_device), svc: Services = Depends(services)) -> dict:
    _setting(svc, name, round_no)
    try:
        key, size, until = svc.runtime.coordinator.secure.masked_slot(name, round_no, who.device)
    except SecAggError as err:
        raise refusal(err) from None
    return dict(svc.presigner.put(key, until, str(request.base_url), body.sha256, size).as_dict(), key=key)


@router.post("/secagg/{round_no}/{stage}", summary="This device's answer to a stage (msgpack)",
             response_model=StageAck, openapi_extra={"requestBody": {"required": True, **BINARY}})
async def post_stage(stage: Literal["advertise", "share", "masked", "consistency", "unmask"], request: Request,
                     round_no: int = RoundNo, name: str = FedName, who: Principal = Depends(secagg_device),
                     svc: Services = Depends(services)) -> dict:
    body = bytearray()
    async for chunk in request.stream():  # the edge already stopped anything past MAX_MESSAGE_BYTES
        body += chunk
    if len(body) > MAX_MESSAGE_BYTES:
        raise Refusal(413, "too_large", f"a stage message is at most {MAX_MESSAGE_BYTES} bytes")

    def receive() -> dict:
        setting = _setting(svc, name, round_no)
        try:
            return svc.runtime.coordinator.secure.receive(name, round_no, who.device, stage, bytes(body), setting)
        except SecAggError as err:
            raise refusal(err) from None

    return await run_in_threadpool(receive)
