"""The arithmetic of canary rollouts: sticky bucketing and the statistical gates, as pure functions.

Bucketing: a device's bucket is sha256(rollout id, device id) read as a number in [0, 100). A
device serves the candidate while its bucket is below the rollout's percentage, so assignment is
deterministic, the same at every check-in, and raising the percentage only ever moves devices from
control to canary. A new rollout id reshuffles, so one rollout's canaries are not always the next's.

Gates: each device counts once, with its latest report per version, so one chatty (or hostile)
device is one sample, and reports from one device being correlated does not matter. Canary and
control are compared per metric by Welch's t-test on per-device values (the arms differ in size
and spread) against a configured margin, in both directions:
    - inferiority (H0: the canary is worse by at most the margin): rejected -> roll back;
    - non-inferiority (H0: it is worse by the margin or more): rejected for every metric -> the
      step may advance. Absence of evidence of harm is not enough to move on.
Otherwise the rollout stays where it is and collects reports. The gate is looked at repeatedly
as reports arrive, so each look tests at alpha / max_looks (Bonferroni): over up to max_looks
looks, the chance of rolling back a version within its margins, or of advancing one outside
them, each stays below alpha.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence

from scipy import stats

BUCKETS = 10_000  # percentages are honoured to 0.01 %


def bucket(rollout_id: str, device: str) -> float:
    """The device's position in [0, 100) for this rollout."""
    digest = hashlib.sha256(f"{rollout_id}\x00{device}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") % BUCKETS) * 100 / BUCKETS


def in_canary(rollout_id: str, device: str, percent: float) -> bool:
    return bucket(rollout_id, device) < percent


@dataclasses.dataclass(frozen=True)
class Gates:
    """When a rollout may start, advance, and when it rolls back by itself."""

    # the server's own evaluation, before a rollout starts
    max_perplexity_ratio: float = 1.05  # candidate held-out perplexity / the serving version's
    max_forgetting_ratio: float = 1.25  # general-text perplexity over the base model's
    # device reports, canary against control, at every step
    max_loss_increase: float = 0.05  # nats of mean evaluation loss
    max_error_rate_increase: float = 0.02
    max_acceptance_drop: float = 0.05
    min_reports: int = 10  # per arm, before any comparison; per step, before an advance
    alpha: float = 0.05  # family-wise, over all looks of one rollout
    max_looks: int = 20

    def __post_init__(self) -> None:
        if not (0 < self.alpha < 1 and self.max_looks >= 1 and self.min_reports >= 2
                and self.max_perplexity_ratio >= 1 and self.max_forgetting_ratio >= 1
                and min(self.max_loss_increase, self.max_error_rate_increase, self.max_acceptance_drop) >= 0):
            raise ValueError(f"invalid gates: {self}")

    @property
    def alpha_per_look(self) -> float:
        return self.alpha / self.max_looks


@dataclasses.dataclass(frozen=True)
class Comparison:
    metric: str
    canary: int  # devices reporting it
    control: int
    canary_mean: float
    control_mean: float
    margin: float
    p_worse: float  # evidence that the canary is worse than control by more than the margin
    p_within: float  # evidence that it is not (non-inferiority)
    breached: bool  # p_worse < the look's alpha: roll back
    within: bool  # p_within < the look's alpha: this metric lets the rollout advance

    def describe(self) -> str:
        return (f"{self.metric}: canary {self.canary_mean:.4g} (n={self.canary}) vs control {self.control_mean:.4g} "
                f"(n={self.control}), margin {self.margin:g}, p(worse)={self.p_worse:.2g}, "
                f"p(within)={self.p_within:.2g}")


def compare(canary: Sequence[float], control: Sequence[float], margin: float, alpha: float, metric: str,
            higher_is_worse: bool = True) -> Comparison:
    """Welch's t-tests of the canary's excess over control (in the metric's bad direction) against
    the margin, both ways: greater (inferior: roll back) and less (non-inferior: may advance)."""
    sign = 1.0 if higher_is_worse else -1.0
    a = [sign * x - margin for x in canary]
    b = [sign * x for x in control]
    p_worse = float(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)
    p_within = float(stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue)
    if math.isnan(p_worse):  # no spread in either arm: the difference is exact
        excess = sum(a) / len(a) - sum(b) / len(b)
        p_worse, p_within = (0.0, 1.0) if excess > 0 else (1.0, 0.0)
    return Comparison(metric, len(canary), len(control), sum(canary) / len(canary), sum(control) / len(control),
                      margin, p_worse, p_within, p_worse < alpha, p_within < alpha)


METRICS = (("eval_loss", "max_loss_increase", True), ("error_rate", "max_error_rate_increase", True),
           ("acceptance_rate", "max_acceptance_drop", False))


def compare_arms(canary: Sequence[Mapping[str, float]], control: Sequence[Mapping[str, float]],
                 gates: Gates) -> list[Comparison]:
    """One comparison per metric that both arms report from at least min_reports devices."""
    out = []
    for metric, margin_field, higher_is_worse in METRICS:
        a = [r[metric] for r in canary if r.get(metric) is not None]
        b = [r[metric] for r in control if r.get(metric) is not None]
        if len(a) >= gates.min_reports and len(b) >= gates.min_reports:
            out.append(compare(a, b, getattr(gates, margin_field), gates.alpha_per_look, metric, higher_is_worse))
    return out


def summary(reports: Sequence[Mapping[str, float]]) -> dict:
    """Per-arm means for metrics and dashboards."""
    out: dict = {"devices": len(reports)}
    for metric, _, _ in METRICS:
        values = [r[metric] for r in reports if r.get(metric) is not None]
        if values:
            out[metric] = sum(values) / len(values)
    return out


def server_gate(candidate: Mapping | None, serving: Mapping | None, gates: Gates) -> str | None:
    """Why the server's evaluation of the candidate keeps a rollout from starting, or None."""
    if candidate is None:
        return "the version has no server evaluation yet"
    if serving is not None:
        ratio = candidate["heldout_mean"] / serving["heldout_mean"]
        if ratio > gates.max_perplexity_ratio:
            return (f"held-out perplexity {candidate['heldout_mean']:.3f} is {ratio:.3f}x the serving version's "
                    f"{serving['heldout_mean']:.3f} (at most {gates.max_perplexity_ratio}x)")
    forgetting = candidate.get("forgetting_ratio")
    if forgetting is not None and forgetting > gates.max_forgetting_ratio:
        return f"forgetting ratio {forgetting:.3f} > {gates.max_forgetting_ratio}"
    return None
