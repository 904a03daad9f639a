"""SecAgg+ as stages of a round, in Redis: each with a deadline and a minimum of survivors.

    advertise -> share -> masked -> consistency -> unmask -> unmasking -> ready
        \\___________\\__________\\___________\\__________\\___ too few: a new attempt with fresh keys (or failed)

A stage ends when every device expected at it has answered, or at its deadline; the API advances
it on the last answer, the sweep on the deadline. Each answer is checked (shared.secagg.server) and
stored once per device (HSETNX, under a WATCH of the stage, so an answer that races the stage's
end is refused as `stage_closed`). The unmasking itself runs in the round's close, on a worker: it
reads the masked inputs from the object store, rebuilds the seeds and keys the shares allow, and
hands the close the sum. Nothing here ever holds an unmasked single update.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import time
from collections.abc import Callable

import msgpack
import numpy as np
import redis

from fleettune.shared import keys
from fleettune.shared.errors import ObjectNotFound, Rejected
from fleettune.shared.secagg import fixed_point, server
from fleettune.shared.secagg import graph as graphs
from fleettune.shared.secagg.config import SecureAggregation
from fleettune.shared.secagg.fixed_point import Encoding
from fleettune.shared.secagg.graph import Graph
from fleettune.shared.secagg.messages import Context, Reason, SecAggError, field, pack, unpack
from fleettune.shared.storage import ObjectStore

STAGES = ("advertise", "share", "masked", "consistency", "unmask")
UNMASKING, READY, FAILED = "unmasking", "ready", "failed"
IDENTITY_BYTES = 32


@dataclasses.dataclass(frozen=True)
class Attempt:
    """The state of a round's secure aggregation, as its hash holds it."""

    attempt: int
    stage: str
    deadline: float
    raw: dict[str, bytes]

    def graph(self) -> Graph:
        return Graph.from_dict(msgpack.unpackb(self.raw["graph"]))

    def encoding(self) -> Encoding:
        return Encoding(**msgpack.unpackb(self.raw["encoding"]))

    @property
    def threshold(self) -> int:
        return int(self.raw["threshold"])

    @property
    def length(self) -> int:
        return int(self.raw["length"])


@dataclasses.dataclass(frozen=True)
class Sum:
    """What the close gets: Σ w·x over the survivors (float64, flat), Σw, and who is in it."""

    total: np.ndarray
    weight_sum: float
    survivors: list[str]
    attempt: int
    dropped: int  # devices that shared keys but sent no masked input
    bound: float  # per-coordinate bound on |mean − exact mean| from the fixed-point rounding
    encoding: Encoding

    @property
    def device_noise_std(self) -> float:
        """The std of the DP noise the survivors' devices added to each coordinate of the sum."""
        return self.encoding.noise_std * math.sqrt(len(self.survivors))


