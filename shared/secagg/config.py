"""A federation's secure-aggregation setting (`"secure_aggregation": {...}` in its strategy)."""

from __future__ import annotations

import dataclasses

from pydantic import ConfigDict, with_config

from fleettune.shared.errors import ConfigError


@with_config(ConfigDict(extra="forbid"))
@dataclasses.dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+ rounds. The clip is the round policy's max_update_norm, applied on the device."""

    max_weight: int = 64  # a device's weight (its sample count) is capped here: it bounds the sum's range
    precision_bits: int = 16  # fractional bits at least; the modulus (2^32 or 2^64) follows
    degree: int | None = None  # neighbours per device; None: from the cohort and `dropout` (graph.default_degree)
    dropout: float = 1 / 3  # the share of devices that may vanish, which the default degree is sized for
    min_survivors: int = 2  # fewer masked inputs than this (or the quorum) restart the attempt
    stage_timeout_s: float = 120.0  # each stage's deadline; the round's own deadline still bounds the whole
    max_attempts: int = 3  # fresh-key restarts before the round fails

    def __post_init__(self) -> None:
        checks = {
            "max_weight must be in 1..1,000,000": 1 <= self.max_weight <= 1_000_000,
            "precision_bits must be in 8..40": 8 <= self.precision_bits <= 40,
            "degree must be even and at least 4": self.degree is None or (self.degree >= 4 and self.degree % 2 == 0),
            "dropout must be in [0, 0.5)": 0 <= self.dropout < 0.5,
            "min_survivors must be at least 2 (a sum of one is that device's update)": self.min_survivors >= 2,
            "stage_timeout_s must be in (0, 86400]": 0 < self.stage_timeout_s <= 86400,
            "max_attempts must be in 1..10": 1 <= self.max_attempts <= 10,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ConfigError("; ".join(failed))


# why each rule does or does not compose with masked sums (AggregationConfig checks these)
REFUSED = {
    "rule": "secure aggregation reveals only the sum: the median and trimmed mean need each update",
    "lora": "secure aggregation needs a linear rule: FlexLoRA's exact mean re-factorises each product "
            "(use lora 'ffa': a frozen A makes the mean of B exact)",
}
