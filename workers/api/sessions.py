"""Operator routes for training sessions and API keys."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import Field

from fleettune.shared.control.auth import Principal
from fleettune.shared.control.schemas import Strict, TrainingSessionIn
from fleettune.shared.errors import Refusal
from fleettune.workers.api import problems
from fleettune.workers.api.deps import admin, known_query, reader, services
from fleettune.workers.api.responses import ApiKeyCreated, ApiKeyList, SessionList, TrainingSession, Typed
from fleettune.workers.api.services import Services

router = APIRouter(prefix="/api/v1", tags=["training sessions"], responses=problems.OPERATOR,
                   dependencies=[Depends(known_query)], route_class=Typed)


@router.post("/training-sessions", status_code=201, response_model=TrainingSession)
def create_session(body: TrainingSessionIn, who: Principal = Depends(admin), svc: Services = Depends(services)) -> dict:
    return svc.control.create_session(body, created_by=who.name or who.key_id)


@router.get("/training-sessions", response_model=SessionList)
def list_sessions(limit: int = Query(100, ge=1, le=1000), who: Principal = Depends(reader),
                  svc: Services = Depends(services)) -> dict:
    return {"sessions": svc.control.sessions(limit)}


@router.get("/training-sessions/{session_id}", response_model=TrainingSession)
def get_session(session_id: str, who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    return svc.control.session(session_id)


@router.post("/training-sessions/{session_id}/stop", response_model=TrainingSession)
def stop_session(session_id: str, who: Principal = Depends(admin), svc: Services = Depends(services)) -> dict:
    return svc.control.stop_session(session_id, by=who.name or who.key_id)


class KeyIn(Strict):
    scope: Literal["admin", "read"] = "read"
    name: str = Field("", max_length=100)


@router.post("/keys", status_code=201, tags=["api keys"], summary="Create an operator key; shown once",
             response_model=ApiKeyCreated)
def create_key(body: KeyIn, who: Principal = Depends(admin), svc: Services = Depends(services)) -> dict:
    key_id, token = svc.tokens.create_api_key(body.scope, body.name)
    return {"id": key_id, "scope": body.scope, "name": body.name, "key": token}


@router.get("/keys", tags=["api keys"], response_model=ApiKeyList)
def list_keys(who: Principal = Depends(admin), svc: Services = Depends(services)) -> dict:
    return {"keys": svc.tokens.api_keys()}


@router.delete("/keys/{key_id}", status_code=204, tags=["api keys"])
def revoke_key(key_id: str, who: Principal = Depends(admin), svc: Services = Depends(services)):
    if not svc.tokens.revoke_api_key(key_id):
        raise Refusal(404, "unknown_key", f"no key {key_id!r}")
    return Response(status_code=204)
