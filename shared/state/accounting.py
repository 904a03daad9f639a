"""Exactly-once accounting of messages: each envelope's outcome is written under its digest in the
same transaction as its counters, so a redelivered message finds its outcome and is not counted
again; rejections are counted and dead-lettered once.
"""

from __future__ import annotations

import dataclasses

import msgpack

from fleettune.shared import keys
from fleettune.shared.errors import FINAL_FOR_THE_ROUND, RejectReason
from fleettune.shared.state.base import StateBase
from fleettune.shared.state.lua import load_script
from fleettune.shared.strategies.partial import REFERENCE_SAMPLE

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
    rank: int = 0  # a lower-rank tier's LoRA rank; 0: the federation's global rank
    staleness: int = 0  # async: versions published between its base and the buffer it joined
    staleness_weight: float = 1.0  # async: FedBuff's s(staleness), in (0, 1]
    participation: int = 1  # async: versions since the device's previous update joined a buffer (capped)

    @property
    def scale(self) -> float:
        """What aggregation multiplies the update by: its clip, and its staleness weight. Both are
        at most 1, so the clip bound (and DP's sensitivity) holds for the scaled update."""
        return self.clip_scale * self.staleness_weight

    def to_bytes(self) -> bytes:
        return msgpack.packb(dataclasses.asdict(self), use_bin_type=True)

    @classmethod
    def from_bytes(cls, raw: bytes) -> UpdateRecord:
        return cls(**msgpack.unpackb(raw, raw=False))


_ACCEPT = load_script("accept")  # KEYS, ARGV and replies: lua/accept.lua


class Accounting(StateBase):
    _accept_script = None  # registered on first use
    def outcome(self, digest: str) -> str | None:
        raw = self.r.get(keys.message(digest))
        return raw.decode() if raw is not None else None

    def count_redelivery(self) -> None:
        """Redeliveries are a property of the transport, so they are counted once, globally."""
        self.r.hincrby(keys.GLOBAL_STATS, "redelivered", 1)

    def accept(self, digest: str, fed: str, round_no: int, record: UpdateRecord, received_round: int | None = None,
               base_version: int | None = None, joins: int | None = None) -> tuple[str, int, int, float | None]:
        """Record an update once. Returns (outcome, cohort devices reported, cohort size, the
        round's reference claim if it is known now: see shared.strategies.partial).

        The outcome is ACCEPTED, REDELIVERED (this message was settled meanwhile) or a
        RejectReason value when the round closed or the device already submitted. One Lua script:
        concurrent accepts into the same round serialise in Redis instead of retrying a WATCH.
        Async rounds: `received_round` is the round the gateway received it for (counted in flight
        there) and `base_version` its base, which must be newer than any the device had accepted;
        `joins` is the buffer's base version, noted as the device's last for its next participation weight.
        """
        if self._accept_script is None:
            self._accept_script = self.r.register_script(_ACCEPT)
        received = round_no if received_round is None else received_round
        outcome, count, cohort, reference = self._accept_script(
            keys=[keys.message(digest), keys.round_info(fed, round_no), keys.round_updates(fed, round_no),
                  keys.round_reported(fed, round_no), keys.received(digest), keys.round_inflight(fed, received),
                  keys.fed_stats(fed), keys.GLOBAL_STATS, keys.round_unfolded(fed, round_no),
                  keys.round_claims(fed, round_no), keys.round_uncapped(fed, round_no), keys.fed_async_bases(fed),
                  keys.fed_async_joined(fed)],
            args=[record.device, record.to_bytes(), self.message_ttl_s, record.num_samples, REFERENCE_SAMPLE,
                  "" if base_version is None else base_version, "" if joins is None else joins])
        return outcome.decode(), int(count), int(cohort), float(reference) if reference else None

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
            ledgered = fed is not None and round_no is not None and pipe.exists(keys.received(digest))
            final = reason in FINAL_FOR_THE_ROUND
            if final and in_round and device and pipe.sismember(keys.round_cohort(fed, round_no), device):
                reported_key = keys.round_reported(fed, round_no)
                reports = not pipe.sismember(reported_key, device)
                cohort = int(pipe.hget(keys.round_info(fed, round_no), "cohort_size") or 0)
                open_ = pipe.hget(keys.round_info(fed, round_no), "status") == b"open"
                ready = reports and open_ and cohort > 0 and pipe.scard(reported_key) + 1 >= cohort
            pipe.multi()
            if ledgered:
                pipe.decr(keys.round_inflight(fed, round_no))
            if reports:
                pipe.sadd(keys.round_reported(fed, round_no), device)
            pipe.set(msg_key, f"rejected:{reason.value}", ex=self.message_ttl_s)
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
