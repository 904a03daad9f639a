"""Operator API keys and device tokens: random secrets that Redis stores only as sha256 digests.

A token reads `ftk_<id>_<secret>` (operator) or `ftd_<id>_<secret>` (device). The id finds the
record in one HGETALL; the secret is compared by digest in constant time. The secrets carry 256
random bits, so a fast hash is safe here: slow hashes (bcrypt, argon2) protect guessable passwords,
and would cost milliseconds on every device request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time
from typing import Literal

import redis

from fleettune.shared import keys
from fleettune.shared.state.lua import AsyncLua, load_script

Scope = Literal["admin", "read", "device"]
OPERATOR_SCOPES = ("admin", "read")
_PREFIXES = {"ftk": "operator", "ftd": "device"}


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request comes from: an operator key (admin or read) or one device of one federation."""

    scope: Scope
    key_id: str
    name: str = ""
    federation: str | None = None  # device tokens only
    device: str | None = None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new(prefix: str) -> tuple[str, str, str]:
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    return key_id, secret, f"{prefix}_{key_id}_{secret}"


# KEYS, ARGV and replies: shared/state/lua/authenticate_and_count.lua
_AUTHENTICATE_AND_COUNT = AsyncLua(load_script("authenticate_and_count"))


class Tokens:
    def __init__(self, client: redis.Redis, clock=time.time) -> None:
        self.r = client
        self.clock = clock

    def create_api_key(self, scope: str, name: str = "") -> tuple[str, str]:
        """(key id, token); the token is shown once and never stored."""
        if scope not in OPERATOR_SCOPES:
            raise ValueError(f"scope must be one of {OPERATOR_SCOPES}")
        key_id, secret, token = _new("ftk")
        self.r.hset(keys.api_key(key_id), mapping={
            "digest": _digest(secret), "scope": scope, "name": name[:100], "created_at": repr(self.clock())})
        self.r.sadd(keys.API_KEYS, key_id)
        return key_id, token

    def api_keys(self) -> list[dict[str, str]]:
        out = []
        for key_id in sorted(m.decode() for m in self.r.smembers(keys.API_KEYS)):
            h = {k.decode(): v.decode() for k, v in self.r.hgetall(keys.api_key(key_id)).items()}
            if h:
                out.append({"id": key_id, "scope": h["scope"], "name": h.get("name", ""),
                            "created_at": float(h["created_at"]), "revoked": "revoked_at" in h})
        return out

    def revoke_api_key(self, key_id: str) -> bool:
        if not self.r.exists(keys.api_key(key_id)):
            return False
        self.r.hset(keys.api_key(key_id), "revoked_at", repr(self.clock()))
        return True

    def create_device_token(self, fed: str, device: str) -> str:
        """A token for one device of one federation; it replaces (revokes) the device's previous one."""
        key_id, secret, token = _new("ftd")
        previous = self.r.hget(keys.fed_device_tokens(fed), device)
        with self.r.pipeline() as pipe:
            pipe.hset(keys.device_token(key_id), mapping={
                "digest": _digest(secret), "federation": fed, "device": device, "created_at": repr(self.clock())})
            pipe.hset(keys.fed_device_tokens(fed), device, key_id)
            if previous is not None:
                pipe.hset(keys.device_token(previous.decode()), "revoked_at", repr(self.clock()))
            pipe.execute()
        return token

    def revoke_device(self, fed: str, device: str) -> bool:
        key_id = self.r.hget(keys.fed_device_tokens(fed), device)
        if key_id is None:
            return False
        self.r.hset(keys.device_token(key_id.decode()), "revoked_at", repr(self.clock()))
        return True

    def device_revoked(self, fed: str, device: str) -> bool:
        key_id = self.r.hget(keys.fed_device_tokens(fed), device)
        return key_id is None or bool(self.r.hexists(keys.device_token(key_id.decode()), "revoked_at"))

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal a bearer token stands for, or None (unknown, malformed or revoked)."""
        parsed = parse_token(token)
        return None if parsed is None else principal_of(parsed, self.r.hgetall(parsed.record_key))

    async def authenticate_async(self, client, token: str | None, rate_key: str | None = None,
                                 rate_ttl: int = 0) -> tuple[Principal | None, int]:
        """`authenticate` over a redis.asyncio client (the API's event loop never waits on Redis), and
        when `rate_key` is given, count this request in it if the token is valid: one round trip for
        both. Returns (principal or None, the count; 0 when not counted)."""
        parsed = parse_token(token)
        if parsed is None:
            return None, 0
        record, count = await _AUTHENTICATE_AND_COUNT(client, [parsed.record_key, rate_key or parsed.record_key],
                                                      [_digest(parsed.secret), rate_ttl, int(rate_key is not None)])
        who = principal_of(parsed, dict(zip(record[::2], record[1::2])))
        return who, int(count) if who is not None else 0


@dataclasses.dataclass(frozen=True)
class ParsedToken:
    prefix: str
    key_id: str
    secret: str

    @property
    def record_key(self) -> str:
        return keys.api_key(self.key_id) if self.prefix == "ftk" else keys.device_token(self.key_id)


def parse_token(token: str | None) -> ParsedToken | None:
    """The parts of a well-formed token (`ftk_<16 hex>_<secret>` or `ftd_...`), or None."""
    if not token or len(token) > 128:
        return None
    parts = token.split("_", 2)  # url-safe secrets may hold "_" themselves
    if len(parts) != 3 or parts[0] not in _PREFIXES:
        return None
    prefix, key_id, secret = parts
    if len(key_id) != 16 or not all(c in "0123456789abcdef" for c in key_id):
        return None
    return ParsedToken(prefix, key_id, secret)


def principal_of(parsed: ParsedToken, record: dict[bytes, bytes]) -> Principal | None:
    """The principal a stored record grants this token: None if absent, revoked or the secret differs."""
    h = {k.decode(): v.decode() for k, v in record.items()}
    if not h or "revoked_at" in h or not hmac.compare_digest(h["digest"], _digest(parsed.secret)):
        return None
    if parsed.prefix == "ftk":
        return Principal(h["scope"], parsed.key_id, h.get("name", ""))  # type: ignore[arg-type]
    return Principal("device", parsed.key_id, h["device"], federation=h["federation"], device=h["device"])
