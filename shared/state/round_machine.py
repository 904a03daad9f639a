"""The round state machine in Redis: open, join, close under a lease, settle and open the next.

Every transition that must happen once is one WATCH/MULTI transaction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import msgpack

from fleettune.shared import keys
from fleettune.shared.errors import StateError
from fleettune.shared.federation import FederationConfig
from fleettune.shared.state.accounting import UpdateRecord
from fleettune.shared.state.base import StateBase
from fleettune.shared.state.federations import Federations
from fleettune.shared.strategies import privacy


@dataclasses.dataclass(frozen=True)
class RoundInfo:
    round: int
    status: str  # open | closing | closed | failed
    base_version: int
    opened_at: float
    deadline: float
    cohort_size: int
    reason: str = ""
    version: int | None = None  # published version, once closed
    closed_at: float | None = None
    rejected: int = 0
    guard: str = ""  # what the forgetting guard did while this round was open
    config_rev: int = 0  # the federation config revision this round runs under
    closing_at: float | None = None  # when its close began
    server_lr: float | None = None  # the guard's server learning rate, snapshotted when the close began
    inflight: int = 0  # messages received on time through the gateway that have no outcome yet
    reference_claim: float | None = None  # median claim its weight cap derives from (see strategies.partial)
    mode: str = "sync"  # "async": the round is a FedBuff buffer (see federation.RoundPolicy)
    buffer_size: int = 0  # async: the accepted updates that publish it

    @classmethod
    def from_hash(cls, round_no: int, h: dict[bytes, bytes]) -> RoundInfo:
        s = {k.decode(): v.decode() for k, v in h.items()}
        return cls(
            round=round_no, status=s["status"], base_version=int(s["base_version"]),
            opened_at=float(s["opened_at"]), deadline=float(s["deadline"]),
            cohort_size=int(s["cohort_size"]), reason=s.get("reason", ""), guard=s.get("guard", ""),
            version=int(s["version"]) if "version" in s else None,
            closed_at=float(s["closed_at"]) if "closed_at" in s else None,
            rejected=int(s.get("rejected", 0)), config_rev=int(s.get("config_rev", 0)),
            closing_at=float(s["closing_at"]) if "closing_at" in s else None,
            server_lr=float(s["server_lr"]) if "server_lr" in s else None,
            reference_claim=float(s["reference_claim"]) if "reference_claim" in s else None,
            mode=s.get("mode", "sync"), buffer_size=int(s.get("buffer_size", 0)),
        )


class RoundMachine(StateBase):
    def __init__(self, client, federations: Federations, **limits) -> None:
        super().__init__(client, **limits)
        self.federations = federations  # a round's secret and the federations to sweep

    def open_round(self, fed: str, round_no: int, base_version: int, now: float, timeout: float,
                   config: FederationConfig | None = None) -> RoundInfo | None:
        """Open round `round_no` for every enrolled device; a no-op (None) if it was opened before.

        `config`, a pending revision, takes effect with the round in the same transaction.
        """

        secret = self.federations.secret(fed)

        def open_(pipe) -> RoundInfo | None:
            if int(pipe.hget(keys.fed_state(fed), "round") or 0) >= round_no:
                return None
            current = FederationConfig.from_json(pipe.get(keys.fed_config(fed)))
            enrolled = _enrolled(pipe, fed, current, config)
            pipe.multi()
            return _write_open(pipe, fed, round_no, base_version, now, timeout, enrolled, current, config, secret)

        return self._transaction(open_, keys.fed_state(fed), keys.fed_config(fed), keys.fed_devices(fed))

    def settle_round(self, fed: str, round_no: int, now: float, next_base: int, timeout: float,
                     version: int | None = None, failure: str | None = None,
                     pending: FederationConfig | None = None, evaluate: bool = False,
                     complete: str | None = None, reference: float | None = None) -> RoundInfo | None:
        """End a round and open the next (or complete the federation) in one transaction.

        `version`: the round closed and published it; `failure`: the round failed for this reason.
        Neither: the round ended earlier and only the next round may be missing (a repair). Returns
        the round it opened, or None when there is none to open (opened already, completed, halted).
        `complete`: complete the federation now, for this reason, instead of opening the next round.
        `reference`: the next round's reference claim (this round's median claim).
        """
        info_key, state_key = keys.round_info(fed, round_no), keys.fed_state(fed)
        secret = self.federations.secret(fed)

        def settle(pipe) -> RoundInfo | None:
            status = pipe.hget(info_key, "status")
            fed_state = {k.decode(): v.decode() for k, v in pipe.hgetall(state_key).items()}
            opens = int(fed_state.get("round", 0)) == round_no and fed_state.get("status") == "active"
            current = FederationConfig.from_json(pipe.get(keys.fed_config(fed)))
            enrolled = _enrolled(pipe, fed, current, pending) if opens else set()
            last_round = int(fed_state.get("last_round", current.policy.max_rounds))
            pipe.multi()
            if status in (b"open", b"closing"):  # it ends now: its updates may go after the retention
                pipe.zadd(keys.RETENTION, {f"{fed}:{round_no}": now + self.retention_s}, nx=True)
            if version is not None and status == b"closing":
                pipe.hset(info_key, mapping={"status": "closed", "version": version, "closed_at": repr(now)})
                pipe.hdel(info_key, "close_owner", "lease_until")
                pipe.hset(state_key, "version", version)
                if evaluate:
                    pipe.zadd(keys.EVALUATIONS_DUE, {f"{fed}:{version}": now}, nx=True)
            elif failure is not None and status in (b"open", b"closing"):
                pipe.hset(info_key, mapping={"status": "failed", "reason": failure})
                pipe.hdel(info_key, "close_owner", "lease_until")
            if not opens:
                return None
            if round_no >= last_round or complete:
                pipe.hset(state_key, mapping={"status": "completed", **({"reason": complete} if complete else {})})
                return None
            return _write_open(pipe, fed, round_no + 1, next_base, now, timeout, enrolled, current, pending, secret,
                               reference)

        return self._transaction(settle, info_key, state_key, keys.fed_config(fed), keys.fed_devices(fed))

    def join_cohort(self, fed: str, round_no: int, device: str) -> bool:
        """Add an enrolled device that checks in while the round is open; False if it is closed."""
        info_key, cohort_key = keys.round_info(fed, round_no), keys.round_cohort(fed, round_no)

        def join(pipe) -> bool:
            if pipe.hget(info_key, "status") != b"open":
                return False
            if pipe.sismember(cohort_key, device):
                return True
            pipe.multi()
            pipe.sadd(cohort_key, device)
            pipe.hincrby(info_key, "cohort_size", 1)
            return True

        return self._transaction(join, info_key, cohort_key)

    def cohort(self, fed: str, round_no: int) -> set[str]:
        """The devices selected into a round (all enrolled, or those sampling picked)."""
        return {m.decode() for m in self.r.smembers(keys.round_cohort(fed, round_no))}

    def reported_count(self, fed: str, round_no: int) -> int:
        return int(self.r.scard(keys.round_reported(fed, round_no)))

    def precheck(self, fed: str, round_no: int, device: str) -> tuple[int, RoundInfo | None, bool, bool, str]:
        """(current round, round info, in cohort, already submitted, device tier) in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(keys.fed_state(fed), "round")
        pipe.hgetall(keys.round_info(fed, round_no))
        pipe.sismember(keys.round_cohort(fed, round_no), device)
        pipe.hexists(keys.round_updates(fed, round_no), device)
        pipe.hget(keys.fed_profiles(fed), device)
        current, info, selected, submitted, profile = pipe.execute()
        tier = msgpack.unpackb(profile).get("tier", "default") if profile else "default"
        return (int(current or 0), RoundInfo.from_hash(round_no, info) if info else None,
                bool(selected), bool(submitted), tier)

    def round_info(self, fed: str, round_no: int) -> RoundInfo | None:
        h = self.r.hgetall(keys.round_info(fed, round_no))
        return RoundInfo.from_hash(round_no, h) if h else None

    def update_count(self, fed: str, round_no: int) -> int:
        return int(self.r.hlen(keys.round_updates(fed, round_no)))

    def updates(self, fed: str, round_no: int) -> dict[str, UpdateRecord]:
        h = self.r.hgetall(keys.round_updates(fed, round_no))
        return {k.decode(): UpdateRecord.from_bytes(v) for k, v in sorted(h.items())}

    def begin_close(self, fed: str, round_no: int, decide: Callable[[RoundInfo, int, int], str], owner: str,
                    now: float, lease_s: float) -> tuple[str, RoundInfo]:
        """Take the round's close, as `decide(info, accepted, reported)` says, under a lease.

        Returns (decision, info): "closing" (`owner` now holds the close: an open round it moved to
        closing, its own close redelivered, or a close whose lease expired), "busy" (another
        owner's lease is live), "failed" (no quorum: failed now), "wait", or "settled" (closed or
        failed before). An ingest that commits after a round leaves "open" sees the new status and
        is rejected as stale, so the set of updates is frozen from here on.
        """
        info_key, updates_key = keys.round_info(fed, round_no), keys.round_updates(fed, round_no)
        lease = {"close_owner": owner, "lease_until": repr(now + lease_s)}

        def close(pipe) -> tuple[str, RoundInfo]:
            h = pipe.hgetall(info_key)
            if not h:
                raise StateError(f"{fed} round {round_no} does not exist")
            info = dataclasses.replace(RoundInfo.from_hash(round_no, h),
                                       inflight=int(pipe.get(keys.round_inflight(fed, round_no)) or 0))
            if info.status == "closing":
                holder, until = h.get(b"close_owner", b"").decode(), float(h.get(b"lease_until", 0))
                if holder != owner and until > now:
                    return "busy", info
                pipe.multi()
                pipe.hset(info_key, mapping=lease)
                return "closing", info
            if info.status != "open":
                return "settled", info
            decision = decide(info, pipe.hlen(updates_key), pipe.scard(keys.round_reported(fed, round_no)))
            guard_lr = pipe.hget(keys.fed_state(fed), "server_lr")  # set by the forgetting guard, if ever
            pipe.multi()
            if decision == "closing":
                # the snapshot makes a redone close compute the same bytes even if the guard acts meanwhile
                snapshot = {"server_lr": guard_lr.decode()} if guard_lr is not None else {}
                pipe.hset(info_key, mapping={"status": "closing", "closing_at": repr(now), **lease, **snapshot})
            elif decision == "failed":
                pipe.hset(info_key, mapping={"status": "failed", "reason": "no_quorum"})
            return decision, info

        return self._transaction(close, info_key, updates_key, keys.fed_state(fed))

    def rounds_needing_a_close(self, now: float) -> list[tuple[str, int]]:
        """(federation, round) of every round a close task should look at now.

        An open round past its deadline, or whose every selected device has reported (the close
        its last ingest asked for may have been lost with a killed worker); a closing round whose
        close lease expired (its worker died, or its retries ran out); and an ended current round
        of an active federation, whose next round was never opened (a close that died between its
        steps).
        """
        found = []
        for fed in self.federations.names():
            status = self.federations.status(fed)
            round_no = int(status.get("round", 0))
            info = self.round_info(fed, round_no) if round_no else None
            if info is None:
                continue
            h = self.r.hget(keys.round_info(fed, round_no), "lease_until")
            stuck = info.status == "closing" and float(h or 0) < now
            unopened = info.status in ("closed", "failed") and status.get("status") == "active"
            if info.mode == "async":  # a full buffer whose close was lost, or one past its age
                ready = info.status == "open" and (
                    now >= info.deadline or self.update_count(fed, round_no) >= info.buffer_size)
            else:
                ready = info.status == "open" and (
                    now >= info.deadline or 0 < info.cohort_size <= self.reported_count(fed, round_no)
                    or self._secure_stage_due(fed, round_no, now))
            if ready or stuck or unopened:
                found.append((fed, round_no))
        return found

    def _secure_stage_due(self, fed: str, round_no: int, now: float) -> bool:
        """A secure-aggregation stage past its deadline, or an attempt ready to unmask: the close
        task advances the stages and unmasks (shared.secagg.coordinator)."""
        stage, deadline = self.r.hmget(keys.secagg(fed, round_no), "stage", "deadline")
        if stage is None:
            return False
        return stage in (b"unmasking", b"ready", b"failed") or now >= float(deadline or 0)