class SecureRounds:
    def __init__(self, client: redis.Redis, store: ObjectStore, clock: Callable[[], float] = time.time) -> None:
        self.r, self.store, self.clock = client, store, clock
        self._last: tuple[tuple[str, int, int], Sum] | None = None  # the close asks twice: judge, then aggregate

    # --- identities ------------------------------------------------------------------------------

    def register_identity(self, fed: str, device: str, public: bytes) -> bool:
        """Record a device's identity key once; True if it is now (or already was) this key."""
        if len(public) != IDENTITY_BYTES:
            raise SecAggError(Reason.MALFORMED, f"an Ed25519 public key is {IDENTITY_BYTES} bytes")
        self.r.hsetnx(keys.fed_identities(fed), device, public)
        return self.r.hget(keys.fed_identities(fed), device) == public

    def set_identity(self, fed: str, device: str, public: bytes) -> None:
        """The operator registers (or replaces) a device's identity key."""
        if len(public) != IDENTITY_BYTES:
            raise SecAggError(Reason.MALFORMED, f"an Ed25519 public key is {IDENTITY_BYTES} bytes")
        self.r.hset(keys.fed_identities(fed), device, public)

    def identities(self, fed: str, devices) -> dict[str, bytes]:
        devices = sorted(devices)
        if not devices:
            return {}
        values = self.r.hmget(keys.fed_identities(fed), devices)
        return {d: v for d, v in zip(devices, values) if v is not None}

    # --- state -----------------------------------------------------------------------------------

    def ensure(self, fed: str, round_no: int, setting: SecureAggregation) -> None:
        """Start attempt 1 at `advertise` on the round's first check-in (later calls change nothing)."""
        key = keys.secagg(fed, round_no)
        if not self.r.hexists(key, "attempt"):
            with self.r.pipeline(transaction=True) as pipe:  # the first caller's fields win
                pipe.hsetnx(key, "attempt", 1)
                pipe.hsetnx(key, "stage", "advertise")
                pipe.hsetnx(key, "deadline", repr(self.clock() + setting.stage_timeout_s))
                pipe.execute()

    def load(self, fed: str, round_no: int, pipe=None) -> Attempt | None:
        h = (pipe or self.r).hgetall(keys.secagg(fed, round_no))
        if not h:
            return None
        raw = {k.decode(): v for k, v in h.items()}
        return Attempt(int(raw["attempt"]), raw["stage"].decode(), float(raw["deadline"]), raw)

    def _stage(self, fed: str, round_no: int, attempt: int, stage: str) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.r.hgetall(keys.secagg_stage(fed, round_no, attempt, stage)).items()}

    def _unpacked(self, fed: str, round_no: int, attempt: int, stage: str) -> dict[str, dict]:
        return {d: msgpack.unpackb(v, raw=False) for d, v in self._stage(fed, round_no, attempt, stage).items()}

    def _some(self, fed: str, round_no: int, attempt: int, stage: str, devices) -> dict[str, dict]:
        """The stage's answers of `devices` only (a neighbourhood, not the cohort: polls and answers
        of a 1,000-device round each read k entries, not n)."""
        devices = sorted(devices)
        if not devices:
            return {}
        values = self.r.hmget(keys.secagg_stage(fed, round_no, attempt, stage), devices)
        return {d: msgpack.unpackb(v, raw=False) for d, v in zip(devices, values) if v is not None}

    def _members(self, fed: str, round_no: int, attempt: int, stage: str) -> set[str]:
        """Who answered the stage (its keys only)."""
        return {d.decode() for d in self.r.hkeys(keys.secagg_stage(fed, round_no, attempt, stage))}

    # --- what a device sees ----------------------------------------------------------------------

    def stage_for(self, fed: str, round_no: int, device: str, setting: SecureAggregation) -> dict:
        """The attempt's stage and this device's input for it (None: nothing for it to do now)."""
        a = self.advance(fed, round_no, setting)
        if a is None:
            raise SecAggError(Reason.STAGE_CLOSED, f"round {round_no} has no secure aggregation under way")
        out = {"round": round_no, "attempt": a.attempt, "stage": a.stage, "deadline": a.deadline, "input": None,
               "answered": False}
        if a.stage not in STAGES:
            return out
        out["answered"] = bool(self.r.hexists(keys.secagg_stage(fed, round_no, a.attempt, a.stage), device))
        if out["answered"]:
            return out
        if a.stage == "advertise":
            out["input"] = {}
        elif a.stage == "share":
            graph = a.graph()
            if device in graph:  # the graph is drawn over the devices that advertised
                peers = graph.neighbours(device)
                adverts = self._some(fed, round_no, a.attempt, "advertise", peers)
                out["input"] = server.offer_for(device, graph, a.threshold, adverts,
                                                self.identities(fed, adverts))
        elif a.stage == "masked":
            box = self.r.hget(keys.secagg_stage(fed, round_no, a.attempt, "inbox"), device)
            if box is not None:
                out["input"] = {"inbox": msgpack.unpackb(box, raw=False), "encoding": a.encoding().as_dict(),
                                "length": a.length}
        elif a.stage == "consistency":
            survivors = self._members(fed, round_no, a.attempt, "masked")
            if device in survivors:
                out["input"] = {"survivors": sorted(survivors)}
        elif a.stage == "unmask":
            if self.r.hexists(keys.secagg_stage(fed, round_no, a.attempt, "consistency"), device):
                box = msgpack.unpackb(self.r.hget(keys.secagg_stage(fed, round_no, a.attempt, "inbox"), device),
                                      raw=False)
                survivors = self._members(fed, round_no, a.attempt, "masked")
                signed = self._some(fed, round_no, a.attempt, "consistency", a.graph().neighbours(device))
                theirs = {p: answer["sig"] for p, answer in signed.items()}
                out["input"] = server.unmask_request(set(box), survivors, theirs)
        return out

    def masked_slot(self, fed: str, round_no: int, device: str) -> tuple[str, int, float]:
        """(object key, exact size, deadline) for this device's masked input in the open attempt."""
        a = self.load(fed, round_no)
        if a is None or a.stage != "masked":
            raise SecAggError(Reason.STAGE_CLOSED, "the attempt is not collecting masked inputs")
        if not self.r.hexists(keys.secagg_stage(fed, round_no, a.attempt, "inbox"), device):
            raise SecAggError(Reason.NOT_IN_STAGE, f"{device} did not share keys in attempt {a.attempt}")
        return (keys.secagg_masked_object(fed, round_no, a.attempt, device),
                a.length * a.encoding().dtype.itemsize, a.deadline)

    # --- what a device sends ---------------------------------------------------------------------

    def receive(self, fed: str, round_no: int, device: str, stage: str, raw: bytes,
                setting: SecureAggregation) -> dict:
        """Check one stage answer and store it once; advance the stage when it was the last."""
        try:
            result = self._receive(fed, round_no, device, stage, raw, setting)
        except SecAggError as err:
            self.r.hincrby(keys.fed_stats(fed), f"secagg_refused:{err.reason.value}", 1)
            raise
        self.advance(fed, round_no, setting)
        return result

    def _receive(self, fed: str, round_no: int, device: str, stage: str, raw: bytes,
                 setting: SecureAggregation) -> dict:
        if stage not in STAGES:
            raise SecAggError(Reason.MALFORMED, f"unknown stage {stage!r}")
        msg = unpack(raw)
        a = self.load(fed, round_no)
        if a is None or a.stage != stage or self.clock() >= a.deadline:
            now = a.stage if a else "none"
            raise SecAggError(Reason.STAGE_CLOSED, f"round {round_no}'s secure aggregation is at stage {now}")
        if field(msg, "attempt", int) != a.attempt:
            raise SecAggError(Reason.STAGE_CLOSED, f"attempt {msg['attempt']} is over; attempt {a.attempt} is open")
        ctx = Context(fed, round_no, a.attempt)
        if stage == "advertise":
            cohort = {device} if self.r.sismember(keys.round_cohort(fed, round_no), device) else set()
            checked = server.check_advert(ctx, msg, device, cohort, self.identities(fed, [device]))
        elif stage == "share":
            graph = a.graph()
            peers = set(graph.neighbours(device)) if device in graph else set()
            adverts = self._some(fed, round_no, a.attempt, "advertise", peers | {device})
            checked = server.check_shares(ctx, msg, device, graph, adverts, self.identities(fed, adverts))
        elif stage == "masked":
            key, size, _ = self.masked_slot(fed, round_no, device)
            sha = field(msg, "sha256", str)
            try:
                found = self.store.digest(key)
            except (ObjectNotFound, Rejected):
                raise SecAggError(Reason.BAD_VECTOR, "no masked input was uploaded to its URL") from None
            if found != (sha, size):
                raise SecAggError(Reason.BAD_VECTOR, f"the upload is {found[1]} bytes with another sha256; "
                                                     f"{size} bytes expected")
            checked = {"sha256": sha}
        elif stage == "consistency":
            survivors = sorted(self._members(fed, round_no, a.attempt, "masked"))
            checked = server.check_consistency(ctx, msg, device, survivors, self.identities(fed, [device]).get(device))
        else:
            box = self.r.hget(keys.secagg_stage(fed, round_no, a.attempt, "inbox"), device)
            survivors = self._members(fed, round_no, a.attempt, "masked")
            held = set(msgpack.unpackb(box, raw=False)) if box is not None else set()
            signers = self._members(fed, round_no, a.attempt, "consistency")
            checked = server.check_unmask(msg, device, held, survivors, signers)
        stage_key = keys.secagg_stage(fed, round_no, a.attempt, stage)

        def store(pipe) -> bool:
            now = self.load(fed, round_no, pipe)
            if now is None or (now.attempt, now.stage) != (a.attempt, stage):
                raise SecAggError(Reason.STAGE_CLOSED, "the stage ended while this answer was checked")
            if pipe.hexists(stage_key, device):
                raise SecAggError(Reason.DUPLICATE_STAGE, f"{device} already answered stage {stage}")
            pipe.multi()
            pipe.hset(stage_key, device, pack(checked))
            return True

        self.r.transaction(store, keys.secagg(fed, round_no), stage_key, value_from_callable=True)
        return {"round": round_no, "attempt": a.attempt, "stage": stage, "accepted": True}

    # --- advancing -------------------------------------------------------------------------------

    def advance(self, fed: str, round_no: int, setting: SecureAggregation) -> Attempt | None:
        """Move past every stage that is complete or past its deadline; returns the state after."""
        while True:
            a = self.load(fed, round_no)
            if a is None or a.stage not in STAGES:
                return a
            answered = self.r.hlen(keys.secagg_stage(fed, round_no, a.attempt, a.stage))
            if answered < self._expected(fed, round_no, a) and self.clock() < a.deadline:
                return a
            if not self._step(fed, round_no, a, setting):
                return self.load(fed, round_no)

    def _expected(self, fed: str, round_no: int, a: Attempt) -> int:
        if a.stage == "advertise":
            return int(self.r.scard(keys.round_cohort(fed, round_no)))
        previous = {"share": "advertise", "masked": "inbox", "consistency": "masked", "unmask": "consistency"}[a.stage]
        return int(self.r.hlen(keys.secagg_stage(fed, round_no, a.attempt, previous)))

    def _step(self, fed: str, round_no: int, a: Attempt, setting: SecureAggregation) -> bool:
        """One transition out of `a`'s stage, under a WATCH of the state: False if another did it."""
        answered = self._stage(fed, round_no, a.attempt, a.stage)
        minimum = max(setting.min_survivors, 2)
        fields: dict[str, bytes | str | int] = {}
        if len(answered) < minimum:
            return self._restart(fed, round_no, a, setting, f"{len(answered)} devices at stage {a.stage}")
        if a.stage == "advertise":
            # the server's secret seeds the draw: no device can place itself next to a chosen victim
            seed = hmac.new(self.r.get(keys.fed_secret(fed)) or b"", f"secagg:{round_no}:{a.attempt}".encode(),
                            hashlib.sha256).digest()
            graph = graphs.build(answered, seed, setting.degree, setting.dropout)
            clip, z = float(a.raw["clip"]), float(a.raw.get("noise_multiplier", b"0"))
            # distributed DP: the survivors' noise must reach the central level z·C; sized for the
            # share `dropout` may take, and topped up by the server if more vanish (see Sum)
            expected = max(minimum, math.ceil(len(answered) * (1 - setting.dropout)))
            encoding = fixed_point.choose(len(answered), clip, int(a.raw["max_weight"]), setting.precision_bits,
                                          z * clip / math.sqrt(expected))
            fields = {"stage": "share", "graph": msgpack.packb(graph.as_dict()),
                      "threshold": graphs.default_threshold(graph.degree),
                      "encoding": msgpack.packb(encoding.as_dict())}
        elif a.stage == "share":
            shared = {d: msgpack.unpackb(v, raw=False) for d, v in answered.items()}
            inboxes = server.relay(shared)
            box_key = keys.secagg_stage(fed, round_no, a.attempt, "inbox")
            boxes = {d: pack(box) for d, box in inboxes.items() if len(box) >= a.threshold}
            if len(boxes) < minimum:
                return self._restart(fed, round_no, a, setting, f"{len(boxes)} devices hold enough shares")
            self.r.delete(box_key)
            self.r.hset(box_key, mapping=boxes)
            fields = {"stage": "masked"}
        elif a.stage == "masked":
            fields = {"stage": "consistency"}
        elif a.stage == "consistency":
            fields = {"stage": "unmask"}
        else:
            fields = {"stage": UNMASKING}
        fields["deadline"] = repr(self.clock() + setting.stage_timeout_s)
        return self._transition(fed, round_no, a, fields)

    def _transition(self, fed: str, round_no: int, a: Attempt, fields: dict) -> bool:
        key = keys.secagg(fed, round_no)

        def move(pipe) -> bool:
            now = self.load(fed, round_no, pipe)
            if now is None or (now.attempt, now.stage) != (a.attempt, a.stage):
                return False
            pipe.multi()
            pipe.hset(key, mapping=fields)
            return True

        return self.r.transaction(move, key, value_from_callable=True)

    def _restart(self, fed: str, round_no: int, a: Attempt, setting: SecureAggregation, why: str) -> bool:
        """A new attempt with fresh keys (no key or mask is ever reused), or the end: failed."""
        if a.attempt >= setting.max_attempts:
            return self._transition(fed, round_no, a, {"stage": FAILED, "reason": f"attempt {a.attempt}: {why}"})
        return self._transition(fed, round_no, a, {
            "attempt": a.attempt + 1, "stage": "advertise", "restarted": f"attempt {a.attempt}: {why}",
            "deadline": repr(self.clock() + setting.stage_timeout_s)})

    def configure(self, fed: str, round_no: int, clip: float, max_weight: int, length: int,
                  noise_multiplier: float = 0.0) -> None:
        """The clip, weight cap, vector length and DP noise multiplier a round's encoding is sized
        for (from its config)."""
        key = keys.secagg(fed, round_no)
        with self.r.pipeline(transaction=False) as pipe:  # one round trip per check-in
            pipe.hsetnx(key, "noise_multiplier", repr(float(noise_multiplier)))
            pipe.hsetnx(key, "clip", repr(float(clip)))
            pipe.hsetnx(key, "max_weight", int(max_weight))
            pipe.hsetnx(key, "length", int(length))
            pipe.execute()

    # --- unmasking (in the close) ----------------------------------------------------------------

    def unmask(self, fed: str, round_no: int, setting: SecureAggregation, max_bytes: int) -> Sum | None:
        """The survivors' sum, once the attempt reached `unmasking`; None before. A sum that cannot
        be rebuilt (too few or bad shares) restarts the attempt (or fails the round) and gives None."""
        a = self.advance(fed, round_no, setting)
        if a is None or a.stage not in (UNMASKING, READY):
            return None
        if self._last is not None and self._last[0] == (fed, round_no, a.attempt):
            return self._last[1]  # deterministic from what Redis and the store hold: the same sum
        ctx = Context(fed, round_no, a.attempt)
        graph, encoding = a.graph(), a.encoding()
        adverts = self._unpacked(fed, round_no, a.attempt, "advertise")
        shares = self._unpacked(fed, round_no, a.attempt, "share")
        held = {d: set(msgpack.unpackb(v, raw=False))
                for d, v in self._stage(fed, round_no, a.attempt, "inbox").items()}
        commitments = {d: m["commitment"] for d, m in shares.items() if d in held}
        answers = self._unpacked(fed, round_no, a.attempt, "unmask")
        masked = server.MaskedSum(encoding)
        try:
            for device, m in sorted(self._unpacked(fed, round_no, a.attempt, "masked").items()):
                blob = self._read_masked(fed, round_no, a.attempt, device, m["sha256"], a.length, encoding, max_bytes)
                masked.add(device, np.frombuffer(blob, dtype=encoding.dtype.newbyteorder("<")).astype(encoding.dtype))
            weight_sum, total = server.unmask(ctx, encoding, graph, a.threshold, adverts, commitments, held,
                                              masked, answers)
        except SecAggError as err:
            self.r.hincrby(keys.fed_stats(fed), f"secagg_failed:{err.reason.value}", 1)
            if err.reason == Reason.OUT_OF_RANGE:  # a device broke its bounds: a fresh attempt would meet it again
                self._transition(fed, round_no, a, {"stage": FAILED, "reason": err.detail})
            else:
                self._restart(fed, round_no, a, setting, err.detail)
            return None
        survivors = sorted(masked.devices)
        if a.stage == UNMASKING:
            self._transition(fed, round_no, a, {"stage": READY, "survivors": len(survivors),
                                                "weight_sum": repr(weight_sum)})
        result = Sum(total, weight_sum, survivors, a.attempt, len(commitments) - len(survivors),
                     encoding.mean_error_bound(len(survivors), weight_sum), encoding)
        self._last = ((fed, round_no, a.attempt), result)
        return result

    def _read_masked(self, fed: str, round_no: int, attempt: int, device: str, sha: str, length: int,
                     encoding: Encoding, max_bytes: int) -> bytes:
        key = keys.secagg_masked_object(fed, round_no, attempt, device)
        try:
            blob = self.store.get(key, min(max_bytes, length * encoding.dtype.itemsize))
        except (ObjectNotFound, Rejected):
            raise SecAggError(Reason.BAD_VECTOR, f"{device}'s masked input vanished from the store") from None
        if hashlib.sha256(blob).hexdigest() != sha or len(blob) != length * encoding.dtype.itemsize:
            raise SecAggError(Reason.BAD_VECTOR, f"{device}'s masked input changed after it was checked")
        return blob

    def summary(self, fed: str, round_no: int) -> dict:
        """For the round's API view and the manifest: attempt, stage, survivors and refusals."""
        a = self.load(fed, round_no)
        if a is None:
            return {}
        out = {"attempt": a.attempt, "stage": a.stage, "deadline": a.deadline}
        for name in ("survivors", "reason", "restarted"):
            if name in a.raw:
                value = a.raw[name].decode()
                out[name] = int(value) if name == "survivors" else value
        return out
