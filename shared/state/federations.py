"""The federations in Redis: configs by revision, enrolled devices, status, counters, starts, heartbeats."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterable

import msgpack

from fleettune.shared import keys
from fleettune.shared.errors import StateError
from fleettune.shared.federation import DeviceProfile, FederationConfig
from fleettune.shared.state.base import StateBase


class Federations(StateBase):
    def create(self, config: FederationConfig, devices: Iterable[str | DeviceProfile] = (),
               status: str = "active") -> list[str]:
        """Register a new federation and enroll the devices its filter admits; returns the refused ones.

        Refuses a federation name that exists. `status` is "idle" for one created without a session.
        """
        profiles = _profiles(devices)
        admitted = sorted(d for d, p in profiles.items() if config.device_filter.admits(p.ram_mb, p.storage_mb))
        refused = sorted(profiles.keys() - set(admitted))
        devices = admitted

        def create(pipe) -> None:
            if pipe.exists(keys.fed_config(config.name)):
                raise StateError(f"federation {config.name!r} already exists")
            pipe.multi()
            pipe.set(keys.fed_config(config.name), config.to_json())
            pipe.set(keys.fed_config_revision(config.name, config.revision), config.to_json())
            pipe.hset(keys.fed_state(config.name), mapping={"status": status, "round": 0, "version": 0})
            if devices:
                pipe.sadd(keys.fed_devices(config.name), *devices)
                pipe.hset(keys.fed_profiles(config.name), mapping={
                    d: msgpack.packb(dataclasses.asdict(profiles[d])) for d in devices})
            pipe.sadd(keys.FEDERATIONS, config.name)

        self._transaction(create, keys.fed_config(config.name))
        return refused

    def enroll(self, fed: str, devices: Iterable[str | DeviceProfile]) -> list[str]:
        """Add devices to later rounds' cohorts; returns those the federation's filter refuses."""
        config = self.config(fed)
        if config is None:
            raise StateError(f"unknown federation {fed!r}")
        profiles = _profiles(devices)
        admitted = [d for d, p in profiles.items() if config.device_filter.admits(p.ram_mb, p.storage_mb)]
        if admitted:
            self.r.sadd(keys.fed_devices(fed), *admitted)
            self.r.hset(keys.fed_profiles(fed), mapping={
                d: msgpack.packb(dataclasses.asdict(profiles[d])) for d in admitted})
        return sorted(profiles.keys() - set(admitted))

    def enrolled(self, fed: str) -> list[str]:
        return sorted(d.decode() for d in self.r.smembers(keys.fed_devices(fed)))

    def enrolled_count(self, fed: str) -> int:
        return int(self.r.scard(keys.fed_devices(fed)))

    def config(self, fed: str, revision: int | None = None) -> FederationConfig | None:
        """The config in force, or the given revision of it (what a round was opened under)."""
        key = keys.fed_config(fed) if revision is None else keys.fed_config_revision(fed, revision)
        raw = self.r.get(key)
        return FederationConfig.from_json(raw) if raw is not None else None

    def pending_config(self, fed: str) -> FederationConfig | None:
        raw = self.r.get(keys.fed_config_pending(fed))
        return FederationConfig.from_json(raw) if raw is not None else None

    def propose_config(self, fed: str, change: Callable[[FederationConfig], FederationConfig]) -> tuple[FederationConfig, bool]:
        """Apply `change` to the newest config (pending, else in force); (new config, applied now).

        With no round running it takes effect at once; otherwise it waits, as pending, for the next
        round to open, so a round's updates are always judged by the config it opened with.
        """
        def propose(pipe) -> tuple[FederationConfig, bool]:
            raw = pipe.get(keys.fed_config_pending(fed)) or pipe.get(keys.fed_config(fed))
            if raw is None:
                raise StateError(f"unknown federation {fed!r}")
            new = change(FederationConfig.from_json(raw))
            round_no = int(pipe.hget(keys.fed_state(fed), "round") or 0)
            running = round_no > 0 and pipe.hget(keys.round_info(fed, round_no), "status") in (b"open", b"closing")
            pipe.multi()
            if running:
                pipe.set(keys.fed_config_pending(fed), new.to_json())
            else:
                pipe.set(keys.fed_config(fed), new.to_json())
                pipe.set(keys.fed_config_revision(fed, new.revision), new.to_json())
                pipe.delete(keys.fed_config_pending(fed))
            return new, not running

        return self._transaction(propose, keys.fed_config(fed), keys.fed_config_pending(fed), keys.fed_state(fed))

    def set_status(self, fed: str, status: str, **fields: str | int) -> None:
        with self.r.pipeline() as pipe:
            pipe.hset(keys.fed_state(fed), mapping={"status": status, **fields})
            pipe.hdel(keys.fed_state(fed), "reason")
            pipe.execute()

    def stop(self, fed: str, reason: str) -> bool:
        """Stop a federation's training: its open round fails with `reason`. False if not running."""
        def stop(pipe) -> bool:
            if pipe.hget(keys.fed_state(fed), "status") != b"active":
                return False
            round_no = int(pipe.hget(keys.fed_state(fed), "round") or 0)
            status = pipe.hget(keys.round_info(fed, round_no), "status") if round_no else None
            pipe.multi()
            pipe.hset(keys.fed_state(fed), mapping={"status": "stopped", "reason": reason})
            if status == b"open":
                pipe.hset(keys.round_info(fed, round_no), mapping={"status": "failed", "reason": reason})
            return True

        return self._transaction(stop, keys.fed_state(fed))

    def delete(self, fed: str) -> bool:
        """Forget a federation's Redis state (its published versions stay in the object store)."""
        found = self.r.srem(keys.FEDERATIONS, fed)
        batch = []
        for key in self.r.scan_iter(match=keys.fed_keys_pattern(fed), count=500):
            batch.append(key)
            if len(batch) >= 500:
                self.r.delete(*batch)
                batch = []
        if batch:
            self.r.delete(*batch)
        return bool(found)

    # --- starts: the API records one, a worker does it (publishing v0 allocates the whole adapter) ---

    def request_start(self, fed: str, rounds: int, now: float) -> int:
        """Record that `fed` trains `rounds` more rounds from its next one; returns that round.

        The federation shows as active at once; a worker opens the round (see RoundCoordinator.
        start_requested) and the sweep re-sends a start no worker took.
        """
        def request(pipe) -> int:
            first = int(pipe.hget(keys.fed_state(fed), "round") or 0) + 1
            pipe.multi()
            pipe.hset(keys.fed_state(fed), mapping={"status": "active", "last_round": first + rounds - 1,
                                                    "starting": f"{first}:{rounds}"})
            pipe.hdel(keys.fed_state(fed), "reason")
            pipe.zadd(keys.STARTS_DUE, {fed: now})
            return first

        return self._transaction(request, keys.fed_state(fed))

    def start_request(self, fed: str) -> tuple[int, int] | None:
        """(first round, rounds) of the start no worker has done yet, if any."""
        raw = self.r.hget(keys.fed_state(fed), "starting")
        if raw is None:
            return None
        first, _, rounds = raw.decode().partition(":")
        return int(first), int(rounds)

    def start_done(self, fed: str) -> None:
        with self.r.pipeline() as pipe:
            pipe.hdel(keys.fed_state(fed), "starting")
            pipe.zrem(keys.STARTS_DUE, fed)
            pipe.execute()

    def starts_due(self, before: float, limit: int = 100) -> list[str]:
        """Federations whose start was requested before `before` and is not done."""
        return [m.decode() for m in self.r.zrangebyscore(keys.STARTS_DUE, "-inf", before, start=0, num=limit)]

    def names(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(keys.FEDERATIONS))

    def status(self, fed: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(keys.fed_state(fed)).items()}

    def current_round(self, fed: str) -> int:
        return int(self.r.hget(keys.fed_state(fed), "round") or 0)

    def stats(self, fed: str | None) -> dict[str, int]:
        key = keys.fed_stats(fed) if fed else keys.GLOBAL_STATS
        return {k.decode(): int(v) for k, v in self.r.hgetall(key).items()}

    def server_lr(self, fed: str, default: float) -> float:
        raw = self.r.hget(keys.fed_state(fed), "server_lr")
        return float(raw) if raw is not None else default

    def secret(self, fed: str) -> bytes:
        """The federation's server-side secret, created on first use (the first writer wins)."""
        self.r.set(keys.fed_secret(fed), secrets.token_bytes(32), nx=True)
        return self.r.get(keys.fed_secret(fed))

    def heartbeat(self, who: str, now: float) -> None:
        """A process saying it is alive (beat on every sweep); exported for the no-heartbeat alert."""
        self.r.hset(keys.HEARTBEATS, who, repr(now))

    def heartbeats(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.r.hgetall(keys.HEARTBEATS).items()}


def _profiles(devices: Iterable[str | DeviceProfile]) -> dict[str, DeviceProfile]:
    out = {}
    for d in devices:
        profile = d if isinstance(d, DeviceProfile) else DeviceProfile(d)
        if not keys.valid_id(profile.device):
            raise StateError(f"device id {profile.device!r} is not a valid id")
        out[profile.device] = profile
    return out
