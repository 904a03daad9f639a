"""The received-message ledger: every envelope the gateway took, kept until it has an outcome.

The Celery queue only delivers. Kombu's Redis transport can lose a message it was handing to a
worker whose main process died (celery#7950, kombu#305), and an ingest whose retries ran out during
a long outage leaves its message without an outcome. The ledger is the truth: the sweep re-drives
every entry with no outcome after `redrive_after_s` that is neither waiting in the queue nor held by
a worker, then again with backoff, until it has one.
Re-driving is safe because ingest is idempotent by the envelope's digest.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import msgpack
import redis

from fleettune.shared import keys
from fleettune.shared.state.lua import AsyncLua, load_script

MAX_BACKOFF_DOUBLINGS = 6
ONLINE_REFRESH_S = 1.0  # how often a process asks the primary how many replicas are in sync  # re-drives wait redrive_after_s x 1, 2, 4 ... 64

LATE = "late"  # what `record` answers for a new message received after its round's deadline

_RECORD_AND_PUSH = load_script("record_and_push")  # KEYS, ARGV and replies: lua/record_and_push.lua
_RECORD_AND_PUSH_ASYNC = AsyncLua(_RECORD_AND_PUSH)  # the gateway's hot path (redis.asyncio)


class NotReplicated(redis.ConnectionError):
    """Fewer replicas than required hold a new entry: as unavailable as a lost connection."""


class Ledger:
    def __init__(self, client: redis.Redis, redrive_after_s: float, message_ttl_s: int = keys.MESSAGE_TTL_S,
                 replicas: int = 0, wait_ms: int = 1000) -> None:
        self.r = client
        # a receipt only once `replicas` replicas hold the entry (and its message): a failover that
        # promotes one of them loses no acknowledged submission
        self.replicas, self.wait_ms = replicas, wait_ms
        self.redrive_after_s = redrive_after_s
        self.message_ttl_s = message_ttl_s  # how long an entry answers a repeated submission with its receipt
        self._record_and_push = None  # the Lua script, registered on first use

    def record(self, digest: str, entry: dict, now: float) -> dict | str | None:
        """Write the entry unless it exists: None when new, the existing entry when it does, LATE
        when it is new and received after its round's deadline (then nothing is written).

        A duplicate's ZADD NX is harmless: a pending entry keeps its time, and a settled one is
        dropped again by the next sweep.
        """
        fed, round_no = entry["federation"], entry["round"]
        deadline, mode = self.r.hmget(keys.round_info(fed, round_no), "deadline", "mode")
        if (deadline is not None and mode != b"async" and now > float(deadline)
                and not self.r.exists(keys.received(digest))):
            return LATE
        with self.r.pipeline() as pipe:
            pipe.set(keys.received(digest), msgpack.packb(entry, use_bin_type=True), nx=True,
                     ex=self.message_ttl_s, get=True)
            pipe.zadd(keys.RECEIVED_PENDING, {digest: now + self.redrive_after_s}, nx=True)
            seen, _ = pipe.execute()
        if seen is None:
            self.r.incr(keys.round_inflight(fed, round_no))
        return msgpack.unpackb(seen) if seen is not None else None

    def record_and_push(self, digest: str, entry: dict, now: float, queue: str, message: bytes) -> dict | str | None:
        """`record`, and when the entry is new and on time, LPUSH `message` onto the broker list
        `queue`, in one script: the message is enqueued if and only if it was recorded."""
        if self._record_and_push is None:
            self._record_and_push = self.r.register_script(_RECORD_AND_PUSH)
        call = self._push_call(digest, entry, now, queue, message)
        if not self.replicas:
            return _seen(self._record_and_push(**call))
        needed = self._needed(self.r.info("replication"))
        with self.r.pipeline(transaction=False) as pipe:  # one connection: WAIT counts its writes
            self._record_and_push(**call, client=pipe)
            pipe.execute_command("WAIT", needed, self.wait_ms)
            seen, acked = pipe.execute()
        return _seen(self._replicated(seen, acked, needed))

    async def record_and_push_async(self, client, digest: str, entry: dict, now: float, queue: str,
                                    message: bytes) -> dict | str | None:
        """`record_and_push` over a redis.asyncio client."""
        call = self._push_call(digest, entry, now, queue, message)
        if not self.replicas:
            return _seen(await _RECORD_AND_PUSH_ASYNC(client, **call))
        needed = self._needed(await client.info("replication"))
        seen, acked = await _RECORD_AND_PUSH_ASYNC.replicated(client, **call, replicas=needed, timeout_ms=self.wait_ms)
        return _seen(self._replicated(seen, acked, needed))

    def _needed(self, replication: dict) -> int:
        """Replicas a receipt waits for: every one connected to the primary now (asked at each
        submit), never fewer than `replicas`. Sentinel promotes the replica that last reported the
        largest offset, which need not be one that has the write (and may be one still syncing), so
        waiting for some of them loses writes on a failover; measured in tests/integration/test_failover.py."""
        return max(self.replicas, int(replication.get("connected_slaves", 0)))

    def _replicated(self, seen, acked, needed: int) -> object:
        if int(acked) < needed:
            # recorded and queued on the primary, but a failover now could lose both: no receipt; the
            # device's retry finds the entry (or, after a failover, records it anew)
            raise NotReplicated(f"{acked} of {needed} replicas confirmed within {self.wait_ms} ms")
        return seen

    def _push_call(self, digest: str, entry: dict, now: float, queue: str, message: bytes) -> dict:
        fed, round_no = entry["federation"], entry["round"]
        return {"keys": [keys.received(digest), keys.RECEIVED_PENDING, queue, keys.round_info(fed, round_no),
                         keys.round_inflight(fed, round_no)],
                "args": [msgpack.packb(entry, use_bin_type=True), self.message_ttl_s, now + self.redrive_after_s,
                         digest, message, repr(now)]}

    def forget(self, digest: str) -> None:
        """Undo `record` (the enqueue failed, so the device's retry must go through)."""
        with self.r.pipeline() as pipe:
            pipe.delete(keys.received(digest))
            pipe.zrem(keys.RECEIVED_PENDING, digest)
            pipe.execute()

    def entry(self, digest: str) -> dict | None:
        raw = self.r.get(keys.received(digest))
        return msgpack.unpackb(raw) if raw is not None else None

    def redrive(self, now: float, enqueue: Callable[[bytes, float], None], limit: int = 1000,
                held: Collection[str] = frozenset(), queued_since: float | None = None) -> tuple[int, int]:
        """Re-enqueue due entries that have no outcome; drop settled ones. (re-driven, settled).

        Only lost messages are re-driven, or a backlog would multiply itself: an entry a worker
        holds (`held`: digests delivered and not acknowledged) or one received at or after
        `queued_since` (the oldest message still waiting: the queue is FIFO, so it waits behind
        that one) is looked at again later, and that look is not counted as an attempt.
        """
        redriven = settled = 0
        for member in self.r.zrangebyscore(keys.RECEIVED_PENDING, "-inf", now, start=0, num=limit):
            digest = member.decode()
            entry = self.entry(digest)
            if entry is None or self.r.exists(keys.message(digest)):
                with self.r.pipeline() as pipe:
                    pipe.zrem(keys.RECEIVED_PENDING, digest)
                    pipe.hdel(keys.REDRIVES, digest)
                    pipe.execute()
                settled += 1
                continue
            if digest in held or (queued_since is not None and entry["received_at"] >= queued_since):
                self.r.zadd(keys.RECEIVED_PENDING, {digest: now + self.redrive_after_s}, xx=True)
                continue
            attempts = int(self.r.hincrby(keys.REDRIVES, digest, 1))
            enqueue(entry["envelope"], entry["received_at"])
            wait = self.redrive_after_s * 2 ** min(attempts, MAX_BACKOFF_DOUBLINGS)
            with self.r.pipeline() as pipe:
                pipe.zadd(keys.RECEIVED_PENDING, {digest: now + wait}, xx=True)
                pipe.hincrby(keys.GLOBAL_STATS, "redriven", 1)
                pipe.execute()
            redriven += 1
        return redriven, settled

    def pending(self) -> int:
        return int(self.r.zcard(keys.RECEIVED_PENDING))


def _seen(reply) -> dict | str | None:
    if reply == LATE.encode():
        return LATE
    return msgpack.unpackb(reply) if reply else None
