"""Federations and training sessions as the API sees them, over the round machinery in shared/.

A federation is a named configuration with its enrolled devices and published versions. A training
session runs rounds of one federation: it opens the next round and bounds how many follow.
Lifecycle of a session: pending -> active <-> aggregating -> completed | failed | stopped.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable

from fleettune.shared import keys
from fleettune.shared.protocol import runtimes
from fleettune.shared.control.schemas import (FederationIn, StrategyIn, TrainingSessionIn, apply_strategy,
                                    evaluation_config, resolve_model)
from fleettune.shared.errors import Refusal
from fleettune.shared.federation import FederationConfig
from fleettune.shared.pipeline.rounds import RoundCoordinator
from fleettune.shared.state import FederationState

FINAL = ("completed", "failed", "stopped")


class Control:
    def __init__(self, state: FederationState, coordinator: RoundCoordinator, clock: Callable[[], float] = time.time,
                 registered_model: Callable[[str], dict | None] = lambda _: None,
                 max_update_bytes: int = 64 * 1024 * 1024, begin: Callable[[str], object] | None = None) -> None:
        self.state = state
        # how a recorded start gets done: a Celery task in `fleettune api` (v0 is as large as the
        # adapter: never built in the API process), here and now where there is no worker
        self.begin = begin or coordinator.start_requested
        self.max_update_bytes = max_update_bytes
        self.r = state.r
        self.coordinator = coordinator
        self.clock = clock
        self.registered_model = registered_model

    # --- federations -----------------------------------------------------------------------------

    def config(self, fed: str) -> FederationConfig:
        config = self.state.federations.config(fed)
        if config is None:
            raise Refusal(404, "unknown_federation", f"no federation {fed!r}")
        return config

    def create_federation(self, body: FederationIn) -> FederationConfig:
        if self.state.federations.config(body.name) is not None:
            raise Refusal(409, "federation_exists", f"federation {body.name!r} exists")
        registered = self.registered_model(body.model_id)
        dims, base = resolve_model(body.model_id, registered)
        config = FederationConfig(name=body.name, model=dims, base_model=base, seed=body.seed,
                                  evaluation=evaluation_config(body.evaluation),
                                  exports=runtimes.wanted([*(body.exports or ()), *(registered or {}).get("formats", ())]))
        if body.adapter is not None:
            config = dataclasses.replace(config, adapter=body.adapter.to_config())
        if body.strategy is not None:
            config = self._with_strategy(config, body.strategy, revise=False)
        self._check_fits(config)
        self.state.federations.create(config, status="idle")
        return config

    def _with_strategy(self, config: FederationConfig, strategy: StrategyIn, revise: bool = True) -> FederationConfig:
        changes = apply_strategy(config, strategy, strategy.round_config, strategy.device_filter,
                                 strategy.algorithm, strategy.aggregation)
        return config.revised(**changes) if revise else dataclasses.replace(config, **changes)

    def _check_fits(self, config: FederationConfig) -> None:
        """An adapter whose every update would be refused for its size is refused now, by name."""
        size = 4 * config.spec.num_parameters  # float32, the smallest dtype the server accepts for it
        if size > self.max_update_bytes:
            raise Refusal(422, "adapter_too_large", f"one update of this adapter is {size} bytes "
                          f"({config.spec.num_parameters} float32 parameters), over the {self.max_update_bytes}-byte "
                          "limit on updates (FLEETTUNE_MAX_UPDATE_BYTES): lower the rank or target fewer modules")

    def ensure_federation(self, fed: str) -> bool:
        """Create `fed` with defaults when a PUT names one that does not exist; True if created."""
        if self.state.federations.config(fed) is not None:
            return False
        self.create_federation(FederationIn(name=fed))
        return True

    def set_adapter(self, fed: str, adapter) -> dict:
        return self._propose(fed, lambda c: c.revised(adapter=adapter.to_config()))

    def set_strategy(self, fed: str, strategy: StrategyIn) -> dict:
        return self._propose(fed, lambda c: self._with_strategy(c, strategy))

    def _propose(self, fed: str, change) -> dict:
        self._check_fits(change(self.state.federations.pending_config(fed) or self.config(fed)))
        config, now = self.state.federations.propose_config(fed, change)
        current = self.state.federations.current_round(fed)
        # either way the first round to run under it is the next one to open
        return {"federation": fed, "revision": config.revision, "applies_from_round": current + 1,
                "applied": "now" if now else "when the next round opens",
                "config": federation_view(config)}

    def federations(self) -> list[dict]:
        return [self.federation(name) for name in self.state.federations.names()]

    def federation(self, fed: str) -> dict:
        config = self.config(fed)
        status = self.state.federations.status(fed)
        pending = self.state.federations.pending_config(fed)
        return {"name": fed, "status": status.get("status"), "round": int(status.get("round", 0)),
                "version": int(status.get("version", 0)), "session": status.get("session"),
                "config": federation_view(config), "pending_config": federation_view(pending) if pending else None,
                "devices": len(self.state.federations.enrolled(fed)), "stats": self.state.federations.stats(fed)}

    def delete_federation(self, fed: str, tokens) -> None:
        self.config(fed)
        if self.state.federations.status(fed).get("status") == "active":
            raise Refusal(409, "session_active", f"{fed} is training: stop its session first")
        for device in self.r.hkeys(keys.fed_device_tokens(fed)):
            tokens.revoke_device(fed, device.decode())
        self.state.federations.delete(fed)

    def round(self, fed: str, round_no: int) -> dict:
        self.config(fed)
        info = self.state.rounds.round_info(fed, round_no)
        if info is None:
            raise Refusal(404, "unknown_round", f"{fed} has no round {round_no}")
        rejected = {}
        for entry in self.state.accounting.deadletters(10_000):
            if entry["federation"] == fed and entry["round"] == str(round_no):
                rejected[entry["reason"]] = rejected.get(entry["reason"], 0) + 1
        updates = self.state.rounds.updates(fed, round_no)
        return {"federation": fed, "round": round_no, "status": info.status, "reason": info.reason or None,
                "base_version": info.base_version, "version": info.version, "opened_at": info.opened_at,
                "deadline": info.deadline, "closed_at": info.closed_at, "cohort_size": info.cohort_size,
                "config_revision": info.config_rev, "accepted": len(updates), "rejected": info.rejected,
                "rejected_by_reason": rejected, "contributors": sorted(updates)}

    # --- training sessions -----------------------------------------------------------------------

    def create_session(self, body: TrainingSessionIn, created_by: str) -> dict:
        session_id = f"ts-{secrets.token_hex(6)}"
        fed = body.federation or session_id
        dims, base = resolve_model(body.model_id, self.registered_model(body.model_id))
        existing = self.state.federations.config(fed)
        if existing is None:
            self.create_federation(FederationIn(name=fed, model_id=body.model_id))
            existing = self.config(fed)
        elif (existing.model, existing.base_model) != (dims, base):
            if self.state.federations.current_round(fed):  # its versions adapt the old base: they cannot move
                raise Refusal(422, "model_mismatch", f"{fed} adapts {existing.base_model}, not {body.model_id}")
            # never trained (created by a PUT of its adapter or strategy): the session names its model
            self.state.federations.propose_config(fed, lambda c: c.revised(model=dims, base_model=base))
            existing = self.config(fed)
        if self.state.federations.status(fed).get("status") == "active":
            raise Refusal(409, "session_active", f"{fed} already has an active training session")
        changes = apply_strategy(existing, body.strategy_params, body.round_config, body.device_filter,
                                 body.strategy, body.aggregation)
        if body.adapter_config is not None:
            changes["adapter"] = body.adapter_config.to_config()
        if body.evaluation is not None:
            changes["evaluation"] = evaluation_config(body.evaluation)
        if body.exports is not None:
            changes["exports"] = runtimes.wanted(body.exports)
        if changes:
            self._check_fits(existing.revised(**changes))
            self.state.federations.propose_config(fed, lambda c: c.revised(**changes))  # no round runs: applies now
        config = self.config(fed)
        previous = self.state.federations.status(fed).get("session")
        if previous:
            self.r.hset(keys.session(previous), "final_status", self._derived(previous, fed))
        rounds = body.round_config.max_rounds if body.round_config and body.round_config.max_rounds else \
            config.policy.max_rounds
        first = self.state.federations.current_round(fed) + 1
        self.r.hset(keys.session(session_id), mapping={
            "id": session_id, "federation": fed, "model_id": body.model_id, "algorithm": body.strategy,
            "first_round": first, "last_round": first + rounds - 1, "created_at": repr(self.clock()),
            "created_by": created_by})
        self.r.zadd(keys.SESSIONS, {session_id: self.clock()})
        self.state.r.hset(keys.fed_state(fed), "session", session_id)
        self.state.federations.request_start(fed, rounds, self.clock())
        self.begin(fed)
        return self.session(session_id)

    def resume(self, fed: str) -> dict:
        self.config(fed)
        self.coordinator.request_resume(fed)
        self.begin(fed)
        return self.federation(fed)

    def _record(self, session_id: str) -> dict[str, str]:
        h = {k.decode(): v.decode() for k, v in self.r.hgetall(keys.session(session_id)).items()}
        if not h:
            raise Refusal(404, "unknown_session", f"no training session {session_id!r}")
        return h

    def _derived(self, session_id: str, fed: str) -> str:
        h = self._record(session_id)
        if "final_status" in h:
            return h["final_status"]
        status = self.state.federations.status(fed)
        fed_status = status.get("status")
        if fed_status == "stopped":
            return "stopped"
        if fed_status == "halted":
            return "failed"
        if fed_status == "completed":
            return "completed"
        if self.state.federations.start_request(fed):
            return "pending"  # recorded; no worker has opened its round yet
        info = self.state.rounds.round_info(fed, int(status.get("round", 0)))
        if info is None:
            return "pending"
        return "aggregating" if info.status == "closing" else "active"

    def session(self, session_id: str) -> dict:
        h = self._record(session_id)
        fed = h["federation"]
        status = self.state.federations.status(fed)
        current = int(status.get("round", 0))
        info = self.state.rounds.round_info(fed, current)
        return {"id": session_id, "federation": fed, "status": self._derived(session_id, fed),
                "reason": status.get("reason") or None, "model_id": h["model_id"], "algorithm": h["algorithm"],
                "first_round": int(h["first_round"]), "last_round": int(h["last_round"]), "current_round": current,
                "round_status": info.status if info else None, "version": int(status.get("version", 0)),
                "created_at": float(h["created_at"]), "created_by": h["created_by"]}

    def sessions(self, limit: int = 100) -> list[dict]:
        ids = [m.decode() for m in self.r.zrevrange(keys.SESSIONS, 0, limit - 1)]
        return [self.session(i) for i in ids]

    def stop_session(self, session_id: str, by: str) -> dict:
        h = self._record(session_id)
        fed = h["federation"]
        if self._derived(session_id, fed) in FINAL:
            raise Refusal(409, "session_ended", f"{session_id} is already {self._derived(session_id, fed)}")
        self.state.federations.stop(fed, f"stopped by {by}")
        return self.session(session_id)


def federation_view(config: FederationConfig) -> dict:
    """A config as the API shows it."""
    view = dataclasses.asdict(config)
    view["adapter"]["type"] = view["adapter"].pop("kind")
    view["adapter"]["tier_ranks"] = dict(config.adapter.tier_ranks)  # as the API takes it
    # the server clip's name before RoundPolicy took the API's max_update_norm, for clients that read it
    view["policy"]["max_grad_norm"] = config.policy.max_update_norm
    view["adapter_parameters"] = config.spec.num_parameters
    return view

