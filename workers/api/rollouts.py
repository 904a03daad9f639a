"""Operator routes for cascading tiers (the deployment) and canary rollouts of published versions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query

from fleettune.shared.control import canary
from fleettune.shared.protocol import versions
from fleettune.shared.control.auth import Principal
from fleettune.shared.control.schemas import DeploymentIn, DistillIn, PercentIn, ReasonIn, RolloutIn
from fleettune.shared.errors import ObjectNotFound, Refusal
from fleettune.workers.api import problems
from fleettune.workers.api.deps import FedName, admin, known_query, reader, services
from fleettune.workers.api.responses import Deployment, DistillQueued, Rollout, RolloutList, Serving, Typed
from fleettune.workers.api.services import Services

router = APIRouter(prefix="/api/v1/federations/{name}", tags=["tiers and rollouts"], responses=problems.OPERATOR,
                   dependencies=[Depends(known_query)], route_class=Typed)
RolloutId = Path(pattern=r"^ro-[0-9a-f]{1,32}$")


def _by(who: Principal) -> str:
    return who.name or who.key_id


def _published(svc: Services, name: str):
    def published(version: int) -> bool:
        try:
            versions.manifest(svc.runtime.store, name, version)
            return True
        except ObjectNotFound:
            return False
    return published


@router.get("/deployment", summary="Which model variant each device tier runs", response_model=Deployment)
def get_deployment(name: str = FedName, who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    svc.control.config(name)
    return {"federation": name, "tiers": svc.deployment.view(name)}


@router.put("/deployment", summary="Map tiers to variants: train, infer (own or distilled adapter) or api",
            response_model=Deployment)
def put_deployment(body: DeploymentIn, name: str = FedName, who: Principal = Depends(admin),
                   svc: Services = Depends(services)) -> dict:
    svc.control.config(name)
    svc.deployment.put(name, body.to_variants())
    newest = int(svc.runtime.state.federations.status(name).get("version", 0))
    for tier in svc.deployment.distilled_tiers(name):  # the newest version, distilled for new tiers now
        if newest and svc.deployment.distilled_at_or_below(name, tier, newest) != newest:
            svc.deployment.mark_due(name, newest, tier)
    return {"federation": name, "tiers": svc.deployment.view(name)}


@router.post("/deployment/distill", status_code=202, summary="Distil a published version for a tier (a worker does it)",
             response_model=DistillQueued)
def request_distill(body: DistillIn, name: str = FedName, who: Principal = Depends(admin),
                    svc: Services = Depends(services)) -> dict:
    svc.control.config(name)
    if body.tier not in svc.deployment.distilled_tiers(name):
        raise Refusal(404, "unknown_tier", f"{name} distils for no tier {body.tier!r}")
    if not _published(svc, name)(body.version):
        raise Refusal(404, "unknown_version", f"{name} has no published version {body.version}")
    svc.deployment.mark_due(name, body.version, body.tier)
    return {"federation": name, "version": body.version, "tier": body.tier, "status": "queued"}


@router.get("/serving", summary="The serving version and the live rollout, if any", response_model=Serving)
def serving(name: str = FedName, who: Principal = Depends(reader), svc: Services = Depends(services)) -> dict:
    svc.control.config(name)
    return {"federation": name, "serving": svc.rollouts.serving(name), "rollout": svc.rollouts.live(name)}


@router.post("/rollouts", status_code=201, summary="Create a canary rollout of a published version",
             response_model=Rollout)
def create_rollout(body: RolloutIn, name: str = FedName, who: Principal = Depends(admin),
                   svc: Services = Depends(services)) -> dict:
    svc.control.config(name)
    for group in body.groups:  # a target that does not exist would reach nobody: say so
        svc.devices.groups.spec(name, group)
    try:
        gates = canary.Gates(**body.gates.model_dump())
    except ValueError as exc:
        raise Refusal(422, "invalid_config", str(exc)) from None
    if body.max_step_seconds is not None and body.max_step_seconds < body.min_step_seconds:
        raise Refusal(422, "invalid_config", "max_step_seconds must be at least min_step_seconds: a step would "
                                             "pause as inconclusive before it could advance")
    rec = svc.rollouts.create(name, body.version, body.groups, body.start_percent, body.step_percent,
                              body.min_step_seconds, body.auto_advance, gates, _by(who), _published(svc, name),
                              max_step_seconds=body.max_step_seconds)
    if body.start:
        try:
            rec = svc.rollouts.start(name, rec["id"], _by(who), lambda v: svc.runtime.state.evaluations.evaluation(name, v))
        except Refusal as refused:  # it stays pending: say which one, to start later or roll back
            raise refused.with_extra(rollout=rec["id"]) from None
    return rec


@router.get("/rollouts", response_model=RolloutList)
def list_rollouts(name: str = FedName, limit: int = Query(100, ge=1, le=1000), who: Principal = Depends(reader),
                  svc: Services = Depends(services)) -> dict:
    svc.control.config(name)
    return {"federation": name, "rollouts": svc.rollouts.list(name, limit)}


@router.get("/rollouts/{rollout_id}", response_model=Rollout)
def get_rollout(rollout_id: str = RolloutId, name: str = FedName, who: Principal = Depends(reader),
                svc: Services = Depends(services)) -> dict:
    return svc.rollouts.get(name, rollout_id)


@router.post("/rollouts/{rollout_id}/start", summary="pending -> active, if the server's evaluation passes",
             response_model=Rollout)
def start_rollout(rollout_id: str = RolloutId, name: str = FedName, who: Principal = Depends(admin),
                  svc: Services = Depends(services)) -> dict:
    return svc.rollouts.start(name, rollout_id, _by(who), lambda v: svc.runtime.state.evaluations.evaluation(name, v))


@router.post("/rollouts/{rollout_id}/percentage", summary="Set the percentage, with a reason",
             response_model=Rollout)
def set_percentage(body: PercentIn, rollout_id: str = RolloutId, name: str = FedName,
                   who: Principal = Depends(admin), svc: Services = Depends(services)) -> dict:
    return svc.rollouts.set_percent(name, rollout_id, body.percent, body.reason, _by(who))


def _action(action: str, summary: str):
    @router.post(f"/rollouts/{{rollout_id}}/{action}", summary=summary, name=f"{action}_rollout",
                 response_model=Rollout)
    def act(body: ReasonIn | None = None, rollout_id: str = RolloutId, name: str = FedName,
            who: Principal = Depends(admin), svc: Services = Depends(services)) -> dict:
        return getattr(svc.rollouts, action)(name, rollout_id, _by(who), body.reason if body else None)
    return act


for _name, _summary in (("advance", "One step up (completes at 100 %)"), ("pause", "active -> paused"),
                        ("resume", "paused -> active"), ("rollback", "Back to the previous version, for everyone"),
                        ("promote", "The candidate to 100 %: it becomes the serving version")):
    _action(_name, _summary)
