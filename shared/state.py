"""Federation and round state in Redis. Every change that must happen once is a WATCH/MULTI transaction.

Exactly-once accounting: each envelope's outcome is written under its digest in the same transaction
as its counters, so a redelivered message finds its outcome and is not counted again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import redis

from shared import keys
from shared.errors import FINAL_FOR_THE_ROUND, RejectReason, StateError
from shared.federation import DeviceProfile, FederationConfig

ACCEPTED = "accepted"
REDELIVERED = "redelivered"


@dataclasses.dataclass(frozen=True)
class UpdateRecord:
    """What the server keeps of one accepted update; the tensors stay in the object store."""

    device: str
    object_key: str
    sha256: str
    num_samples: int  # after capping at the policy's max_num_samples
    claimed_samples: int
    norm: float  # before clipping
    clip_scale: float
    train_seconds: float
    metrics: dict[str, float]
    accepted_at: float

    def to_bytes(self) -> bytes:
        return msgpack.packb(dataclasses.asdict(self), use_bin_type=True)

    @classmethod
    def from_bytes(cls, raw: bytes) -> UpdateRecord:
        return cls(**msgpack.unpackb(raw, raw=False))


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
        )


class FederationState:
    """All reads and writes of federation state; the Redis client is passed in (real or fake)."""

    def __init__(self, client: redis.Redis, deadletter_maxlen: int = 100_000, retention_s: float = 7 * 86400) -> None:
        self.r = client
        self.deadletter_maxlen = deadletter_maxlen
        self.retention_s = retention_s

    def _transaction(self, fn: Callable[[Any], Any], *watch: str) -> Any:
        return self.r.transaction(fn, *watch, value_from_callable=True)

    # --- federations -------------------------------------------------------------------------

    def create(self, config: FederationConfig, devices: Iterable[str | DeviceProfile] = (),
               status: str = "active") -> list[str]:
        """Register a new federation and enroll the devices its filter admits; returns the refused ones.

        Refuses a federation name that exists. `status` is "idle" for one created without a session.
        """
        profiles = _profiles(devices)
        admitted = sorted(d for d, p in profiles.items() if config.device_filter.admits(p.ram_mb, p.storage_mb))
        refused = sorted(profiles.keys() - set(admitted))
        devices = admitted

        def create(pipe) -> None:
            if pipe.exists(keys.fed_config(config.name)):
                raise StateError(f"federation {config.name!r} already exists")
            pipe.multi()
            pipe.set(keys.fed_config(config.name), config.to_json())
            pipe.set(keys.fed_config_revision(config.name, config.revision), config.to_json())
            pipe.hset(keys.fed_state(config.name), mapping={"status": status, "round": 0, "version": 0})
            if devices:
                pipe.sadd(keys.fed_devices(config.name), *devices)
                pipe.hset(keys.fed_profiles(config.name), mapping={
                    d: msgpack.packb(dataclasses.asdict(profiles[d])) for d in devices})
            pipe.sadd(keys.FEDERATIONS, config.name)

        self._transaction(create, keys.fed_config(config.name))
        return refused

    def enroll(self, fed: str, devices: Iterable[str | DeviceProfile]) -> list[str]:
        """Add devices to later rounds' cohorts; returns those the federation's filter refuses."""
        config = self.config(fed)
        if config is None:
            raise StateError(f"unknown federation {fed!r}")
        profiles = _profiles(devices)
        admitted = [d for d, p in profiles.items() if config.device_filter.admits(p.ram_mb, p.storage_mb)]
        if admitted:
            self.r.sadd(keys.fed_devices(fed), *admitted)
            self.r.hset(keys.fed_profiles(fed), mapping={
                d: msgpack.packb(dataclasses.asdict(profiles[d])) for d in admitted})
        return sorted(profiles.keys() - set(admitted))

    def enrolled(self, fed: str) -> list[str]:
        return sorted(d.decode() for d in self.r.smembers(keys.fed_devices(fed)))

    # --- evaluation and the forgetting guard -----------------------------------------------------

    def record_evaluation(self, fed: str, version: int, result: dict, guard: tuple[str, str] | None = None,
                          lr: float | None = None) -> bool:
        """Record a version's evaluation and act on its forgetting guard, once, in one transaction.

        `guard` is (action, message): "halt" stops the federation and fails its open round;
        "lower_lr" sets the server learning rate to `lr`. False when the version had been recorded
        already (a redelivered or concurrent evaluation), and then nothing is changed.
        """
        evals = keys.fed_evaluations(fed)

        def record(pipe) -> bool:
            if pipe.hexists(evals, str(version)):
                pipe.multi()
                pipe.zrem(keys.EVALUATIONS_DUE, f"{fed}:{version}")
                return False
            round_no = int(pipe.hget(keys.fed_state(fed), "round") or 0)
            round_open = bool(round_no) and pipe.hget(keys.round_info(fed, round_no), "status") == b"open"
            pipe.multi()
            pipe.hset(evals, str(version), json.dumps(result, sort_keys=True))
            pipe.zrem(keys.EVALUATIONS_DUE, f"{fed}:{version}")
            if guard is not None:
                action, message = guard
                if action == "halt":
                    pipe.hset(keys.fed_state(fed), mapping={"status": "halted", "reason": message})
                    if round_open:
                        pipe.hset(keys.round_info(fed, round_no), mapping={"status": "failed", "reason": "halted"})
                else:
                    pipe.hset(keys.fed_state(fed), "server_lr", repr(lr))
                if round_no:
                    pipe.hset(keys.round_info(fed, round_no), "guard", message)
            return True

        return self._transaction(record, evals, keys.fed_state(fed))

    def evaluation(self, fed: str, version: int) -> dict | None:
        raw = self.r.hget(keys.fed_evaluations(fed), str(version))
        return json.loads(raw) if raw is not None else None

    def latest_evaluation(self, fed: str) -> dict | None:
        """The evaluation of the newest evaluated version (the one with general perplexity, if any)."""
        raw = self.r.hgetall(keys.fed_evaluations(fed))
        if not raw:
            return None
        return json.loads(raw[max(raw, key=int)])

    def server_lr(self, fed: str, default: float) -> float:
        raw = self.r.hget(keys.fed_state(fed), "server_lr")
        return float(raw) if raw is not None else default

    def config(self, fed: str, revision: int | None = None) -> FederationConfig | None:
        """The config in force, or the given revision of it (what a round was opened under)."""
        key = keys.fed_config(fed) if revision is None else keys.fed_config_revision(fed, revision)
        raw = self.r.get(key)
        return FederationConfig.from_json(raw) if raw is not None else None

    def pending_config(self, fed: str) -> FederationConfig | None:
        raw = self.r.get(keys.fed_config_pending(fed))
        return FederationConfig.from_json(raw) if raw is not None else None

    def propose_config(self, fed: str, change: Callable[[FederationConfig], FederationConfig]) -> tuple[FederationConfig, bool]:
        """Apply `change` to the newest config (pending, else in force); (new config, applied now).

        With no round running it takes effect at once; otherwise it waits, as pending, for the next
        round to open, so a round's updates are always judged by the config it opened with.
        """
        def propose(pipe) -> tuple[FederationConfig, bool]:
            raw = pipe.get(keys.fed_config_pending(fed)) or pipe.get(keys.fed_config(fed))
            if raw is None:
                raise StateError(f"unknown federation {fed!r}")
            new = change(FederationConfig.from_json(raw))
            round_no = int(pipe.hget(keys.fed_state(fed), "round") or 0)
            running = round_no > 0 and pipe.hget(keys.round_info(fed, round_no), "status") in (b"open", b"closing")
            pipe.multi()
            if running:
                pipe.set(keys.fed_config_pending(fed), new.to_json())
            else:
                pipe.set(keys.fed_config(fed), new.to_json())
                pipe.set(keys.fed_config_revision(fed, new.revision), new.to_json())
                pipe.delete(keys.fed_config_pending(fed))
            return new, not running

        return self._transaction(propose, keys.fed_config(fed), keys.fed_config_pending(fed), keys.fed_state(fed))

    def set_status(self, fed: str, status: str, **fields: str | int) -> None:
        with self.r.pipeline() as pipe:
            pipe.hset(keys.fed_state(fed), mapping={"status": status, **fields})
            pipe.hdel(keys.fed_state(fed), "reason")
            pipe.execute()

    def stop(self, fed: str, reason: str) -> bool:
        """Stop a federation's training: its open round fails with `reason`. False if not running."""
        def stop(pipe) -> bool:
            if pipe.hget(keys.fed_state(fed), "status") != b"active":
                return False
            round_no = int(pipe.hget(keys.fed_state(fed), "round") or 0)
            status = pipe.hget(keys.round_info(fed, round_no), "status") if round_no else None
            pipe.multi()
            pipe.hset(keys.fed_state(fed), mapping={"status": "stopped", "reason": reason})
            if status == b"open":
                pipe.hset(keys.round_info(fed, round_no), mapping={"status": "failed", "reason": reason})
            return True

        return self._transaction(stop, keys.fed_state(fed))

    def delete(self, fed: str) -> bool:
        """Forget a federation's Redis state (its published versions stay in the object store)."""
        found = self.r.srem(keys.FEDERATIONS, fed)
        batch = []
        for key in self.r.scan_iter(match=keys.fed_keys_pattern(fed), count=500):
            batch.append(key)
            if len(batch) >= 500:
                self.r.delete(*batch)
                batch = []
        if batch:
            self.r.delete(*batch)
        return bool(found)

    def federations(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(keys.FEDERATIONS))

    def status(self, fed: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(keys.fed_state(fed)).items()}

    def current_round(self, fed: str) -> int:
        return int(self.r.hget(keys.fed_state(fed), "round") or 0)

    def stats(self, fed: str | None) -> dict[str, int]:
        key = keys.fed_stats(fed) if fed else keys.GLOBAL_STATS
        return {k.decode(): int(v) for k, v in self.r.hgetall(key).items()}

    # --- rounds --------------------------------------------------------------------------------

    def open_round(self, fed: str, round_no: int, base_version: int, now: float, timeout: float,
                   config: FederationConfig | None = None) -> RoundInfo | None:
        """Open round `round_no` for every enrolled device; a no-op (None) if it was opened before.

        `config`, a pending revision, takes effect with the round in the same transaction.
        """

        def open_(pipe) -> RoundInfo | None:
            if int(pipe.hget(keys.fed_state(fed), "round") or 0) >= round_no:
                return None
            cohort = pipe.smembers(keys.fed_devices(fed))
            current = FederationConfig.from_json(pipe.get(keys.fed_config(fed)))
            pipe.multi()
            return _write_open(pipe, fed, round_no, base_version, now, timeout, cohort, current, config)

        return self._transaction(open_, keys.fed_state(fed), keys.fed_config(fed))

    def settle_round(self, fed: str, round_no: int, now: float, next_base: int, timeout: float,
                     version: int | None = None, failure: str | None = None,
                     pending: FederationConfig | None = None, evaluate: bool = False) -> RoundInfo | None:
        """End a round and open the next (or complete the federation) in one transaction.

        `version`: the round closed and published it; `failure`: the round failed for this reason.
        Neither: the round ended earlier and only the next round may be missing (a repair). Returns
        the round it opened, or None when there is none to open (opened already, completed, halted).
        """
        info_key, state_key = keys.round_info(fed, round_no), keys.fed_state(fed)

        def settle(pipe) -> RoundInfo | None:
            status = pipe.hget(info_key, "status")
            fed_state = {k.decode(): v.decode() for k, v in pipe.hgetall(state_key).items()}
            opens = int(fed_state.get("round", 0)) == round_no and fed_state.get("status") == "active"
            cohort = pipe.smembers(keys.fed_devices(fed)) if opens else set()
            current = FederationConfig.from_json(pipe.get(keys.fed_config(fed)))
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
            if round_no >= last_round:
                pipe.hset(state_key, "status", "completed")
                return None
            return _write_open(pipe, fed, round_no + 1, next_base, now, timeout, cohort, current, pending)

        return self._transaction(settle, info_key, state_key, keys.fed_config(fed))

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
            info = RoundInfo.from_hash(round_no, h)
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
            pipe.multi()
            if decision == "closing":
                pipe.hset(info_key, mapping={"status": "closing", "closing_at": repr(now), **lease})
            elif decision == "failed":
                pipe.hset(info_key, mapping={"status": "failed", "reason": "no_quorum"})
            return decision, info

        return self._transaction(close, info_key, updates_key)

    def rounds_needing_a_close(self, now: float) -> list[tuple[str, int]]:
        """(federation, round) of every round a close task should look at now.

        An open round past its deadline; a closing round whose close lease expired (its worker
        died, or its retries ran out); and an ended current round of an active federation, whose
        next round was never opened (a close that died between its steps).
        """
        found = []
        for fed in self.federations():
            status = self.status(fed)
            round_no = int(status.get("round", 0))
            info = self.round_info(fed, round_no) if round_no else None
            if info is None:
                continue
            h = self.r.hget(keys.round_info(fed, round_no), "lease_until")
            stuck = info.status == "closing" and float(h or 0) < now
            unopened = info.status in ("closed", "failed") and status.get("status") == "active"
            if (info.status == "open" and now >= info.deadline) or stuck or unopened:
                found.append((fed, round_no))
        return found

    def evaluations_due(self, before: float, limit: int = 100) -> list[tuple[str, int]]:
        """(federation, version) published before `before` and not evaluated yet."""
        out = []
        for member in self.r.zrangebyscore(keys.EVALUATIONS_DUE, "-inf", before, start=0, num=limit):
            fed, _, version = member.decode().rpartition(":")
            out.append((fed, int(version)))
        return out

    def heartbeat(self, who: str, now: float) -> None:
        """A process saying it is alive (beat on every sweep); exported for the no-heartbeat alert."""
        self.r.hset(keys.HEARTBEATS, who, repr(now))

    def heartbeats(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.r.hgetall(keys.HEARTBEATS).items()}

    def wait_settled(self, fed: str, round_no: int, timeout: float, poll: float = 0.05) -> RoundInfo:
        """Block until the round is closed or failed (for clients and tests, never for workers)."""
        end = time.monotonic() + timeout
        while True:
            info = self.round_info(fed, round_no)
            if info is not None and info.status in ("closed", "failed"):
                return info
            if time.monotonic() > end:
                raise TimeoutError(f"{fed} round {round_no} still {info.status if info else 'unopened'} after {timeout}s")
            time.sleep(poll)

    # --- per-message accounting ----------------------------------------------------------------

    def outcome(self, digest: str) -> str | None:
        raw = self.r.get(keys.message(digest))
        return raw.decode() if raw is not None else None

    def count_redelivery(self) -> None:
        """Redeliveries are a property of the transport, so they are counted once, globally."""
        self.r.hincrby(keys.GLOBAL_STATS, "redelivered", 1)

    def accept(self, digest: str, fed: str, round_no: int, record: UpdateRecord) -> tuple[str, int, int]:
        """Record an update once. Returns (outcome, cohort devices reported, cohort size).

        The outcome is ACCEPTED, REDELIVERED (this message was settled meanwhile) or a
        RejectReason value when the round closed or the device already submitted.
        """
        msg_key, info_key = keys.message(digest), keys.round_info(fed, round_no)
        updates_key = keys.round_updates(fed, round_no)

        def accept(pipe) -> tuple[str, int, int]:
            if pipe.exists(msg_key):
                pipe.multi()
                pipe.hincrby(keys.GLOBAL_STATS, "redelivered", 1)
                return REDELIVERED, 0, 0
            status = pipe.hget(info_key, "status")
            cohort = int(pipe.hget(info_key, "cohort_size") or 0)
            reported = pipe.scard(keys.round_reported(fed, round_no))
            count = reported
            if status != b"open":
                return RejectReason.STALE_ROUND.value, count, cohort
            if pipe.hexists(updates_key, record.device):
                return RejectReason.ALREADY_SUBMITTED.value, count, cohort
            already = pipe.sismember(keys.round_reported(fed, round_no), record.device)
            pipe.multi()
            pipe.hset(updates_key, record.device, record.to_bytes())
            pipe.sadd(keys.round_reported(fed, round_no), record.device)
            pipe.set(msg_key, ACCEPTED, ex=keys.MESSAGE_TTL_S)
            stats = keys.fed_stats(fed)
            pipe.hincrby(stats, "received", 1)
            pipe.hincrby(stats, "accepted", 1)
            return ACCEPTED, count + (0 if already else 1), cohort

        return self._transaction(accept, msg_key, info_key, updates_key, keys.round_reported(fed, round_no))

    def reject(self, digest: str, reason: RejectReason, detail: str, now: float, fed: str | None = None,
               round_no: int | None = None, device: str | None = None) -> tuple[bool, bool]:
        """Count a rejection and dead-letter it once: (fresh, round ready).

        fresh is False if the message was settled already. A selected device whose update object is
        refused (FINAL_FOR_THE_ROUND: its write-once object cannot be replaced) has reported for the
        round, which need not wait for it: round ready says every selected device has now reported.
        """
        msg_key = keys.message(digest)

        def reject(pipe) -> tuple[bool, bool]:
            if pipe.exists(msg_key):
                pipe.multi()
                pipe.hincrby(keys.GLOBAL_STATS, "redelivered", 1)
                return False, False
            in_round = bool(fed and round_no is not None and pipe.exists(keys.round_info(fed, round_no)))
            reports, ready = False, False
            final = reason in FINAL_FOR_THE_ROUND
            if final and in_round and device and pipe.sismember(keys.round_cohort(fed, round_no), device):
                reported_key = keys.round_reported(fed, round_no)
                reports = not pipe.sismember(reported_key, device)
                cohort = int(pipe.hget(keys.round_info(fed, round_no), "cohort_size") or 0)
                open_ = pipe.hget(keys.round_info(fed, round_no), "status") == b"open"
                ready = reports and open_ and cohort > 0 and pipe.scard(reported_key) + 1 >= cohort
            pipe.multi()
            if reports:
                pipe.sadd(keys.round_reported(fed, round_no), device)
            pipe.set(msg_key, f"rejected:{reason.value}", ex=keys.MESSAGE_TTL_S)
            stats = keys.fed_stats(fed) if fed else keys.GLOBAL_STATS
            pipe.hincrby(stats, "received", 1)
            pipe.hincrby(stats, "rejected", 1)
            pipe.hincrby(stats, f"rejected:{reason.value}", 1)
            if in_round:
                pipe.hincrby(keys.round_info(fed, round_no), "rejected", 1)
            pipe.xadd(keys.DEADLETTER, {
                "reason": reason.value, "detail": detail, "federation": fed or "", "round": round_no or 0,
                "device": device or "", "digest": digest, "at": repr(now),
            }, maxlen=self.deadletter_maxlen, approximate=True)
            return True, ready

        watch = [msg_key] + ([keys.round_reported(fed, round_no)] if fed and round_no is not None else [])
        return self._transaction(reject, *watch)

    def note_retries_exhausted(self, digest: str, detail: str, now: float) -> None:
        """An ingest gave up retrying (storage or Redis down past the budget). Not an outcome: the
        message stays pending in the ledger, which re-drives it; this makes the event visible."""
        with self.r.pipeline() as pipe:
            pipe.hincrby(keys.GLOBAL_STATS, "retries_exhausted", 1)
            pipe.xadd(keys.DEADLETTER, {"reason": RejectReason.RETRIES_EXHAUSTED.value, "detail": detail[:500],
                                        "federation": "", "round": 0, "device": "", "digest": digest,
                                        "at": repr(now)}, maxlen=self.deadletter_maxlen, approximate=True)
            pipe.execute()

    def deadletters(self, count: int = 100) -> list[dict[str, str]]:
        entries = self.r.xrevrange(keys.DEADLETTER, count=count)
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def _profiles(devices: Iterable[str | DeviceProfile]) -> dict[str, DeviceProfile]:
    out = {}
    for d in devices:
        profile = d if isinstance(d, DeviceProfile) else DeviceProfile(d)
        if not keys.valid_id(profile.device):
            raise StateError(f"device id {profile.device!r} is not a valid id")
        out[profile.device] = profile
    return out


def _write_open(pipe, fed: str, round_no: int, base_version: int, now: float, timeout: float, cohort: set,
                current: FederationConfig, pending: FederationConfig | None) -> RoundInfo:
    """The writes that open a round (inside a MULTI); `pending` takes effect with it if newer."""
    switch = pending is not None and pending.revision > current.revision
    revision = pending.revision if switch else current.revision
    info = RoundInfo(round_no, "open", base_version, now, now + timeout, len(cohort), config_rev=revision)
    if switch:
        pipe.set(keys.fed_config(fed), pending.to_json())
        pipe.set(keys.fed_config_revision(fed, pending.revision), pending.to_json())
        pipe.delete(keys.fed_config_pending(fed))
    pipe.hset(keys.round_info(fed, round_no), mapping={
        "status": info.status, "base_version": base_version, "opened_at": repr(now),
        "deadline": repr(info.deadline), "cohort_size": info.cohort_size, "config_rev": revision,
    })
    if cohort:
        pipe.sadd(keys.round_cohort(fed, round_no), *cohort)
    pipe.hset(keys.fed_state(fed), mapping={"round": round_no, "version": base_version})
    return info
