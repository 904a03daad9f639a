"""Every Redis connection a process makes, to one server or to the primary that Sentinel names.

With FLEETTUNE_REDIS_SENTINELS set (host:port,host:port,...), FLEETTUNE_REDIS_URL still gives the
database, user and password, and its host is not used: each client asks the sentinels for the
primary of FLEETTUNE_REDIS_SERVICE, and asks again after a failover (redis-py's Sentinel pools,
kombu's `sentinel://` transport for Celery). A call in flight when the primary dies fails with a
ConnectionError, which every caller already treats as "unavailable, retry".
"""

from __future__ import annotations

import urllib.parse

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis._parsers.base import BaseParser

from fleettune.shared.settings import Settings



class Unavailable(redis.ConnectionError):
    """Redis refuses a write for now: a primary short of replicas (NOREPLICAS, min-replicas-to-write)
    or a replica without its primary (MASTERDOWN). As transient as a lost connection, so every caller
    that retries those (tasks, the API's 503) retries these; a ResponseError would be taken for a bug."""


for _code in ("NOREPLICAS", "MASTERDOWN"):  # redis-py maps an error's first word to its class
    BaseParser.EXCEPTION_CLASSES.setdefault(_code, Unavailable)

# a stalled Redis must fail a call (its caller retries), never hang a process for good
TIMEOUTS = {"socket_timeout": 30, "socket_connect_timeout": 5}


def connect(settings: Settings, **options) -> redis.Redis:
    options = {**TIMEOUTS, **options}
    if not settings.redis_sentinels:
        return redis.Redis.from_url(settings.redis_url, **options)
    sentinel = redis.sentinel.Sentinel(_sentinels(settings), socket_timeout=options["socket_connect_timeout"])
    return sentinel.master_for(settings.redis_service, redis_class=redis.Redis, **_credentials(settings), **options)


def connect_async(settings: Settings) -> redis.asyncio.Redis:
    if not settings.redis_sentinels:
        return redis.asyncio.Redis.from_url(settings.redis_url, **TIMEOUTS)
    sentinel = redis.asyncio.sentinel.Sentinel(_sentinels(settings), socket_timeout=TIMEOUTS["socket_connect_timeout"])
    return sentinel.master_for(settings.redis_service, redis_class=redis.asyncio.Redis, **_credentials(settings),
                               **TIMEOUTS)


def broker_url(settings: Settings) -> str:
    """Celery's broker: the Redis URL, or one `sentinel://` URL per sentinel (kombu's form)."""
    if not settings.redis_sentinels:
        return settings.redis_url or "memory://"
    url = urllib.parse.urlsplit(settings.redis_url or "redis://")
    auth = url.netloc.rpartition("@")[0]
    return ";".join(f"sentinel://{auth + '@' if auth else ''}{s}{url.path or '/0'}" for s in settings.redis_sentinels)


def broker_transport_options(settings: Settings) -> dict:
    return {"master_name": settings.redis_service} if settings.redis_sentinels else {}


def _sentinels(settings: Settings) -> list[tuple[str, int]]:
    out = []
    for address in settings.redis_sentinels:
        host, _, port = address.rpartition(":")
        out.append((host, int(port)))
    return out


def _credentials(settings: Settings) -> dict:
    url = urllib.parse.urlsplit(settings.redis_url or "redis://")
    db = url.path.strip("/") or "0"
    return {"db": int(db), "username": urllib.parse.unquote(url.username) if url.username else None,
            "password": urllib.parse.unquote(url.password) if url.password else None}
