"""Where each (version, format) export stands, in Redis: due, ready or failed, and which are served.

An export is due from the close that published its version until it is ready or has failed for
good; beat's sweep re-sends those due long ago (a worker died mid-conversion), as for evaluations
and distillations. The record a ready export points at is written to the object store first.
"""

from __future__ import annotations

import json

from fleettune.shared import keys

PENDING, READY, FAILED = "pending", "ready", "failed"


class Exports:
    def __init__(self, client) -> None:
        self.r = client

    def mark_due(self, fed: str, version: int, fmt: str, at: float) -> bool:
        """A new pending entry, due from `at`; False (and nothing changed) when one is recorded
        already: asked before, or a redone close asking again."""
        created = self.r.hsetnx(keys.fed_exports(fed), f"{version}:{fmt}",
                                json.dumps({"status": PENDING, "attempts": 0}))
        if created:
            self.r.zadd(keys.EXPORTS_DUE, {_due(fed, version, fmt): at})
        return bool(created)

    def due(self, before: float, limit: int = 20) -> list[tuple[str, int, str]]:
        out = []
        for member in self.r.zrangebyscore(keys.EXPORTS_DUE, "-inf", before, start=0, num=limit):
            fed, version, fmt = member.decode().split(":")
            out.append((fed, int(version), fmt))
        return out

    def forget(self, fed: str, version: int, fmt: str) -> None:
        """Drop a (failed) entry, so that it is asked afresh."""
        self.r.hdel(keys.fed_exports(fed), f"{version}:{fmt}")

    def forget_due(self, fed: str, version: int, fmt: str) -> None:
        self.r.zrem(keys.EXPORTS_DUE, _due(fed, version, fmt))

    def ready(self, fed: str, version: int, fmt: str, record: dict, attempts: int) -> None:
        entry = {"status": READY, "attempts": attempts, "record": record}
        with self.r.pipeline() as pipe:
            pipe.hset(keys.fed_exports(fed), f"{version}:{fmt}", json.dumps(entry, sort_keys=True))
            pipe.zadd(keys.fed_exported(fed, fmt), {str(version): version})
            pipe.zrem(keys.EXPORTS_DUE, _due(fed, version, fmt))
            pipe.execute()

    def failed(self, fed: str, version: int, fmt: str, reason: str, attempts: int, final: bool) -> None:
        """A failed attempt; `final`: no more retries (it stays failed, and is no longer due)."""
        entry = {"status": FAILED if final else PENDING, "attempts": attempts, "reason": reason}
        with self.r.pipeline() as pipe:
            pipe.hset(keys.fed_exports(fed), f"{version}:{fmt}", json.dumps(entry, sort_keys=True))
            if final:
                pipe.zrem(keys.EXPORTS_DUE, _due(fed, version, fmt))
            pipe.execute()

    def entry(self, fed: str, version: int, fmt: str) -> dict | None:
        raw = self.r.hget(keys.fed_exports(fed), f"{version}:{fmt}")
        return json.loads(raw) if raw is not None else None

    def of_version(self, fed: str, version: int) -> dict[str, dict]:
        """format -> entry, for every format asked of this version."""
        out = {}
        for field, raw in self.r.hscan_iter(keys.fed_exports(fed), match=f"{version}:*"):
            out[field.decode().partition(":")[2]] = json.loads(raw)
        return dict(sorted(out.items()))

    def ready_at_or_below(self, fed: str, fmt: str, version: int) -> int | None:
        found = self.r.zrevrangebyscore(keys.fed_exported(fed, fmt), version, "-inf", start=0, num=1)
        return int(found[0]) if found else None


def _due(fed: str, version: int, fmt: str) -> str:
    return f"{fed}:{version}:{fmt}"  # ids and format names never hold ':'
