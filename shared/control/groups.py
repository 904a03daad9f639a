"""Device groups: static (listed device ids), dynamic (rules over declared capabilities) and hybrid (both).

A dynamic group's rules are all evaluated against the profile a device declares at check-in, at
every check-in, so a device that changes capability (more storage, a newer app) changes group on
its next one. A hybrid group is its listed devices plus every device its rules match. `exclude`
keeps named devices out of any kind of group (a device an operator does not want in a canary).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import msgpack
from packaging.version import InvalidVersion, Version

from fleettune.shared import keys
from fleettune.shared.errors import Refusal
from fleettune.shared.federation import DeviceProfile

Kind = Literal["static", "dynamic", "hybrid"]
MAX_GROUPS = 64  # groups are evaluated at every check-in: bounded per federation
MAX_GROUP_SIZE = 100_000


@dataclasses.dataclass(frozen=True)
class Rules:
    """Conditions on declared capabilities; every one that is set must hold."""

    min_ram_mb: int | None = None
    max_ram_mb: int | None = None
    min_storage_mb: int | None = None
    max_storage_mb: int | None = None
    tier: tuple[str, ...] = ()  # one of these (empty: any)
    os: tuple[str, ...] = ()
    region: tuple[str, ...] = ()
    accelerator: tuple[str, ...] = ()
    min_app_version: str | None = None  # PEP 440 / semver-like ordering, via `packaging`
    max_app_version: str | None = None

    def __post_init__(self) -> None:
        for bound in (self.min_app_version, self.max_app_version):
            if bound is not None:
                Version(bound)  # InvalidVersion (a ValueError) for a bound that cannot be ordered

    def mismatch(self, profile: DeviceProfile) -> str | None:
        """The first rule the profile breaks, or None when it matches them all."""
        for field, value in (("ram_mb", profile.ram_mb), ("storage_mb", profile.storage_mb)):
            low, high = getattr(self, f"min_{field}"), getattr(self, f"max_{field}")
            if low is not None and (value is None or value < low):
                return f"{field} {value} < {low}"
            if high is not None and (value is None or value > high):
                return f"{field} {value} > {high}"
        for field in ("tier", "os", "region", "accelerator"):
            allowed, value = getattr(self, field), getattr(profile, field)
            if allowed and value not in allowed:
                return f"{field} {value!r} not in {list(allowed)}"
        if self.min_app_version or self.max_app_version:
            try:
                version = Version(profile.app_version or "")
            except InvalidVersion:
                return f"app_version {profile.app_version!r} is not a version"
            if self.min_app_version and version < Version(self.min_app_version):
                return f"app_version {version} < {self.min_app_version}"
            if self.max_app_version and version > Version(self.max_app_version):
                return f"app_version {version} > {self.max_app_version}"
        return None

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if v not in (None, ())}

    @classmethod
    def from_dict(cls, fields: dict) -> Rules:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    kind: Kind = "static"
    rules: Rules | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.kind == "static") != (self.rules is None):
            raise ValueError("a static group has no rules; a dynamic or hybrid group needs them")

    def member(self, profile: DeviceProfile, listed: bool) -> bool:
        if profile.device in self.exclude:
            return False
        if listed and self.kind != "dynamic":
            return True
        return self.rules is not None and self.rules.mismatch(profile) is None

    def encode(self) -> bytes:
        return msgpack.packb({"kind": self.kind, "rules": self.rules.as_dict() if self.rules else None,
                              "exclude": list(self.exclude)})

    @classmethod
    def decode(cls, raw: bytes | None) -> GroupSpec:
        if raw is None:
            return cls()  # a group with no spec is a plain list of devices
        fields = msgpack.unpackb(raw)
        rules = Rules.from_dict(fields["rules"]) if fields.get("rules") is not None else None
        return cls(fields["kind"], rules, tuple(fields.get("exclude") or ()))


class Groups:
    """A federation's groups in Redis: a spec per group and, for listed devices, a set."""

    def __init__(self, client) -> None:
        self.r = client

    def put(self, fed: str, group: str, spec: GroupSpec, devices: list[str]) -> dict:
        if spec.kind == "dynamic" and devices:
            raise Refusal(422, "invalid_group", "a dynamic group lists no devices: make it hybrid")
        if len(devices) > MAX_GROUP_SIZE:
            raise Refusal(413, "group_too_large", f"{len(devices)} devices > {MAX_GROUP_SIZE}")
        if not self.r.sismember(keys.fed_groups(fed), group) and self.r.scard(keys.fed_groups(fed)) >= MAX_GROUPS:
            raise Refusal(409, "too_many_groups", f"a federation has at most {MAX_GROUPS} groups")
        with self.r.pipeline() as pipe:
            pipe.delete(keys.fed_group(fed, group), keys.fed_group_matched(fed, group))
            if devices:
                pipe.sadd(keys.fed_group(fed, group), *devices)
            pipe.hset(keys.fed_group_specs(fed), group, spec.encode())
            pipe.sadd(keys.fed_groups(fed), group)
            pipe.execute()
        return self.get(fed, group)

    def spec(self, fed: str, group: str) -> GroupSpec:
        if not self.r.sismember(keys.fed_groups(fed), group):
            raise Refusal(404, "unknown_group", f"no group {group!r} in {fed}")
        return GroupSpec.decode(self.r.hget(keys.fed_group_specs(fed), group))

    def get(self, fed: str, group: str) -> dict:
        spec = self.spec(fed, group)
        listed = sorted(m.decode() for m in self.r.smembers(keys.fed_group(fed, group)))
        matched = sorted(m.decode() for m in self.r.smembers(keys.fed_group_matched(fed, group)))
        return {"group": group, "kind": spec.kind, "devices": listed,
                "rules": spec.rules.as_dict() if spec.rules else None, "exclude": list(spec.exclude),
                "matched": matched}  # devices the rules matched at their last check-in

    def names(self, fed: str) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(keys.fed_groups(fed)))

    def sizes(self, fed: str) -> dict[str, int]:
        """group -> listed devices plus those its rules matched at their last check-in."""
        names = self.names(fed)
        with self.r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.sunion(keys.fed_group(fed, name), keys.fed_group_matched(fed, name))
            return {name: len(members) for name, members in zip(names, pipe.execute())}

    def delete(self, fed: str, group: str) -> None:
        if not self.r.srem(keys.fed_groups(fed), group):
            raise Refusal(404, "unknown_group", f"no group {group!r} in {fed}")
        self.r.delete(keys.fed_group(fed, group), keys.fed_group_matched(fed, group))
        self.r.hdel(keys.fed_group_specs(fed), group)

    def evaluate(self, fed: str, profile: DeviceProfile) -> set[str]:
        """The groups this device is in now, by the profile it declares; records dynamic matches."""
        names = self.names(fed)
        if not names:
            return set()
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.fed_group_specs(fed))
            for name in names:
                pipe.sismember(keys.fed_group(fed, name), profile.device)
            specs, *listed = pipe.execute()
        member: set[str] = set()
        with self.r.pipeline(transaction=False) as pipe:
            for name, is_listed in zip(names, listed):
                spec = GroupSpec.decode(specs.get(name.encode()))
                inside = spec.member(profile, bool(is_listed))
                if inside:
                    member.add(name)
                if spec.rules is not None:  # keep "who matched" current for operators
                    (pipe.sadd if inside and not is_listed else pipe.srem)(
                        keys.fed_group_matched(fed, name), profile.device)
            pipe.execute()
        return member
