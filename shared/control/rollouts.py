"""Canary rollouts of a federation's published versions to its devices, with quality gates.

A rollout moves one version (the candidate) onto a share of the devices in its target groups, in
steps; the rest serve the federation's serving version (the previous one). Lifecycle:
pending -> active <-> paused -> completed | rolled_back. Starting needs the server's own
evaluation of the candidate to pass; afterwards devices report quality per version through the
gateway, and at each look the canary arm is compared with the control arm (shared/control/canary.py). A
breached gate rolls the rollout back by itself; a step whose reports show the candidate within
every margin advances it, after its minimum time, when `auto_advance` is on. A step that does
neither within `max_step_seconds` (too few devices, or a candidate neither clearly worse nor
clearly within the margins) pauses as inconclusive, for a person to promote or roll back: it
never stays active for good. Completing makes the candidate the serving version.

One rollout per federation is live (pending, active or paused) at a time. Every change is an
optimistic transaction on the rollout's record, which keeps its history: what changed, who, why.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable, Iterable

import msgpack
import redis

from fleettune.shared import keys
from fleettune.shared.control import canary
from fleettune.shared.errors import Refusal
from fleettune.shared.state import FederationState

LIVE = ("pending", "active", "paused")
MAX_HISTORY = 1000
AUTO = "auto"  # who made the changes the gates make


@dataclasses.dataclass(frozen=True)
class Assignment:
    version: int  # what the device should serve
    previous: int  # the serving version, which devices outside the canary keep
    rollout: str | None = None
    arm: str | None = None  # "canary" | "control" | None (not targeted by the live rollout)


class Rollouts:
    def __init__(self, state: FederationState, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.r: redis.Redis = state.r
        self.clock = clock

    # --- reading ---------------------------------------------------------------------------------

    def serving(self, fed: str) -> int:
        """The version devices serve outside a canary: the last one a rollout completed (0 before)."""
        return int(self.r.hget(keys.fed_state(fed), "serving") or 0)

    def get(self, fed: str, rollout_id: str) -> dict:
        raw = self.r.get(keys.rollout(fed, rollout_id))
        if raw is None:
            raise Refusal(404, "unknown_rollout", f"{fed} has no rollout {rollout_id!r}")
        return json.loads(raw)

    def list(self, fed: str, limit: int = 100) -> list[dict]:
        ids = [m.decode() for m in self.r.zrevrange(keys.fed_rollouts(fed), 0, limit - 1)]
        return [self.get(fed, i) for i in ids]

    def live(self, fed: str) -> dict | None:
        rollout_id = self.r.hget(keys.fed_state(fed), "rollout")
        return self.get(fed, rollout_id.decode()) if rollout_id else None

    def assignment(self, fed: str, device: str, groups: Iterable[str]) -> Assignment:
        serving = self.serving(fed)
        rec = self.live(fed)
        if rec is None or not _targets(rec, groups):
            return Assignment(serving, serving)
        if rec["status"] in ("active", "paused") and canary.in_canary(rec["id"], device, rec["percent"]):
            return Assignment(rec["version"], rec["previous"], rec["id"], "canary")
        return Assignment(rec["previous"], rec["previous"], rec["id"], "control")

    # --- operator actions ------------------------------------------------------------------------

    def create(self, fed: str, version: int, groups: list[str], start_percent: float, step_percent: float,
               min_step_seconds: float, auto_advance: bool, gates: canary.Gates, by: str,
               published: Callable[[int], bool], max_step_seconds: float | None = None) -> dict:
        if not published(version):
            raise Refusal(404, "unknown_version", f"{fed} has no published version {version}")
        serving = self.serving(fed)
        if version == serving:
            raise Refusal(409, "already_serving", f"version {version} is already the serving version")
        rollout_id = f"ro-{secrets.token_hex(5)}"
        now = self.clock()
        rec = {"id": rollout_id, "federation": fed, "version": version, "previous": serving, "groups": groups,
               "start_percent": start_percent, "step_percent": step_percent, "min_step_seconds": min_step_seconds,
               "max_step_seconds": max_step_seconds, "waiting_since": None,
               "auto_advance": auto_advance, "gates": dataclasses.asdict(gates), "status": "pending", "percent": 0.0,
               "created_at": now, "created_by": by, "step_started_at": None, "looks": 0, "looked_at_reports": 0,
               "arms": {}, "comparisons": [], "reason": None,
               "history": [_entry(now, by, "create", 0.0, 0.0, "pending", None)]}
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(keys.fed_state(fed))
                    if pipe.hget(keys.fed_state(fed), "rollout"):
                        raise Refusal(409, "rollout_in_progress", f"{fed} has a live rollout: finish it first")
                    pipe.multi()
                    pipe.set(keys.rollout(fed, rollout_id), json.dumps(rec))
                    pipe.zadd(keys.fed_rollouts(fed), {rollout_id: now})
                    pipe.hset(keys.fed_state(fed), "rollout", rollout_id)
                    pipe.execute()
                    return rec
                except redis.WatchError:
                    continue

    def start(self, fed: str, rollout_id: str, by: str, evaluation: Callable[[int], dict | None]) -> dict:
        def change(rec: dict, now: float) -> dict:
            _require(rec, ("pending",), "start")
            gates = canary.Gates(**rec["gates"])
            candidate = evaluation(rec["version"])
            serving = evaluation(rec["previous"])
            if serving is None and candidate is not None and rec["previous"] == 0:
                serving = {"heldout_mean": candidate["base_heldout_mean"]}  # version 0 is the base model
            refusal = canary.server_gate(candidate, serving, gates)
            if refusal is not None:
                code = "evaluation_pending" if candidate is None else "server_gate_failed"
                raise Refusal(409, code, f"version {rec['version']} may not start: {refusal}")
            return _moved(rec, now, by, "start", rec["start_percent"], "active", "server evaluation passed")

        return self._mutate(fed, rollout_id, change)

    def advance(self, fed: str, rollout_id: str, by: str, reason: str | None = None) -> dict:
        def change(rec: dict, now: float) -> dict:
            _require(rec, ("active",), "advance")
            return _step(rec, now, by, reason)

        return self._mutate(fed, rollout_id, change)

    def set_percent(self, fed: str, rollout_id: str, percent: float, reason: str, by: str) -> dict:
        def change(rec: dict, now: float) -> dict:
            _require(rec, ("active", "paused"), "set the percentage of")
            status = "completed" if percent >= 100 else rec["status"]
            return _moved(rec, now, by, "set_percent", percent, status, reason)

        return self._mutate(fed, rollout_id, change)

    def pause(self, fed: str, rollout_id: str, by: str, reason: str | None = None) -> dict:
        def change(rec: dict, now: float) -> dict:
            _require(rec, ("active",), "pause")
            return _moved(rec, now, by, "pause", rec["percent"], "paused", reason)

        return self._mutate(fed, rollout_id, change)

    def resume(self, fed: str, rollout_id: str, by: str, reason: str | None = None) -> dict:
        def change(rec: dict, now: float) -> dict:
            _require(rec, ("paused",), "resume")
            # a resumed step gets max_step_seconds again before it can pause as inconclusive
            return dict(_moved(rec, now, by, "resume", rec["percent"], "active", reason), waiting_since=now)

        return self._mutate(fed, rollout_id, change)

    def rollback(self, fed: str, rollout_id: str, by: str, reason: str | None = None) -> dict:
        def change(rec: dict, now: float) -> dict:
            _require(rec, LIVE, "roll back")
            return _moved(rec, now, by, "rollback", 0.0, "rolled_back", reason)

        return self._mutate(fed, rollout_id, change)

    def promote(self, fed: str, rollout_id: str, by: str, reason: str | None = None) -> dict:
        def change(rec: dict, now: float) -> dict:
            _require(rec, ("active", "paused"), "promote")
            return _moved(rec, now, by, "promote", 100.0, "completed", reason)

        return self._mutate(fed, rollout_id, change)

    # --- device reports and the gates ------------------------------------------------------------

    def report(self, fed: str, device: str, groups: Iterable[str], version: int, values: dict[str, float]) -> dict:
        """Record a device's latest quality report on the version it serves, then look if one is due."""
        got = self.assignment(fed, device, groups)
        if got.rollout is None:
            raise Refusal(409, "no_active_rollout", f"{device} is in no live rollout of {fed}")
        if version != got.version:
            raise Refusal(409, "not_assigned", f"{device} serves version {got.version}, not {version}")
        entry = dict(values, at=self.clock())
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hset(keys.rollout_reports(fed, got.rollout, version), device, msgpack.packb(entry))
            pipe.incr(keys.rollout_events(fed, got.rollout))
            pipe.execute()
        rec = self.tick(fed)
        return {"federation": fed, "device": device, "version": version, "rollout": got.rollout, "arm": got.arm,
                "rollout_status": rec["status"] if rec else None, "percent": rec["percent"] if rec else None}

    def tick(self, fed: str) -> dict | None:
        """Look at the live rollout if a look is due: roll back on a breach, advance a clean step."""
        rec = self.live(fed)
        if rec is None or rec["status"] != "active":
            return rec
        gates = canary.Gates(**rec["gates"])
        # look when the reports (both arms, repeats included) have grown by half since the last
        # look: looks grow logarithmically with the reports, which keeps them within max_looks
        seen = self._events(fed, rec["id"])
        grown = seen - rec["looked_at_reports"] >= max(gates.min_reports, rec["looked_at_reports"] // 2)
        now = self.clock()
        if not grown and not self._advance_due(rec, now) and not _overdue(rec, now):
            return rec
        return self._mutate(fed, rec["id"], self._look)

    def _advance_due(self, rec: dict, now: float) -> bool:
        return (rec["auto_advance"] and now - rec["step_started_at"] >= rec["min_step_seconds"]
                and rec.get("looked_step") != rec["step_started_at"])

    def _events(self, fed: str, rollout_id: str) -> int:
        return int(self.r.get(keys.rollout_events(fed, rollout_id)) or 0)

    def _reports(self, fed: str, rollout_id: str, version: int) -> list[dict]:
        raw = self.r.hgetall(keys.rollout_reports(fed, rollout_id, version))
        return [msgpack.unpackb(v) for v in raw.values()]

    def _look(self, rec: dict, now: float) -> dict:
        if rec["status"] != "active":
            return rec
        fed, gates = rec["federation"], canary.Gates(**rec["gates"])
        canary_reports = self._reports(fed, rec["id"], rec["version"])
        control_reports = self._reports(fed, rec["id"], rec["previous"])
        comparisons = canary.compare_arms(canary_reports, control_reports, gates)
        rec = dict(rec, looks=rec["looks"] + 1, looked_at_reports=self._events(fed, rec["id"]),
                   comparisons=[dataclasses.asdict(c) for c in comparisons],
                   arms={"canary": canary.summary(canary_reports), "control": canary.summary(control_reports)})
        breached = [c for c in comparisons if c.breached]
        if breached:
            return _moved(rec, now, AUTO, "rollback", 0.0, "rolled_back",
                          "gate breached: " + "; ".join(c.describe() for c in breached))
        step_reports = sum(1 for r in canary_reports if r["at"] >= rec["step_started_at"])
        if (rec["auto_advance"] and now - rec["step_started_at"] >= rec["min_step_seconds"]
                and step_reports >= gates.min_reports and comparisons and all(c.within for c in comparisons)):
            return _step(rec, now, AUTO, f"{step_reports} canary reports this step, within every margin: "
                         + "; ".join(c.describe() for c in comparisons))
        if _overdue(rec, now):
            held = "; ".join(c.describe() for c in comparisons) or (
                f"fewer than {gates.min_reports} reports in an arm (canary {len(canary_reports)}, "
                f"control {len(control_reports)})")
            return _moved(rec, now, AUTO, "pause", rec["percent"], "paused",
                          f"inconclusive: no gate decided within {rec['max_step_seconds']:g} s: {held}")
        if self._advance_due(rec, now):
            rec["looked_step"] = rec["step_started_at"]  # the beat looks at a due step once; reports look again
        return rec

    # --- the transaction -------------------------------------------------------------------------

    def _mutate(self, fed: str, rollout_id: str, change: Callable[[dict, float], dict]) -> dict:
        key = keys.rollout(fed, rollout_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise Refusal(404, "unknown_rollout", f"{fed} has no rollout {rollout_id!r}")
                    before = json.loads(raw)
                    rec = change(before, self.clock())
                    pipe.multi()
                    pipe.set(key, json.dumps(rec))
                    if rec["status"] != before["status"] and rec["status"] not in LIVE:
                        pipe.hdel(keys.fed_state(fed), "rollout")
                        if rec["status"] == "completed":
                            pipe.hset(keys.fed_state(fed), "serving", rec["version"])
                        else:
                            trigger = "auto" if rec["history"][-1]["by"] == AUTO else "manual"
                            pipe.hincrby(keys.fed_stats(fed), f"rollbacks:{trigger}", 1)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return rec


def _overdue(rec: dict, now: float) -> bool:
    """A step has waited past max_step_seconds for a decision (counted again from a resume)."""
    limit = rec.get("max_step_seconds")  # absent from rollouts created before the field
    since = max(rec["step_started_at"], rec.get("waiting_since") or 0.0)
    return limit is not None and now - since >= limit


def _targets(rec: dict, groups: Iterable[str]) -> bool:
    return not rec["groups"] or bool(set(rec["groups"]) & set(groups))


def _require(rec: dict, allowed: tuple[str, ...], action: str) -> None:
    if rec["status"] not in allowed:
        raise Refusal(409, "invalid_transition", f"cannot {action} a rollout that is {rec['status']}")


def _entry(at: float, by: str, action: str, before: float, after: float, status: str, reason: str | None) -> dict:
    return {"at": at, "by": by, "action": action, "from_percent": before, "to_percent": after, "status": status,
            "reason": reason}


def _moved(rec: dict, now: float, by: str, action: str, percent: float, status: str, reason: str | None) -> dict:
    percent = max(0.0, min(100.0, float(percent)))
    history = rec["history"] + [_entry(now, by, action, rec["percent"], percent, status, reason)]
    step_started = now if percent != rec["percent"] or rec["step_started_at"] is None else rec["step_started_at"]
    return dict(rec, percent=percent, status=status, history=history[-MAX_HISTORY:], step_started_at=step_started,
                reason=reason if status in ("rolled_back", "completed") else rec.get("reason"))


def _step(rec: dict, now: float, by: str, reason: str | None) -> dict:
    target = min(100.0, rec["percent"] + rec["step_percent"])
    return _moved(rec, now, by, "advance", target, "completed" if target >= 100 else "active", reason)

