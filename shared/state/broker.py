"""What the Redis broker holds, read without consuming: kombu's list per queue and its `unacked` hash.

kombu's Redis transport LPUSHes a JSON document per message onto the queue's list and workers pop
from the right, so the list's last element is the oldest waiting message. A message delivered to a
worker and not acknowledged yet (we ack late: after the task ran) sits in the `unacked` hash until
its ack, or until kombu restores it to the queue once the visibility timeout passes. Both shapes are
pinned by tests/unit/test_publish.py and the pipeline tests.
"""

from __future__ import annotations

import base64
import hashlib
import json

import msgpack
import redis

UNACKED = "unacked"  # kombu's default unacked_key


def oldest_sent_at(client: redis.Redis, queue: str) -> float | None:
    """The `fleettune_sent_at` header of the oldest message waiting in `queue` (None: empty or unknown)."""
    oldest = client.lindex(queue, -1)
    if oldest is None:
        return None
    try:
        return float(json.loads(oldest)["headers"]["fleettune_sent_at"])
    except (ValueError, KeyError, TypeError):
        return None


def held_digests(client: redis.Redis, limit: int = 100_000) -> set[str]:
    """sha256 of each envelope delivered to a worker and not acknowledged yet.

    The hash holds about (workers x prefetch) messages, plus those of workers that died until
    kombu restores them: small, and bounded here all the same.
    """
    held: set[str] = set()
    for n, (_, value) in enumerate(client.hscan_iter(UNACKED, count=500)):
        if n >= limit:
            break
        raw = _first_argument(value)
        if raw is not None:
            held.add(hashlib.sha256(raw).hexdigest())
    return held


def _first_argument(value: bytes) -> bytes | None:
    """A task message's first positional argument, if it is bytes (an ingest envelope)."""
    try:
        message = json.loads(value)[0]
        body = base64.b64decode(message["body"])
        args = msgpack.unpackb(body, raw=False)[0]  # task protocol 2: [args, kwargs, embed]
    except (ValueError, KeyError, TypeError, IndexError, msgpack.UnpackException):
        return None
    return args[0] if args and isinstance(args[0], bytes) else None
