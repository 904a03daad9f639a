"""A federation's aggregation choices: which rules turn a round's updates into the next adapter.

Four independent choices, each with its own validation:
  - `lora`: how LoRA factors combine: `naive` (mean of A and of B), `exact` (FlexLoRA: the mean of
    B·A, re-factorised), `ffa` (FFA-LoRA: A frozen from the server's seed, only B trains, travels
    and is averaged, which is exact);
  - `rule`: `mean` (weighted), `median` or `trimmed_mean` (coordinate-wise, unweighted);
  - `optimizer`: the server step on the pseudo-gradient: `sgd` (FedAvg), `avgm`, `adam`, `yogi`,
    `adagrad`; its learning rate is the round policy's `server_lr`;
  - central DP: `dp_noise_multiplier` > 0 adds Gaussian noise to the clipped sum;
  - `drift_control`: `scaffold` (Karimireddy et al. 2020) adds control variates against client drift.

The API's `"algorithm"` names a preset of these (ALGORITHMS); explicit fields override it. What
else an algorithm means (the server learning rate of its optimizer family, FedProx's proximal term
on the devices) is `choose`'s: the API's request schemas only translate fields.

Each closed set of names is declared here once, as a Literal, and the API's schemas import it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple, get_args

from pydantic import ConfigDict, with_config

from fleettune.shared.errors import ConfigError
from fleettune.shared.secagg.config import REFUSED as SECAGG_REFUSED, SecureAggregation
from fleettune.shared.strategies.server_optimizers import ADAPTIVE, OPTIMIZERS, ServerOptimizer

LoraMode = Literal["naive", "exact", "ffa"]
Rule = Literal["mean", "median", "trimmed_mean"]
DriftControl = Literal["none", "scaffold"]
Algorithm = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold", "flexlora",
                    "ffa_lora", "median", "trimmed_mean", "dp_fedavg"]
LORA_MODES: tuple[LoraMode, ...] = get_args(LoraMode)
RULES: tuple[Rule, ...] = get_args(Rule)
DRIFT_CONTROLS: tuple[DriftControl, ...] = get_args(DriftControl)

# "algorithm" presets: the aggregation fields each sets. Adaptive optimizers default to the server
# learning rate that works for LoRA in the literature (FedAdam η 1e-3..1e-2).
ALGORITHMS: dict[Algorithm, dict[str, Any]] = {
    "fedavg": {},
    "fedavgm": {"optimizer": "avgm"},
    "fedadam": {"optimizer": "adam"},
    "fedyogi": {"optimizer": "yogi"},
    "fedadagrad": {"optimizer": "adagrad"},
    "fedprox": {},  # FedAvg on the server; the device adds the proximal term (LocalTraining.proximal_mu)
    "scaffold": {"drift_control": "scaffold"},
    "flexlora": {"lora": "exact"},
    "ffa_lora": {"lora": "ffa"},
    "median": {"rule": "median"},
    "trimmed_mean": {"rule": "trimmed_mean"},
    "dp_fedavg": {"dp_noise_multiplier": 1.0},
}
assert tuple(ALGORITHMS) == get_args(Algorithm), "every algorithm has a preset, in the order the API lists them"
ADAPTIVE_SERVER_LR = 1e-2
CONTROL_PREFIX = "scaffold."  # SCAFFOLD updates also carry Δc_i, each tensor under this prefix
FEDPROX_MU = 0.01


# a stored federation config refuses keys no field takes (FederationConfig.from_json)
@with_config(ConfigDict(extra="forbid"))
@dataclasses.dataclass(frozen=True)
class AggregationConfig:
    algorithm: Algorithm = "fedavg"  # the preset it came from, for display
    lora: LoraMode = "naive"
    rule: Rule = "mean"
    trim: int = 1  # trimmed_mean: values dropped at each end, per coordinate (needs n > 2·trim)
    optimizer: ServerOptimizer = "sgd"
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    bias_correction: bool = False  # adam only: Kingma & Ba's correction of m and v (Reddi et al. omit it)
    max_weight_ratio: float = 2.0  # a device weighs at most this x the median claimed sample count
    working_rank_factor: int = 2  # exact: rank kept while streaming, as a multiple of the published rank
    max_robust_updates: int = 1000  # median/trimmed mean hold every update: the most they take
    dp_noise_multiplier: float = 0.0  # z; the noise std on the sum is z x the clip bound
    dp_delta: float = 1e-5
    dp_max_epsilon: float | None = None  # the federation completes before a round would exceed it
    sampling_rate: float = 1.0  # Poisson sampling of each round's cohort (q)
    drift_control: DriftControl = "none"  # "scaffold": server and device control variates correct client drift
    incremental: bool = True  # fold linear rules into partial sums as updates arrive (see `folds`)
    secure_aggregation: SecureAggregation | None = None  # SecAgg+: the server sees only the cohort's sum

    def __post_init__(self) -> None:
        checks = {
            f"algorithm must be one of {sorted(ALGORITHMS)}": self.algorithm in ALGORITHMS,
            f"lora must be one of {LORA_MODES}": self.lora in LORA_MODES,
            f"rule must be one of {RULES}": self.rule in RULES,
            f"optimizer must be one of {OPTIMIZERS}": self.optimizer in OPTIMIZERS,
            "trim must be >= 1": self.trim >= 1,
            "beta1 must be in [0, 1)": 0 <= self.beta1 < 1,
            "beta2 must be in [0, 1)": 0 <= self.beta2 < 1,
            "tau must be > 0": self.tau > 0,
            "max_weight_ratio must be >= 1": self.max_weight_ratio >= 1 and math.isfinite(self.max_weight_ratio),
            "working_rank_factor must be >= 1": self.working_rank_factor >= 1,
            "max_robust_updates must be >= 3": self.max_robust_updates >= 3,
            "dp_noise_multiplier must be >= 0": self.dp_noise_multiplier >= 0 and math.isfinite(self.dp_noise_multiplier),
            "dp_delta must be in (0, 1)": 0 < self.dp_delta < 1,
            "dp_max_epsilon must be > 0": self.dp_max_epsilon is None or self.dp_max_epsilon > 0,
            "sampling_rate must be in (0, 1]": 0 < self.sampling_rate <= 1,
            # the median and trimmed mean are not linear: there is no exact way to combine them
            # with a re-factorisation or with noise calibrated to a sum's sensitivity
            "median and trimmed_mean combine only with lora 'naive' or 'ffa', without DP":
                self.rule == "mean" or (self.lora != "exact" and not self.dp),
            # clipping bounds each device's factor deltas, not its product B·A: the exact mean
            # has no sensitivity the noise could be calibrated to
            "DP needs lora 'naive' or 'ffa'": not self.dp or self.lora != "exact",
            # the exact mean is a dense matrix re-factorised each round: there is no per-parameter
            # pseudo-gradient for a momentum or an adaptive step to act on
            "lora 'exact' takes the sgd server optimizer only (use ffa for adaptive ones)":
                self.lora != "exact" or self.optimizer == "sgd",
            "dp_max_epsilon needs dp_noise_multiplier > 0": self.dp_max_epsilon is None or self.dp,
            "drift_control must be 'none' or 'scaffold'": self.drift_control in DRIFT_CONTROLS,
            # the control variate is a mean of device gradients: it is linear (mean rule only),
            # lives in factor space (not with exact), and DP's noise does not cover it
            "scaffold needs the mean rule, lora 'naive' or 'ffa' and no DP":
                self.drift_control == "none" or (self.rule == "mean" and self.lora != "exact" and not self.dp),
            SECAGG_REFUSED["rule"]: self.secure_aggregation is None or self.rule == "mean",
            SECAGG_REFUSED["lora"]: self.secure_aggregation is None or self.lora != "exact",
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ConfigError("; ".join(failed))

    @property
    def dp(self) -> bool:
        return self.dp_noise_multiplier > 0

    @property
    def folds(self) -> bool:
        """Whether a round's updates are folded into partial sums as they arrive, so the close
        reduces a handful of partials instead of reading every update. Only the linear rules: the
        weighted mean of factors (naive, FFA), with any server optimizer, central DP's sum and
        SCAFFOLD's mean. The median, trimmed mean and the exact (re-factorised) mean are not
        linear and keep the streaming close."""
        return self.incremental and self.rule == "mean" and self.lora != "exact" and self.secure_aggregation is None

    @property
    def adaptive(self) -> bool:
        return self.optimizer in ADAPTIVE

    @classmethod
    def preset(cls, algorithm: str, **overrides: Any) -> AggregationConfig:
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {algorithm!r}; known: {sorted(ALGORITHMS)}")
        return cls(algorithm=algorithm, **{**ALGORITHMS[algorithm], **overrides})


def server_lr(aggregation: AggregationConfig) -> float:
    """The server learning rate a federation starts with under this aggregation's optimizer family."""
    return ADAPTIVE_SERVER_LR if aggregation.adaptive else 1.0


class Choice(NamedTuple):
    """An aggregation, and the fields of the round policy and of the devices' training strategy
    that come with it: defaults, which fields a request sets itself override."""

    aggregation: AggregationConfig
    policy: dict[str, Any]
    training: dict[str, Any]


def choose(current: AggregationConfig, algorithm: str | None = None, **overrides: Any) -> Choice:
    """What an algorithm and explicit aggregation fields make of the `current` aggregation.

    A new algorithm starts from its preset; `overrides` replace fields of it (or of `current`). A
    move between plain and adaptive server optimizers moves the server learning rate to the new
    family's default; FedProx turns on the devices' proximal term (FEDPROX_MU)."""
    if algorithm is not None and algorithm != current.algorithm:
        aggregation = AggregationConfig.preset(algorithm, **overrides)
    else:
        aggregation = dataclasses.replace(current, **overrides)
    policy = {"server_lr": server_lr(aggregation)} if aggregation.adaptive != current.adaptive else {}
    training = {"proximal_mu": FEDPROX_MU} if algorithm == "fedprox" else {}
    return Choice(aggregation, policy, training)
