"""A federation's split-learning setup: where the model is cut, the DP at the cut, and its bounds."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Literal

from fleettune.shared import keys

Mode = Literal["two_part", "u_shaped"]
Returns = Literal["residual", "correction"]


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    # two_part: the server runs every layer from the cut, the head and the loss, so it sees the
    # labels (for a language model, the text itself, shifted by one token). u_shaped: the last
    # `top_layers`, the head and the loss stay on the device: neither inputs nor labels leave it.
    mode: Mode = "u_shaped"
    base_model: str = "tiny"  # what both sides load: 'tiny', 'smollm2' or a local HF directory
    cut: int = 1  # k: the device runs the embeddings and layers [0, k)
    top_layers: int = 1  # u_shaped: layers [L - top_layers, L) also run on the device
    clip: float = 100.0  # C: each example's activations are clipped to this L2 norm
    sigma: float = 0.0  # noise std on the activations = sigma * C
    delta: float = 1e-5  # for the accountant's epsilon
    # r: each token's activations are projected onto r fixed directions before the clip and the noise
    # (shared/split/bottleneck.py); 0 sends them whole (seq x hidden per example)
    bottleneck: int = 0
    # u_shaped, what the server's forward returns. residual: what its layers add to the residual
    # stream. correction: only what its LoRA changes in its layers' output; the device runs the frozen
    # base of those layers itself (forward only), so the noise never replaces what the base computes
    server_returns: Returns = "residual"
    # q: each device draws every one of its sequences into a step with this probability (Poisson), so
    # the server's accountant knows the sampling; None lets a device use batch / its sequences
    sample_rate: float | None = None
    # a device's steps stop (refused: privacy_budget_exhausted) before its epsilon would pass this
    max_epsilon: float | None = None
    max_batch: int = 32
    seq_len: int = 64
    server_lr: float = 1e-3
    publish_every: int = 50  # server steps between published versions of the server part
    pending_ttl_s: float = 60.0  # u_shaped: a forward whose backward never comes is dropped

    def __post_init__(self) -> None:
        if self.mode not in ("two_part", "u_shaped"):
            raise ValueError("mode must be two_part or u_shaped")
        if self.server_returns not in ("residual", "correction"):
            raise ValueError("server_returns must be residual or correction")
        if self.server_returns == "correction" and (self.mode != "u_shaped" or self.top_layers < 1):
            # the device trains only its top layers then (those below the cut stay frozen)
            raise ValueError("server_returns correction is U-shaped with top_layers >= 1: a two-part server "
                             "holds the head, and the device trains only its top layers")
        if not (self.cut >= 1 and self.top_layers >= 0 and self.clip > 0 and math.isfinite(self.clip)
                and self.sigma >= 0 and math.isfinite(self.sigma) and 0 < self.delta < 1
                and 1 <= self.max_batch <= 1024 and 2 <= self.seq_len <= 4096 and self.server_lr > 0
                and self.publish_every >= 1 and self.pending_ttl_s > 0 and 0 <= self.bottleneck <= 65536):
            raise ValueError(f"invalid split config: {self}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ValueError("sample_rate must be in (0, 1]")
        if self.max_epsilon is not None and not (self.max_epsilon > 0 and self.sample_rate is not None
                                                 and self.sigma > 0):
            raise ValueError("max_epsilon needs sigma > 0 and a sample_rate (the accountant needs both)")

    def width(self, hidden: int) -> int:
        """Features per token on the wire: the bottleneck's rank, or the model's hidden size."""
        return self.bottleneck or hidden

    def max_norm(self, hidden: int) -> float:
        """The largest norm an honest device's example can have: C plus the noise's norm, which
        exceeds sigma C (sqrt(d) + 6) with probability below 1e-8 (Gaussian concentration)."""
        dims = self.seq_len * self.width(hidden)
        return self.clip * (1.0 + 1e-4) + self.sigma * self.clip * (dims ** 0.5 + 6.0)

    def denoise_gain(self, hidden: int) -> float:
        """What the server scales received features by before lifting them (shared/split/bottleneck.py):
        the signal's power per coordinate is at most C^2 / d, the noise's sigma^2 C^2."""
        return 1.0 / (1.0 + self.sigma ** 2 * self.seq_len * self.width(hidden))

    def epsilon(self, steps: int) -> float:
        """The accountant's epsilon after `steps` steps at the configured sampling (needs sample_rate)."""
        from fleettune.shared.strategies import privacy

        if self.sigma == 0:
            return math.inf
        return privacy.epsilon(self.sigma, self.sample_rate, steps, self.delta)

    def server_layers(self, num_layers: int) -> range:
        top = num_layers - self.top_layers if self.mode == "u_shaped" else num_layers
        if not self.cut < top <= num_layers:
            raise ValueError(f"a split at {self.cut} with {self.top_layers} top layers leaves the server no layer "
                             f"of {num_layers}")
        return range(self.cut, top)

    def device_layers(self, num_layers: int) -> list[int]:
        server = self.server_layers(num_layers)
        return [i for i in range(num_layers) if i not in server]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> SplitConfig:
        return cls(**json.loads(raw))


def load(client, fed: str) -> SplitConfig | None:
    raw = client.get(keys.fed_split(fed))
    return SplitConfig.from_json(raw) if raw is not None else None


def save(client, fed: str, config: SplitConfig) -> None:
    client.set(keys.fed_split(fed), config.to_json())
