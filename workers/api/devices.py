"""Device routes: check-in, a sha256-bound upload URL, submit, and the outcome of a submission."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from shared.control.auth import Principal
from shared.control.schemas import CheckInIn, SubmitIn, UploadUrlIn
from shared.federation import DeviceProfile
from workers.api.deps import device, services
from workers.api.services import Services

router = APIRouter(prefix="/api/v1/federations/{name}", tags=["device gateway"])


def _base_url(request: Request) -> str:
    return str(request.base_url)


@router.post("/check-in", summary="Declare capabilities; get the round, download URLs and an upload URL")
def check_in(name: str, body: CheckInIn, request: Request, who: Principal = Depends(device),
             svc: Services = Depends(services)) -> dict:
    profile = DeviceProfile(who.device, ram_mb=body.ram_mb, storage_mb=body.storage_mb, tier=body.tier)
    return svc.gateway.check_in(name, profile, _base_url(request))


@router.post("/upload-url", summary="A write-once upload URL bound to the update's sha256")
def upload_url(name: str, body: UploadUrlIn, request: Request, who: Principal = Depends(device),
               svc: Services = Depends(services)) -> dict:
    return svc.gateway.upload_url(name, who.device, body.round, body.sha256, body.size, _base_url(request))


@router.post("/updates", status_code=202, summary="Submit the claim check of an uploaded update")
async def submit(name: str, body: SubmitIn, who: Principal = Depends(device), svc: Services = Depends(services)):
    receipt = svc.gateway.submit(name, who.device, body.model_dump())
    payload = {"receipt": receipt.receipt, "federation": name, "round": receipt.round, "device": receipt.device,
               "received_at": receipt.received_at, "duplicate": receipt.duplicate,
               "status_url": f"/api/v1/federations/{name}/receipts/{receipt.receipt}"}
    return JSONResponse(payload, status_code=202)


@router.get("/receipts/{receipt}", summary="The outcome of one of this device's submissions")
def receipt(name: str, receipt: str, who: Principal = Depends(device), svc: Services = Depends(services)) -> dict:
    return svc.gateway.receipt(name, who.device, receipt)
