"""A Lua script run on a redis.asyncio client by its SHA (EVALSHA), loaded on the first NOSCRIPT.

redis-py's Script object wraps every call in argument-deprecation and retry layers; on the gateway's
hot path (two scripts a submit) calling EVALSHA directly costs measurably less CPU.
"""

from __future__ import annotations

import hashlib

from redis.exceptions import NoScriptError


class AsyncLua:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client, keys: list, args: list):
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or new Redis: load it once, then as before
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)
