"""Operator routes for a published version's exports to on-device runtimes (ONNX, ExecuTorch, Core ML, LiteRT)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from fleettune.shared.control.auth import Principal
from fleettune.shared.control.schemas import ExportIn
from fleettune.shared.errors import ObjectNotFound, Refusal
from fleettune.shared.export.tracking import Exports
from fleettune.shared.protocol import runtimes, versions
from fleettune.workers.api import problems
from fleettune.workers.api.deps import FedName, admin, known_query, reader, services
from fleettune.workers.api.responses import ArtifactList, ExportQueued, Typed
from fleettune.workers.api.services import Services

router = APIRouter(prefix="/api/v1/federations/{name}/versions/{version}/artifacts", tags=["exports"],
                   responses=problems.OPERATOR, dependencies=[Depends(known_query)], route_class=Typed)


def _published(svc: Services, name: str, version: int) -> None:
    svc.control.config(name)
    try:
        versions.manifest(svc.runtime.store, name, version)
    except ObjectNotFound:
        raise Refusal(404, "unknown_version", f"{name} has no published version {version}") from None


@router.get("", summary="The version's exports: status, parity, files (with presigned downloads)",
            response_model=ArtifactList)
def list_artifacts(version: int, request: Request, name: str = FedName, who: Principal = Depends(reader),
                   svc: Services = Depends(services)) -> dict:
    _published(svc, name, version)
    until = time.time() + svc.runtime.settings.url_ttl_s
    out = []
    for fmt, entry in Exports(svc.runtime.redis).of_version(name, version).items():
        record = entry.get("record") or {}
        item = {"format": fmt, "runtime": runtimes.FORMATS[fmt].runtime, "status": entry["status"],
                "attempts": entry.get("attempts", 0), "reason": entry.get("reason")}
        if record:
            files = {part: {"key": record[part]["key"], "sha256": record[part]["sha256"], "size": record[part]["size"],
                            "download": svc.presigner.get(record[part]["key"], until, str(request.base_url)).as_dict()}
                     for part in ("base", "adapter")}
            item.update(files, max_abs_logit_diff=record["parity"]["max_abs_logit_diff"],
                        checks=record["parity"].get("checked"), inputs=record["base"]["inputs"],
                        full_over_adapter=record["bytes"]["full_over_adapter"])
        out.append(item)
    return {"federation": name, "version": version, "artifacts": out}


@router.post("", status_code=202, summary="Export the version to these formats (a worker does it)",
             response_model=ExportQueued)
def request_export(version: int, body: ExportIn, name: str = FedName, who: Principal = Depends(admin),
                   svc: Services = Depends(services)) -> dict:
    _published(svc, name, version)
    formats = runtimes.wanted(body.formats)
    exports = Exports(svc.runtime.redis)
    for fmt in formats:
        entry = exports.entry(name, version, fmt)
        if entry is not None and entry["status"] == "failed":  # a failed one is tried afresh
            exports.forget(name, version, fmt)
        exports.mark_due(name, version, fmt, at=0.0)  # new ones only; beat's next sweep sends it
    return {"federation": name, "version": version, "formats": list(formats), "status": "queued"}
