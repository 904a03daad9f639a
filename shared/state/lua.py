"""A Lua script run on a redis.asyncio client by its SHA (EVALSHA), loaded on the first NOSCRIPT.

redis-py's Script object wraps every call in argument-deprecation and retry layers; on the gateway's
hot path (two scripts a submit) calling EVALSHA directly costs measurably less CPU.

The scripts themselves live in `lua/<name>.lua` beside this module (shipped as package data).
"""

from __future__ import annotations

import hashlib
from importlib.resources import files

from redis.exceptions import NoScriptError


def load_script(name: str) -> str:
    """The source of `lua/<name>.lua`, read through importlib.resources so an installed wheel (or a
    zip) works as the source tree does."""
    return (files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


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

    async def replicated(self, client, keys: list, args: list, replicas: int, timeout_ms: int) -> tuple:
        """The script, then WAIT on the same connection (a pipeline holds one): (its answer, how many
        replicas have its writes). WAIT counts only this connection's writes, so it must not be
        sent on another one of the pool."""
        for attempt in (0, 1):
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(self.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            try:
                answer, acked = await pipe.execute()
                return answer, int(acked)
            except NoScriptError:
                if attempt:
                    raise
                await client.script_load(self.source)
        raise AssertionError("unreachable")
