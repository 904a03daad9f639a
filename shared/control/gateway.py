"""The device gateway: check-in, presigned transfers, and submission of a device's claim check.

A device holds only its token. The gateway decides what it may touch: its federation's current
version (presigned GETs) and its own update key for the open round (one write-once presigned PUT).
On submit the device id comes from the token, never from the body; the gateway stamps the receive
time, records the message in the received-message ledger, and enqueues the envelope.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
import redis

from fleettune.shared import keys
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.envelope import Envelope, decode
from fleettune.shared.errors import Refusal, Rejected
from fleettune.shared.federation import DeviceProfile, FederationConfig
from fleettune.shared.state.ledger import LATE, Ledger
from fleettune.shared.control.groups import Groups
from fleettune.shared.control.presign import Presigner
from fleettune.shared.control.rollouts import Assignment, Rollouts
from fleettune.shared.control.tiers import Deployment, Variant
from fleettune.shared.export.tracking import Exports
from fleettune.shared.protocol import runtimes
from fleettune.shared.settings import Settings
from fleettune.shared.strategies import privacy
from fleettune.shared.secagg.coordinator import SecureRounds
from fleettune.shared.state import FederationState, RoundInfo

Enqueue = Callable[[bytes, float], None]  # (envelope bytes, received_at)


class Publisher(Protocol):
    """Builds the broker's message for an envelope, for a broker that is a Redis list (`queue`)."""

    queue: str

    def message(self, raw: bytes, sent_at: float) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class Receipt:
    receipt: str  # the sha256 of the envelope: the same submission always gets the same receipt
    federation: str
    round: int
    device: str
    received_at: float
    duplicate: bool = False


