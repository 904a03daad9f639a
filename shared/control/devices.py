"""Devices of a federation (registered with a token, revocable) and static device groups."""

from __future__ import annotations

import msgpack

from shared import keys
from shared.control.auth import Tokens
from shared.errors import Refusal
from shared.federation import DeviceProfile
from shared.state import FederationState

MAX_GROUP_SIZE = 100_000


class Devices:
    def __init__(self, state: FederationState, tokens: Tokens) -> None:
        self.state = state
        self.r = state.r
        self.tokens = tokens

    def _require(self, fed: str) -> None:
        if self.state.config(fed) is None:
            raise Refusal(404, "unknown_federation", f"no federation {fed!r}")

    def register(self, fed: str, profile: DeviceProfile) -> str:
        """Enroll a device and return its token (shown once; registering again issues a new one)."""
        self._require(fed)
        self.state.enroll(fed, [profile])  # a device the filter refuses now may qualify at a later check-in
        return self.tokens.create_device_token(fed, profile.device)

    def revoke(self, fed: str, device: str) -> None:
        """The device's token stops working and the device is left out of later rounds."""
        self._require(fed)
        if not self.tokens.revoke_device(fed, device):
            raise Refusal(404, "unknown_device", f"no device {device!r} in {fed}")
        self.r.srem(keys.fed_devices(fed), device)

    def list(self, fed: str) -> list[dict]:
        self._require(fed)
        tokens = {k.decode(): v.decode() for k, v in self.r.hgetall(keys.fed_device_tokens(fed)).items()}
        profiles = {k.decode(): msgpack.unpackb(v) for k, v in self.r.hgetall(keys.fed_profiles(fed)).items()}
        enrolled = set(self.state.enrolled(fed))
        out = []
        for device in sorted(tokens.keys() | profiles.keys()):
            profile = profiles.get(device, {"device": device})
            out.append(dict(profile, enrolled=device in enrolled,
                            revoked=device in tokens and self.tokens.device_revoked(fed, device)))
        return out

    # --- static groups ---------------------------------------------------------------------------

    def set_group(self, fed: str, group: str, devices: list[str]) -> None:
        self._require(fed)
        if len(devices) > MAX_GROUP_SIZE:
            raise Refusal(413, "group_too_large", f"{len(devices)} devices > {MAX_GROUP_SIZE}")
        with self.r.pipeline() as pipe:
            pipe.delete(keys.fed_group(fed, group))
            if devices:
                pipe.sadd(keys.fed_group(fed, group), *devices)
            pipe.sadd(keys.fed_groups(fed), group)
            pipe.execute()

    def group(self, fed: str, group: str) -> list[str]:
        self._require(fed)
        if not self.r.sismember(keys.fed_groups(fed), group):
            raise Refusal(404, "unknown_group", f"no group {group!r} in {fed}")
        return sorted(m.decode() for m in self.r.smembers(keys.fed_group(fed, group)))

    def groups(self, fed: str) -> dict[str, int]:
        self._require(fed)
        names = sorted(m.decode() for m in self.r.smembers(keys.fed_groups(fed)))
        return {name: int(self.r.scard(keys.fed_group(fed, name))) for name in names}

    def delete_group(self, fed: str, group: str) -> None:
        self._require(fed)
        if not self.r.srem(keys.fed_groups(fed), group):
            raise Refusal(404, "unknown_group", f"no group {group!r} in {fed}")
        self.r.delete(keys.fed_group(fed, group))

