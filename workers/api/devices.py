"""Device routes: check-in, a sha256-bound upload URL, submit, a submission's outcome, quality reports."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from fleettune.shared.control.auth import Principal
from fleettune.shared.control.schemas import CheckInIn, ReportIn, SubmitIn, UploadUrlIn
from fleettune.workers.api import problems
from fleettune.workers.api.deps import device, known_query, services
from fleettune.workers.api.responses import CheckIn, ObjectUpload, ReceiptStatus, ReportAck, SubmitReceipt, Typed
from fleettune.workers.api.services import Services

router = APIRouter(prefix="/api/v1/federations/{name}", tags=["device gateway"], responses=problems.DEVICE,
                   dependencies=[Depends(known_query)], route_class=Typed)


def _base_url(request: Request) -> str:
    return str(request.base_url)


@router.post("/check-in", summary="Declare capabilities; get what to run, and the round to train in",
             response_model=CheckIn)
def check_in(name: str, body: CheckInIn, request: Request, who: Principal = Depends(device),
             svc: Services = Depends(services)) -> dict:
    return svc.gateway.check_in(name, body.profile(who.device), _base_url(request))


@router.post("/reports", summary="Report quality of the version this device serves (canary gates)",
             response_model=ReportAck)
def report(name: str, body: ReportIn, who: Principal = Depends(device), svc: Services = Depends(services)) -> dict:
    return svc.gateway.report(name, who.device, body.version, body.values())


@router.post("/upload-url", summary="A write-once upload URL bound to the update's sha256",
             response_model=ObjectUpload)
def upload_url(name: str, body: UploadUrlIn, request: Request, who: Principal = Depends(device),
               svc: Services = Depends(services)) -> dict:
    return svc.gateway.upload_url(name, who.device, body.round, body.sha256, body.size, _base_url(request))


# documents the route: submit_path.py serves it in production and writes the same SubmitReceipt
@router.post("/updates", status_code=202, summary="Submit the claim check of an uploaded update",
             response_model=SubmitReceipt)
async def submit(name: str, body: SubmitIn, who: Principal = Depends(device), svc: Services = Depends(services)):
    receipt = await svc.submit(name, who.device, body.model_dump())
    payload = {"receipt": receipt.receipt, "federation": name, "round": receipt.round, "device": receipt.device,
               "received_at": receipt.received_at, "duplicate": receipt.duplicate,
               "status_url": f"/api/v1/federations/{name}/receipts/{receipt.receipt}"}
    return JSONResponse(payload, status_code=202)


@router.get("/receipts/{receipt}", summary="The outcome of one of this device's submissions",
            response_model=ReceiptStatus)
def receipt(name: str, receipt: str, who: Principal = Depends(device), svc: Services = Depends(services)) -> dict:
    return svc.gateway.receipt(name, who.device, receipt)
