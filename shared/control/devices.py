"""Devices of a federation (registered with a token, revocable) and their groups."""

from __future__ import annotations

import msgpack

from fleettune.shared import keys
from fleettune.shared.control.auth import Tokens
from fleettune.shared.control.groups import Groups, GroupSpec
from fleettune.shared.errors import Refusal
from fleettune.shared.federation import DeviceProfile
from fleettune.shared.state import FederationState


class Devices:
    def __init__(self, state: FederationState, tokens: Tokens) -> None:
        self.state = state
        self.r = state.r
        self.tokens = tokens
        self.groups = Groups(state.r)

    def _require(self, fed: str) -> None:
        if self.state.federations.config(fed) is None:
            raise Refusal(404, "unknown_federation", f"no federation {fed!r}")

    def register(self, fed: str, profile: DeviceProfile) -> str:
        """Enroll a device and return its token (shown once; registering again issues a new one)."""
        self._require(fed)
        self.state.federations.enroll(fed, [profile])  # a device the filter refuses now may qualify at a later check-in
        return self.tokens.create_device_token(fed, profile.device)

    def revoke(self, fed: str, device: str) -> None:
        """The device's token stops working and the device is left out of later rounds."""
        self._require(fed)
        if not self.tokens.revoke_device(fed, device):
            raise Refusal(404, "unknown_device", f"no device {device!r} in {fed}")
        self.r.srem(keys.fed_devices(fed), device)
        self.r.hdel(keys.fed_identities(fed), device)  # a re-registered device starts with a key of its own

    def list(self, fed: str) -> list[dict]:
        self._require(fed)
        tokens = {k.decode(): v.decode() for k, v in self.r.hgetall(keys.fed_device_tokens(fed)).items()}
        profiles = {k.decode(): msgpack.unpackb(v) for k, v in self.r.hgetall(keys.fed_profiles(fed)).items()}
        enrolled = set(self.state.federations.enrolled(fed))
        out = []
        for device in sorted(tokens.keys() | profiles.keys()):
            profile = profiles.get(device, {"device": device})
            out.append(dict(profile, enrolled=device in enrolled,
                            revoked=device in tokens and self.tokens.device_revoked(fed, device)))
        return out

    # --- groups (static, dynamic, hybrid: shared/control/groups.py) ----------------------------------

    def put_group(self, fed: str, group: str, spec: GroupSpec, devices: list[str]) -> dict:
        self._require(fed)
        return self.groups.put(fed, group, spec, devices)

    def group(self, fed: str, group: str) -> dict:
        self._require(fed)
        return self.groups.get(fed, group)

    def group_sizes(self, fed: str) -> dict[str, int]:
        self._require(fed)
        return self.groups.sizes(fed)

    def delete_group(self, fed: str, group: str) -> None:
        self._require(fed)
        self.groups.delete(fed, group)
