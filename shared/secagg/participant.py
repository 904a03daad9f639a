"""A device's whole part in a secure round, over the gateway: one step at a time, or to the end.

`Participant.step` looks at the round's stage and does what this device owes it (advertise keys,
send shares, upload the masked input, answer the unmasking), at most one action per call, so a
process driving many devices can interleave them; `run` polls until the round is done with it.
A new attempt (the server restarted with fresh keys) gets a fresh session.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from fleettune import FleettuneAPIError  # the SDK as installed: the class its clients raise
from fleettune.shared.secagg import primitives as crypto
from fleettune.shared.secagg.device import DeviceSession
from fleettune.shared.secagg.fixed_point import Encoding
from fleettune.shared.secagg.messages import Context, Reason, SecAggError

DONE = ("ready", "failed")  # while "unmasking" the attempt may still fail and restart with fresh keys


def flatten(delta: dict, names: list[str], clip: float) -> np.ndarray:
    """The update as one float64 vector in the plan's tensor order, clipped to L2 norm `clip` on the
    device: the server cannot clip what it cannot see."""
    x = np.concatenate([np.asarray(delta[k], dtype=np.float64).ravel() for k in names])
    norm = float(np.linalg.norm(x))
    if not np.isfinite(norm):
        raise ValueError("the update is not finite")
    return x * (clip / norm) if norm > clip else x


@dataclasses.dataclass
class Participant:
    device: str
    identity: bytes  # the device's Ed25519 private key; only its public half leaves the device
    federation: str
    plan: dict  # the check-in's plan (its "secure_aggregation" part)
    update: np.ndarray  # flat, clipped (see `flatten`)
    weight: int
    rng: np.random.Generator = dataclasses.field(default_factory=np.random.default_rng)
    session: DeviceSession | None = None
    outcome: str = ""  # the last stage seen once the device has nothing more to do
    refusals: list[str] = dataclasses.field(default_factory=list)

    @property
    def round(self) -> int:
        return int(self.plan["round"])

    def step(self, client) -> bool:
        """Do what the round's stage asks of this device now; True once it has nothing left to do."""
        try:
            state = client.secagg_stage(self.round)
        except FleettuneAPIError as err:
            if err.code != "stage_closed":
                raise
            self.outcome = "closed"  # the round is closing or over: nothing more to send
            return True
        stage, attempt, given = state["stage"], state["attempt"], state["input"]
        if stage in DONE:
            self.outcome = stage
            return True
        if self.session is None or self.session.ctx.attempt != attempt:
            if self.session is not None and self.session.revealed:
                # it gave out shares in an earlier attempt: were that attempt's sum in fact rebuilt, a
                # second sum over another set would tell the server the difference. So it sits this
                # round out; what two such sums can differ by is then the devices that answered, at
                # least the threshold of them, never one device.
                self.outcome = "sat_out"
                return True
            if stage != "advertise":
                return False  # it missed this attempt's keys: it waits for the next attempt, or the end
            self.session = DeviceSession(Context(self.federation, self.round, attempt), self.device, self.identity,
                                         encoding=None, threshold=0)  # both arrive with their stages
        if state["answered"] or given is None:
            return False
        try:
            if stage == "advertise":
                message = self.session.advertise()
            elif stage == "share":
                message = self.session.share(given)
            elif stage == "masked":
                encoding = Encoding(**given["encoding"])
                secure = self.plan["secure_aggregation"]
                if (encoding.clip, encoding.max_weight) != (secure["clip"], secure["max_weight"]):
                    # the range the server sized the modulus for must be the one the plan clipped to
                    raise SecAggError(Reason.INCONSISTENT, "the attempt's encoding disagrees with the round's plan")
                self.session.encoding = encoding
                masked = self.session.masked_input(given["inbox"], self.update, self.weight, self.rng)
                if masked.shape[0] != given["length"]:
                    raise ValueError(f"the masked input has {masked.shape[0]} values, the round {given['length']}")
                message = {"sha256": client.secagg_upload(self.round, masked.astype(masked.dtype.newbyteorder("<"))
                                                          .tobytes())}
            elif stage == "consistency":
                message = self.session.sign_survivors(given)
            else:
                message = self.session.unmask(given)
        except SecAggError as err:  # this device cannot take part in this attempt: it sits it out
            self.refusals.append(err.reason.value)
            return False
        message["attempt"] = attempt
        try:
            client.secagg_answer(self.round, stage, message)
        except FleettuneAPIError as err:  # the stage ended meanwhile, or the answer was refused: named, kept
            if err.status >= 500:
                raise
            self.refusals.append(err.code)
        return False

    def at_stage(self, client) -> str:
        """The round's stage now ("closed" once the round stopped taking stage answers)."""
        try:
            return client.secagg_stage(self.round)["stage"]
        except FleettuneAPIError as err:
            if err.code != "stage_closed":
                raise
            return "closed"

    def run(self, client, timeout: float = 600, poll: float = 0.2) -> str:
        """Step until the round is done with this device; its last stage (ready, failed, ...)."""
        end = time.monotonic() + timeout
        while not self.step(client):
            if time.monotonic() > end:
                raise TimeoutError(f"{self.device}: round {self.round}'s secure aggregation still running")
            time.sleep(poll)
        return self.outcome


def new_identity() -> tuple[bytes, bytes]:
    """(private, public) Ed25519 identity for a device."""
    private = crypto.identity_key()
    return private, crypto.identity_public(private)
