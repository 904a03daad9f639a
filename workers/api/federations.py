"""Operator routes for federations: lifecycle, adapter and strategy, rounds, versions, devices, groups."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse

from fleettune.shared.protocol import versions
from fleettune.shared.control.auth import Principal
from fleettune.shared.control.schemas import AdapterIn, DeviceIn, FederationIn, GroupIn, StrategyIn
from fleettune.shared.errors import ObjectNotFound, Refusal
from fleettune.workers.api import problems
from fleettune.workers.api.deps import DeviceId, FedName, GroupName, admin, known_query, reader, services
from fleettune.workers.api.responses import (ConfigChange, DeadLetterList, DeviceList, DeviceToken, Federation,
                                           FederationList, Group, GroupSizes, Manifest, ManifestList, Round, Typed)
from fleettune.workers.api.services import Services

router = APIRouter(prefix="/api/v1", tags=["federations"], responses=problems.OPERATOR,
                   dependencies=[Depends(known_query)], route_class=Typed)


@router.get("/federations", response_model=FederationList)
def list_federations(who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    return {"federations": svc.control.federations()}


@router.post("/federations", status_code=201, response_model=Federation)
def create_federation(body: FederationIn, who: Principal = Depends(admin), svc: Services = Depends(services)) -> dict:
    svc.control.create_federation(body)
    return svc.control.federation(body.name)


@router.get("/federations/{name}", response_model=Federation)
def get_federation(name: str = FedName, who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    return svc.control.federation(name)


@router.delete("/federations/{name}", status_code=204)
def delete_federation(name: str = FedName, who: Principal = Depends(admin), svc: Services = Depends(services)):
    svc.control.delete_federation(name, svc.tokens)
    return Response(status_code=204)


def _configured(svc: Services, name: str, apply) -> JSONResponse:
    created = svc.control.ensure_federation(name)
    body = apply()
    return JSONResponse(body, status_code=201 if created else 200)


def _created(what: str) -> dict:
    """The 201 of a PUT that created the federation: the same body as its 200."""
    return {201: {"model": ConfigChange, "description": f"the federation did not exist: created with this {what}"}}


@router.post("/federations/{name}/resume", summary="Resume a halted or stopped federation for its rounds left",
             response_model=Federation)
def resume_federation(name: str = FedName, who: Principal = Depends(admin), svc: Services = Depends(services)) -> dict:
    return svc.control.resume(name)


@router.put("/federations/{name}/adapter", summary="Set the adapter (applies from the next round)",
            response_model=ConfigChange, responses=_created("adapter"))
def put_adapter(body: AdapterIn, name: str = FedName, who: Principal = Depends(admin),
                svc: Services = Depends(services)):
    return _configured(svc, name, lambda: svc.control.set_adapter(name, body))


@router.put("/federations/{name}/strategy", summary="Set the strategy (applies from the next round)",
            response_model=ConfigChange, responses=_created("strategy"))
def put_strategy(body: StrategyIn, name: str = FedName, who: Principal = Depends(admin),
                 svc: Services = Depends(services)):
    return _configured(svc, name, lambda: svc.control.set_strategy(name, body))


@router.get("/federations/{name}/rounds/{round_no}", response_model=Round)
def get_round(round_no: int, name: str = FedName, who: Principal = Depends(reader),
              svc: Services = Depends(services)) -> dict:
    return svc.control.round(name, round_no)


@router.get("/federations/{name}/versions", summary="Published adapter versions with their manifests",
            response_model=ManifestList)
def list_versions(name: str = FedName, limit: int = Query(100, ge=1, le=1000),
                  before: int | None = Query(None, ge=1, description="only versions below this (a page's next_before)"),
                  who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    svc.control.config(name)
    newest = int(svc.runtime.state.federations.status(name).get("version", 0))
    stop = min(newest + 1, before) if before is not None else newest + 1
    start = max(0, stop - limit)  # a page reads at most `limit` manifests, however many versions exist
    found = []
    for version in range(start, stop):
        try:
            found.append(versions.manifest(svc.runtime.store, name, version))
        except ObjectNotFound:
            continue
    return {"federation": name, "versions": found, "next_before": start or None}


@router.get("/federations/{name}/versions/{version}", response_model=Manifest)
def get_version(version: int, name: str = FedName, who: Principal = Depends(reader),
                svc: Services = Depends(services)) -> dict:
    svc.control.config(name)
    try:
        return versions.manifest(svc.runtime.store, name, version)
    except ObjectNotFound:
        raise Refusal(404, "unknown_version", f"{name} has no version {version}") from None


@router.post("/federations/{name}/devices", status_code=201, summary="Register a device; its token is shown once",
             response_model=DeviceToken)
def register_device(body: DeviceIn, name: str = FedName, who: Principal = Depends(admin),
                    svc: Services = Depends(services)) -> dict:
    token = svc.devices.register(name, body.profile(body.device_id))
    if body.identity_key is not None:  # the operator's word replaces any key the device set itself
        svc.runtime.coordinator.secure.set_identity(name, body.device_id, bytes.fromhex(body.identity_key))
    return {"federation": name, "device_id": body.device_id, "token": token}


@router.get("/federations/{name}/devices", response_model=DeviceList)
def list_devices(name: str = FedName, who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    return {"federation": name, "devices": svc.devices.list(name)}


@router.delete("/federations/{name}/devices/{device_id}", status_code=204, summary="Revoke a device's token")
def revoke_device(device_id: str = DeviceId, name: str = FedName, who: Principal = Depends(admin),
                  svc: Services = Depends(services)):
    svc.devices.revoke(name, device_id)
    return Response(status_code=204)


@router.get("/federations/{name}/groups", summary="Groups and their sizes (listed + matched at last check-in)",
            response_model=GroupSizes)
def list_groups(name: str = FedName, who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    return {"federation": name, "groups": svc.devices.group_sizes(name)}


@router.put("/federations/{name}/groups/{group}", summary="Create or replace a static, dynamic or hybrid group",
            response_model=Group)
def put_group(body: GroupIn, group: str = GroupName, name: str = FedName, who: Principal = Depends(admin),
              svc: Services = Depends(services)) -> dict:
    return dict(svc.devices.put_group(name, group, body.to_spec(), body.devices), federation=name)


@router.get("/federations/{name}/groups/{group}", response_model=Group)
def get_group(group: str = GroupName, name: str = FedName, who: Principal = Depends(reader),
              svc: Services = Depends(services)) -> dict:
    return dict(svc.devices.group(name, group), federation=name)


@router.delete("/federations/{name}/groups/{group}", status_code=204)
def delete_group(group: str = GroupName, name: str = FedName, who: Principal = Depends(admin),
                 svc: Services = Depends(services)):
    svc.devices.delete_group(name, group)
    return Response(status_code=204)


@router.get("/deadletters", tags=["operations"], response_model=DeadLetterList)
def deadletters(n: int = Query(20, ge=1, le=1000), who: Principal = Depends(reader),
                svc: Services = Depends(services)) -> dict:
    return {"deadletters": svc.runtime.state.accounting.deadletters(n)}