def _effective(current: FederationConfig, pending: FederationConfig | None) -> FederationConfig:
    """The config a round opened now runs under: the pending revision if it is newer."""
    return pending if pending is not None and pending.revision > current.revision else current


def _enrolled(pipe, fed: str, current: FederationConfig, pending: FederationConfig | None) -> set[str] | int:
    """What opening a round needs of the enrolled devices (read before the MULTI): their names when
    the round samples a cohort, else only their number (Redis copies the set itself)."""
    effective = _effective(current, pending)
    if effective.aggregation.sampling_rate < 1.0 or effective.policy.clients_per_round:
        return {d.decode() for d in pipe.smembers(keys.fed_devices(fed))}
    return int(pipe.scard(keys.fed_devices(fed)))


def _write_open(pipe, fed: str, round_no: int, base_version: int, now: float, timeout: float,
                enrolled: set[str] | int, current: FederationConfig, pending: FederationConfig | None, secret: bytes,
                reference: float | None = None) -> RoundInfo:
    """The writes that open a round (inside a MULTI); `pending` takes effect with it if newer.

    `enrolled` is the enrolled devices' names, or their number when every one is in the cohort:
    then Redis copies the set, so opening a round of 10,000 moves no names through Python. Under
    Poisson sampling (central DP) the cohort is the enrolled devices the sampling picks, the same
    ones check-in admits.
    """
    effective = _effective(current, pending)
    switch = effective is not current
    revision = effective.revision
    rate, per_round = effective.aggregation.sampling_rate, effective.policy.clients_per_round
    if isinstance(enrolled, int):
        cohort, size = None, enrolled
    else:
        names = set(enrolled)
        if rate < 1.0:
            names = {d for d in names if privacy.sampled(secret, round_no, d, rate)}
        if per_round and len(names) > per_round:
            names = set(privacy.pick(secret, round_no, names, per_round))
        cohort, size = names, len(names)
    info = RoundInfo(round_no, "open", base_version, now, now + timeout, size, config_rev=revision,
                     reference_claim=reference, mode=effective.policy.mode,
                     buffer_size=effective.policy.buffer_size if effective.policy.mode == "async" else 0)
    if switch:
        if pending.policy.server_lr != current.policy.server_lr:  # a guard-lowered rate was the old config's
            pipe.hdel(keys.fed_state(fed), "server_lr")
        pipe.set(keys.fed_config(fed), pending.to_json())
        pipe.set(keys.fed_config_revision(fed, pending.revision), pending.to_json())
        pipe.delete(keys.fed_config_pending(fed))
    pipe.hset(keys.round_info(fed, round_no), mapping={
        "status": info.status, "base_version": base_version, "opened_at": repr(now),
        "deadline": repr(info.deadline), "cohort_size": info.cohort_size, "config_rev": revision,
        "mode": info.mode,  # read by the receive script: an async buffer's deadline makes nothing late
        **({"buffer_size": info.buffer_size} if info.buffer_size else {}),
        **({"reference_claim": repr(reference)} if reference is not None else {}),
    })
    if cohort is None:
        pipe.sunionstore(keys.round_cohort(fed, round_no), [keys.fed_devices(fed)])
    elif cohort:
        pipe.sadd(keys.round_cohort(fed, round_no), *cohort)
    pipe.hset(keys.fed_state(fed), mapping={"round": round_no, "version": base_version})
    return info
