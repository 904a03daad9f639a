"""A named lease in Redis: at most one owner holds it, and it lapses unless renewed.

Beat uses one so that, of any number of beat processes (standbys, or an orphan left behind by a
killed worker), exactly one sends the periodic tasks, and a standby takes over within one TTL.
"""

from __future__ import annotations

import redis


class Lease:
    def __init__(self, client: redis.Redis, key: str, owner: str, ttl_s: float) -> None:
        self.r = client
        self.key = key
        self.owner = owner.encode()
        self.ttl_ms = int(ttl_s * 1000)

    def hold(self) -> bool:
        """Take the lease if it is free, or renew it if it is ours; False while another holds it."""
        def take(pipe) -> bool:
            holder = pipe.get(self.key)
            if holder is not None and holder != self.owner:
                return False
            pipe.multi()
            pipe.set(self.key, self.owner, px=self.ttl_ms)
            return True

        return self.r.transaction(take, self.key, value_from_callable=True)

    def release(self) -> None:
        """Give the lease up now (a clean shutdown), if it is ours."""
        def drop(pipe) -> None:
            if pipe.get(self.key) == self.owner:
                pipe.multi()
                pipe.delete(self.key)

        self.r.transaction(drop, self.key)

    def holder(self) -> str | None:
        raw = self.r.get(self.key)
        return raw.decode() if raw is not None else None
