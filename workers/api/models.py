"""Operator routes for the model registry."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field, StringConstraints

from fleettune.shared import keys
from fleettune.shared.protocol.adapter_spec import ModelDims
from fleettune.shared.control.auth import Principal
from fleettune.shared.control.schemas import Strict
from fleettune.workers.api import problems
from fleettune.workers.api.deps import admin, known_query, reader, services
from fleettune.workers.api.responses import ModelDownload, ModelList, ModelUpload, ModelVersion, RegisteredModel, Typed
from fleettune.workers.api.services import Services

router = APIRouter(prefix="/api/v1/models", tags=["model registry"], responses=problems.OPERATOR,
                   dependencies=[Depends(known_query)], route_class=Typed)
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")]
FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ModelPath = Annotated[str, StringConstraints(max_length=keys.ID_MAX_LENGTH, pattern=keys.ID_PATTERN)]


class DimsIn(Strict):
    hidden: int = Field(ge=1, le=65536)
    layers: int = Field(ge=1, le=1024)
    heads: int = Field(ge=1, le=1024)
    kv_heads: int = Field(ge=1, le=1024)
    intermediate: int = Field(ge=1, le=1 << 20)
    vocab: int = Field(ge=1, le=1 << 22)


class ModelIn(Strict):
    model_id: ModelPath
    kind: Literal["base", "adapter"] = "base"
    base_model: ModelPath | None = Field(None, description="for adapters: the base model they load on")
    dims: DimsIn | None = Field(None, description="for base models: shapes, so federations can adapt it")
    description: str = Field("", max_length=500)


class VersionIn(Strict):
    version: Version
    filename: FileName
    sha256: Sha256
    size: int = Field(ge=1, le=1 << 45)
    formats: list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.-]{1,32}$")]] = Field(
        default=["safetensors"], min_length=1, max_length=8)


class PartIn(Strict):
    part_number: int = Field(ge=1, le=10_000)
    etag: str = Field(min_length=1, max_length=128)


class CompleteIn(Strict):
    parts: list[PartIn] | None = Field(None, max_length=10_000)


class CurrentIn(Strict):
    version: Version


@router.post("", status_code=201, response_model=RegisteredModel)
def create_model(body: ModelIn, who: Principal = Depends(admin), svc: Services = Depends(services)) -> dict:
    if body.dims is not None:
        ModelDims(**body.dims.model_dump())  # the shape checks the adapter layouts rely on
    return svc.registry.create_model(body.model_id, body.kind, body.base_model,
                                     body.dims.model_dump() if body.dims else None, body.description)


@router.get("", response_model=ModelList)
def list_models(who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    return {"models": svc.registry.models()}


@router.get("/{model_id}", response_model=RegisteredModel)
def get_model(model_id: ModelPath, who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    return svc.registry.model(model_id)


@router.post("/{model_id}/versions", status_code=201, summary="Declare a version; get its presigned upload",
             response_model=ModelUpload)
def start_upload(model_id: ModelPath, body: VersionIn, request: Request, who: Principal = Depends(admin),
                 svc: Services = Depends(services)) -> dict:
    return svc.registry.start_upload(model_id, body.version, body.filename, body.sha256, body.size,
                                     body.formats, str(request.base_url))


@router.post("/{model_id}/versions/{version}/complete", summary="Verify the upload; the version becomes immutable",
             response_model=ModelVersion)
def complete_upload(model_id: ModelPath, version: Version, body: CompleteIn, who: Principal = Depends(admin),
                    svc: Services = Depends(services)) -> dict:
    parts = [(p.part_number, p.etag) for p in body.parts] if body.parts else None
    return svc.registry.complete_upload(model_id, version, parts)


@router.get("/{model_id}/versions/{version}", response_model=ModelVersion)
def get_version(model_id: ModelPath, version: Version, who: Principal = Depends(reader),
                svc: Services = Depends(services)) -> dict:
    return svc.registry.version(model_id, version)


@router.get("/{model_id}/versions/{version}/download", summary="A presigned download URL",
            response_model=ModelDownload)
def download(model_id: ModelPath, version: Version, request: Request, who: Principal = Depends(reader),
             svc: Services = Depends(services)) -> dict:
    return svc.registry.download(model_id, version, str(request.base_url))


@router.put("/{model_id}/current", response_model=RegisteredModel)
def set_current(model_id: ModelPath, body: CurrentIn, who: Principal = Depends(admin),
                svc: Services = Depends(services)) -> dict:
    return svc.registry.set_current(model_id, body.version)
