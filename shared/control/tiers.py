"""Cascading tiers: which model variant each device tier runs, and whether it trains.

A deployment maps tier names to variants. The usual cascade:
    tier 1  mode "train": the federation's adapter on its base (QLoRA: a 4-bit base) - it trains
    tier 2  mode "infer", adapter "distilled": a smaller base, inference only, serving adapters the
            server distils from each tier-1 version (shared/pipeline/distill.py)
    tier 3  mode "infer" with a distilled prompt-tuning adapter on a compact base, or mode "api":
            the device calls the server's API instead of running a model
A tier the deployment does not name uses its "*" entry, or trains (a federation with no deployment
behaves as before: every device trains).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

from fleettune.shared import keys
from fleettune.shared.errors import Refusal
from fleettune.shared.pipeline.distill import Distillation

Mode = Literal["train", "infer", "api"]
DEFAULT = "*"
MAX_TIERS = 16


@dataclasses.dataclass(frozen=True)
class Variant:
    mode: Mode = "train"
    base_model: str | None = None  # None: the federation's base model
    adapter: Literal["federation", "distilled", "none"] = "federation"
    api_url: str | None = None
    distillation: Distillation = Distillation()

    def __post_init__(self) -> None:
        if self.mode == "train" and (self.adapter != "federation" or self.base_model is not None):
            raise ValueError("a training tier trains the federation's adapter on its own base")
        if self.mode == "api" and not self.api_url:
            raise ValueError("an api tier needs api_url")
        if self.adapter == "distilled" and not self.base_model:
            raise ValueError("a distilled adapter is distilled onto a base_model of the tier's own")

    @property
    def distilled(self) -> bool:
        return self.mode == "infer" and self.adapter == "distilled"


TRAIN = Variant()


class Deployment:
    """A federation's tier -> variant map, in Redis."""

    def __init__(self, client) -> None:
        self.r = client

    def put(self, fed: str, tiers: dict[str, Variant]) -> dict[str, Variant]:
        if len(tiers) > MAX_TIERS:
            raise Refusal(422, "invalid_deployment", f"at most {MAX_TIERS} tiers")
        self.r.set(keys.fed_deployment(fed), json.dumps({t: dataclasses.asdict(v) for t, v in tiers.items()}))
        return tiers

    def get(self, fed: str) -> dict[str, Variant]:
        raw = self.r.get(keys.fed_deployment(fed))
        if raw is None:
            return {}
        tiers = json.loads(raw)
        return {t: Variant(**dict(v, distillation=Distillation(**v["distillation"]))) for t, v in tiers.items()}

    def resolve(self, fed: str, tier: str) -> tuple[str, Variant]:
        """(the deployment entry that applies to this tier, its variant)."""
        tiers = self.get(fed)
        if tier in tiers:
            return tier, tiers[tier]
        return DEFAULT, tiers.get(DEFAULT, TRAIN)

    def view(self, fed: str) -> dict[str, dict]:
        return {t: dataclasses.asdict(v) for t, v in self.get(fed).items()}

    def distilled_tiers(self, fed: str) -> dict[str, Variant]:
        return {t: v for t, v in self.get(fed).items() if v.distilled}

    # which versions have been distilled for a tier (the newest at or below a version is served)

    def record_distilled(self, fed: str, tier: str, version: int) -> None:
        with self.r.pipeline() as pipe:
            pipe.zadd(keys.fed_distilled(fed, tier), {str(version): version})
            pipe.zrem(keys.DISTILL_DUE, _due(fed, version, tier))
            pipe.execute()

    def mark_due(self, fed: str, version: int, tier: str, at: float = 0.0) -> None:
        """A distillation to run; beat's sweep sends those due long enough ago (0: at its next pass)."""
        self.r.zadd(keys.DISTILL_DUE, {_due(fed, version, tier): at})

    def forget_due(self, fed: str, version: int, tier: str) -> None:
        self.r.zrem(keys.DISTILL_DUE, _due(fed, version, tier))

    def due(self, before: float, limit: int = 20) -> list[tuple[str, int, str]]:
        out = []
        for member in self.r.zrangebyscore(keys.DISTILL_DUE, "-inf", before, start=0, num=limit):
            fed, version, tier = member.decode().split(":")
            out.append((fed, int(version), tier))
        return out

    def distilled_at_or_below(self, fed: str, tier: str, version: int) -> int | None:
        found = self.r.zrevrangebyscore(keys.fed_distilled(fed, tier), version, "-inf", start=0, num=1)
        return int(found[0]) if found else None


def _due(fed: str, version: int, tier: str) -> str:
    return f"{fed}:{version}:{tier}"  # ids never hold ':'