class Gateway:
    def __init__(self, state: FederationState, presigner: Presigner, settings: Settings, enqueue: Enqueue,
                 clock: Callable[[], float] = time.time, publisher: Publisher | None = None,
                 base_download: Callable[[str, str], dict | None] = lambda ref, base_url: None,
                 secure: SecureRounds | None = None) -> None:
        self.state = state
        self.secure = secure
        self.r: redis.Redis = state.r
        self.presigner = presigner
        self.settings = settings
        self.enqueue = enqueue
        self.publisher = publisher  # with one, record and enqueue are one Redis script
        self.base_download = base_download  # a registered base (id@version) by presigned URL; None: built in
        self.clock = clock
        self.ledger = Ledger(state.r, settings.redrive_after_s, settings.message_ttl_s,
                             settings.redis_min_replicas, settings.redis_wait_ms)
        self.groups = Groups(state.r)
        self.deployment = Deployment(state.r)
        self.rollouts = Rollouts(state, clock)
        self.exports = Exports(state.r)

    # --- rate limit ------------------------------------------------------------------------------

    def throttle(self, token_id: str, limit: int | None = None, bucket: str = "") -> None:
        """A fixed window per token (one per device) and bucket; Refusal(429) with Retry-After past the limit."""
        key, ttl, now = self.rate_window(token_id, bucket)
        with self.r.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, ttl)
            count = pipe.execute()[0]
        self.within_rate(count, limit or self.settings.device_rate_limit, now)

    def rate_window(self, token_id: str, bucket: str = "") -> tuple[str, int, float]:
        """(the window's key, its TTL, now) for one token's requests in one bucket. Keyed by the token
        alone: nothing a request's path says (a federation's name) can open a window of its own."""
        now = self.clock()
        window = int(now // self.settings.rate_window_s)
        return keys.rate_window(f"{token_id}{bucket}", window), self.settings.rate_window_s + 1, now

    def within_rate(self, count: int, limit: int, now: float) -> None:
        if count > limit:
            window_s = self.settings.rate_window_s
            retry = int((now // window_s + 1) * window_s - now) + 1
            raise Refusal(429, "rate_limited", f"more than {limit} requests in {window_s}s",
                          headers={"Retry-After": str(retry)})

    # --- check-in --------------------------------------------------------------------------------

    def check_in(self, fed: str, profile: DeviceProfile, base_url: str) -> dict[str, Any]:
        """What this device should run now (`serve`), and whether to train in the open round.

        Every answer carries `serve`: the base model, the adapter version (a canary's candidate or
        the serving version) and its URLs. A tier that does not train gets it with action "infer" or
        "api"; a training tier gets the round's plan, or a refusal (403/409) that carries `serve`.
        """
        config = self._config(fed)
        device = profile.device
        self.r.hset(keys.fed_profiles(fed), device, msgpack.packb(dataclasses.asdict(profile)))
        groups = self.groups.evaluate(fed, profile)  # dynamic rules, against what it declares now
        entry, variant = self.deployment.resolve(fed, profile.tier)
        serve = self._serve(fed, config, entry, variant, self.rollouts.assignment(fed, device, groups), base_url)
        if variant.mode != "api" and profile.runtime not in (None, runtimes.TORCH):
            serve["runtime"] = self._runtime(fed, config, profile, serve, base_url)
        if variant.mode != "train":
            return {"federation": fed, "device": device, "action": variant.mode, "tier": profile.tier,
                    "groups": sorted(groups), "serve": serve}
        try:
            return dict(self._train_plan(fed, config, profile, groups, base_url), groups=sorted(groups), serve=serve)
        except Refusal as refusal:
            raise refusal.with_extra(serve=serve, groups=sorted(groups)) from None

    def _serve(self, fed: str, config: FederationConfig, entry: str, variant: Variant,
               got: Assignment, base_url: str) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": variant.mode, "version": got.version, "previous": got.previous,
                               "rollout": got.rollout, "arm": got.arm}
        if variant.mode == "api":
            return dict(out, api_url=variant.api_url, adapter=None)
        base = variant.base_model or config.base_model
        until = self.clock() + self.settings.url_ttl_s
        out["base_download"] = self.base_download(base, base_url)
        if variant.adapter == "none":
            return dict(out, base_model=base, adapter=None)
        if variant.adapter == "distilled":
            found = self.deployment.distilled_at_or_below(fed, entry, got.version)
            if found is None:  # nothing distilled yet: the tier's base alone
                return dict(out, base_model=base, adapter=None)
            prefix, kind, version = keys.variant_prefix(fed, found, entry), "distilled", found
        else:
            prefix, kind, version = keys.version_prefix(fed, got.version), "federation", got.version
        urls = {name: self.presigner.get(f"{prefix}/{name}", until, base_url).as_dict()
                for name in (versions.ADAPTER_FILE, versions.CONFIG_FILE)}
        return dict(out, base_model=base, adapter={"kind": kind, "version": version, "download": urls})

    def _runtime(self, fed: str, config: FederationConfig, profile: DeviceProfile, serve: dict,
                 base_url: str) -> dict[str, Any]:
        """The served version in the device's runtime's format: the exported base (unless the device
        holds it: `runtime_base`) and the adapter to feed it, both by presigned GET. The newest
        version at or below the served one whose export is ready; `pending` while none is."""
        fmt = runtimes.RUNTIMES[profile.runtime]
        if fmt not in config.exports:
            raise Refusal(409, "format_not_exported", f"{fed} exports no {fmt} models (runtime {profile.runtime}); "
                          f"it exports {list(config.exports) or 'none'}: declare one of those runtimes or torch")
        out: dict[str, Any] = {"runtime": profile.runtime, "format": fmt}
        served = serve["adapter"]
        found = self.exports.ready_at_or_below(fed, fmt, served["version"]) \
            if served and served["kind"] == "federation" else None
        if found is None:  # nothing exported yet (or a distilled adapter, which is served to torch only)
            return dict(out, status="pending", version=None)
        record = self.exports.entry(fed, found, fmt)["record"]
        base, adapter = record["base"], record["adapter"]
        until = self.clock() + self.settings.url_ttl_s
        held = profile.runtime_base == base["sha256"]
        return dict(out, status="ready", version=found, max_abs_logit_diff=record["parity"]["max_abs_logit_diff"],
                    inputs=base["inputs"], max_tokens=base.get("max_tokens"), context=base.get("context"),
                    base_sha256=base["sha256"],
                    base=None if held else dict(self.presigner.get(base["key"], until, base_url).as_dict(),
                                                sha256=base["sha256"], size=base["size"]),
                    adapter=dict(self.presigner.get(adapter["key"], until, base_url).as_dict(),
                                 sha256=adapter["sha256"], size=adapter["size"]))

    def _train_plan(self, fed: str, config: FederationConfig, profile: DeviceProfile, groups: set[str],
                    base_url: str) -> dict[str, Any]:
        device = profile.device
        refusal = config.device_filter.refusal(profile.ram_mb, profile.storage_mb)
        if refusal is None and config.device_filter.groups and not groups & set(config.device_filter.groups):
            refusal = f"not a member of the federation's device groups {list(config.device_filter.groups)}"
        if refusal is not None:
            raise Refusal(403, "ineligible", refusal)
        status = self.state.federations.status(fed).get("status")
        info = self._open_round(fed)
        if status != "active" or info is None:
            raise Refusal(409, "no_open_round", f"federation {fed} is {status} and has no open round; check in later",
                          headers={"Retry-After": "30"})
        self.r.sadd(keys.fed_devices(fed), device)  # eligible now: it is selected for later rounds too
        round_config = self.state.federations.config(fed, info.config_rev) or config
        rate = round_config.aggregation.sampling_rate
        picked_out = round_config.policy.clients_per_round and not self.r.sismember(
            keys.round_cohort(fed, info.round), device)  # the round's cohort was picked when it opened
        if picked_out or (rate < 1.0 and not privacy.sampled(self.state.federations.secret(fed), info.round, device, rate)):
            # Poisson sampling, which the DP accountant counts on: the server's secret decides
            raise Refusal(409, "not_sampled", f"not sampled into round {info.round}; check in later",
                          headers={"Retry-After": "30"})
        if info.mode == "async":
            # one update per device per base version, and per buffer: an older update of this device
            # that joined the open buffer holds its place until the buffer publishes
            last = self.r.hget(keys.fed_async_bases(fed), device)
            if (last is not None and int(last) >= info.base_version) or self.r.hexists(
                    keys.round_updates(fed, info.round), device):
                raise Refusal(409, "up_to_date", f"{device} has an update in the open buffer or from "
                              f"v{info.base_version}; check in again once the next version is out",
                              headers={"Retry-After": "10"})
        if not self.state.rounds.join_cohort(fed, info.round, device):
            raise Refusal(409, "no_open_round", f"round {info.round} closed while checking in",
                          headers={"Retry-After": "30"})
        rank = round_config.tier_ranks.get(profile.tier)  # a tier of lower rank trains its own adapter
        prefix = keys.tier_prefix(fed, info.base_version, rank) if rank else keys.version_prefix(fed, info.base_version)
        adapter = round_config.adapter.for_rank(rank) if rank else round_config.adapter
        get_until = self.clock() + self.settings.url_ttl_s
        if info.mode != "async":  # an async device may train past this buffer's age limit
            get_until = min(info.deadline, get_until)
        secure = self._secure_plan(fed, info, round_config)
        scaffold = {}  # SCAFFOLD's server control variate (absent before the first SCAFFOLD round: zero)
        if round_config.aggregation.drift_control == "scaffold":
            key = f"{keys.version_prefix(fed, info.base_version)}/{versions.CONTROL_FILE}"
            scaffold[versions.CONTROL_FILE] = self.presigner.get(key, get_until, base_url).as_dict()
        return {
            "federation": fed, "device": device, "action": "train", "round": info.round,
            "deadline": info.deadline, "base_version": info.base_version, "config_revision": info.config_rev,
            "adapter": dataclasses.asdict(adapter), "base_model": round_config.base_model,
            "base_download": self.base_download(round_config.base_model, base_url),
            "training": dataclasses.asdict(round_config.training.for_round(info.round,
                                                                            round_config.policy.max_rounds)),
            "lora_aggregation": round_config.aggregation.lora,
            "drift_control": round_config.aggregation.drift_control,
            "min_samples": round_config.policy.min_samples_per_client,
            "download": {name: self.presigner.get(f"{prefix}/{name}", get_until, base_url).as_dict()
                         for name in (versions.ADAPTER_FILE, versions.CONFIG_FILE)} | scaffold,
            # no URL yet: a store bounds an upload's size only when its URL signs it, so the device asks
            # upload-url for one with the update's sha256 and size once it has trained
            "upload": None if secure else {"key": keys.update_object(fed, info.round, device),
                                           "url_from": f"/api/v1/federations/{fed}/upload-url"},
            "max_update_bytes": self.settings.max_update_bytes,
            **({"secure_aggregation": secure} if secure else {}),
        }

    def _secure_plan(self, fed: str, info: RoundInfo, config: FederationConfig) -> dict | None:
        """Under secure aggregation: what the device needs to take part in the round's stages (the
        update goes up only masked, through them, never through upload-url and submit)."""
        setting = config.aggregation.secure_aggregation
        if setting is None:
            return None
        if self.secure is None:
            raise Refusal(503, "unavailable", "this gateway has no secure-aggregation coordinator")
        names = sorted(config.update_tensors)
        length = 1 + sum(math.prod(config.update_tensors[k]) for k in names)
        max_weight = 1 if config.aggregation.dp else setting.max_weight  # DP: every clipped update counts the same
        self.secure.configure(fed, info.round, config.policy.max_update_norm, max_weight, length,
                              config.aggregation.dp_noise_multiplier)
        self.secure.ensure(fed, info.round, setting)
        return {"stages_url": f"/api/v1/federations/{fed}/secagg/{info.round}",
                "identity_url": f"/api/v1/federations/{fed}/identity", "clip": config.policy.max_update_norm,
                "max_weight": max_weight, "tensors": names, "length": length}

    def upload_url(self, fed: str, device: str, round_no: int, sha256: str, size: int, base_url: str) -> dict[str, Any]:
        """A write-once PUT URL for this device's update key, bound to the update's sha256 and size."""
        self._refuse_plain(fed, round_no)
        if size > self.settings.max_update_bytes:
            raise Refusal(413, "object_too_large", f"{size} bytes > {self.settings.max_update_bytes}")
        info = self._open_round(fed)
        if info is not None and info.mode == "async" and 0 < round_no <= info.round:
            # async: the buffer it checked in to may have published since; the update joins the open one
            # (ingest judges its staleness), so its URL outlives that buffer
            until = self.clock() + self.settings.url_ttl_s
        elif info is None or info.round != round_no:
            raise Refusal(409, "no_open_round", f"round {round_no} is not open")
        else:
            until = info.deadline
        if not self.r.sismember(keys.round_cohort(fed, round_no), device):
            raise Refusal(403, "not_selected", f"{device} has not checked in to round {round_no}")
        key = keys.update_object(fed, round_no, device)
        return dict(self.presigner.put(key, until, base_url, sha256, size).as_dict(), key=key)

    # --- submit ----------------------------------------------------------------------------------

    def submit(self, fed: str, device: str, fields: dict[str, Any]) -> Receipt:
        """Record the message as received and enqueue it once; a repeat gets the same receipt.

        The caller has authenticated the device for `fed` (tokens die with their federation). With
        a publisher, recording and enqueueing are one Redis script. A new submission received after
        its round's deadline is refused as late (409); a repeat of an on-time one gets its receipt.
        """
        env, raw, digest, entry = self._received(fed, device, fields)
        now = entry["received_at"]
        if self.publisher is not None:
            seen = self.ledger.record_and_push(digest, entry, now, self.publisher.queue,
                                               self.publisher.message(raw, now))
            return self._receipt_for(seen, digest, env, now)
        receipt = self._receipt_for(self.ledger.record(digest, entry, now), digest, env, now)
        if not receipt.duplicate:
            try:
                self.enqueue(raw, now)
            except Exception:
                self.ledger.forget(digest)  # not received after all: the device's retry must enqueue it
                raise
        return receipt

    async def submit_async(self, client, fed: str, device: str, fields: dict[str, Any]) -> Receipt:
        """`submit` as one Redis script over a redis.asyncio client (needs a publisher)."""
        assert self.publisher is not None
        env, raw, digest, entry = self._received(fed, device, fields)
        now = entry["received_at"]
        seen = await self.ledger.record_and_push_async(client, digest, entry, now, self.publisher.queue,
                                                       self.publisher.message(raw, now))
        return self._receipt_for(seen, digest, env, now)

    def _refuse_plain(self, fed: str, round_no: int) -> None:
        """Under secure aggregation an update in the clear would undo it: refused before it is sent
        (without an upload URL there is no object for a submit to name: ingest finds it missing)."""
        info = self.state.rounds.round_info(fed, round_no)
        config = (self.state.federations.config(fed, info.config_rev) if info else None) or self._config(fed)
        if config.aggregation.secure_aggregation is not None:
            raise Refusal(409, "secure_aggregation", f"round {round_no} takes updates only masked, through "
                          f"/api/v1/federations/{fed}/secagg/{round_no}")

    def _received(self, fed: str, device: str, fields: dict[str, Any]) -> tuple[Envelope, bytes, str, dict]:
        """The envelope (checked as a worker would check it), its bytes, digest and ledger entry."""
        env = Envelope(federation=fed, device=device, object_key=keys.update_object(fed, fields["round"], device),
                       **fields)
        raw = env.encode()
        try:
            decode(raw, self.settings.max_envelope_bytes)  # the same checks a worker makes, answered now
        except Rejected as rej:
            raise Refusal(422, rej.reason.value, rej.detail) from None
        entry = {"received_at": self.clock(), "federation": fed, "device": device, "round": env.round,
                 "envelope": raw}
        return env, raw, hashlib.sha256(raw).hexdigest(), entry

    @staticmethod
    def _receipt_for(seen: dict | str | None, digest: str, env: Envelope, now: float) -> Receipt:
        if seen == LATE:
            raise Refusal(409, "late", f"received after round {env.round}'s deadline")
        if seen is not None:
            return Receipt(digest, env.federation, env.round, env.device, seen["received_at"], duplicate=True)
        return Receipt(digest, env.federation, env.round, env.device, now)

    def report(self, fed: str, device: str, version: int, values: dict[str, float]) -> dict[str, Any]:
        """A device's quality report on the version it serves, for its canary's gates."""
        self._config(fed)
        raw = self.r.hget(keys.fed_profiles(fed), device)
        profile = DeviceProfile(**msgpack.unpackb(raw)) if raw else DeviceProfile(device)
        # the groups it matched at its last check-in: a report cannot move a device between arms
        return self.rollouts.report(fed, device, self.groups.evaluate(fed, profile), version, values)

    def receipt(self, fed: str, device: str, receipt_id: str) -> dict[str, Any]:
        """The outcome of one of this device's submissions: pending, accepted or rejected (and why)."""
        h = self.ledger.entry(receipt_id) if len(receipt_id) == 64 else None
        if not h or h["federation"] != fed or h["device"] != device:
            raise Refusal(404, "unknown_receipt", "no such receipt for this device")
        outcome = self.state.accounting.outcome(receipt_id)
        status, reason = "pending", None
        if outcome is not None:
            status, _, reason = outcome.partition(":")
        return {"receipt": receipt_id, "federation": fed, "device": device, "round": h["round"],
                "received_at": h["received_at"], "status": status, "reason": reason or None}

    # --- helpers ---------------------------------------------------------------------------------

    def _config(self, fed: str) -> FederationConfig:
        config = self.state.federations.config(fed)
        if config is None:
            raise Refusal(404, "unknown_federation", f"no federation {fed!r}")
        return config

    def _open_round(self, fed: str) -> RoundInfo | None:
        round_no = self.state.federations.current_round(fed)
        info = self.state.rounds.round_info(fed, round_no) if round_no else None
        if info is None or info.status != "open":
            return None
        if info.mode != "async" and self.clock() >= info.deadline:  # a buffer past its age still takes updates
            return None
        return info
