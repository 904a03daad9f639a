"""The base of the state classes: one Redis client, and WATCH/MULTI transactions over it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from fleettune.shared import keys


class StateBase:
    """Holds the Redis client (real or fake) that every state class reads and writes."""

    def __init__(self, client: redis.Redis, deadletter_maxlen: int = 100_000, retention_s: float = 7 * 86400,
                 message_ttl_s: int = keys.MESSAGE_TTL_S) -> None:
        self.r = client
        self.message_ttl_s = message_ttl_s  # how long a message's outcome answers its redeliveries
        self.deadletter_maxlen = deadletter_maxlen
        self.retention_s = retention_s

    def _transaction(self, fn: Callable[[Any], Any], *watch: str) -> Any:
        return self.r.transaction(fn, *watch, value_from_callable=True)
