"""A federation's split-learning setup: where the model is cut, the DP at the cut, and its bounds."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Literal

from fleettune.shared import keys

Mode = Literal["two_part", "u_shaped"]


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
    max_batch: int = 32
    seq_len: int = 64
    server_lr: float = 1e-3
    publish_every: int = 50  # server steps between published versions of the server part
    pending_ttl_s: float = 60.0  # u_shaped: a forward whose backward never comes is dropped

    def __post_init__(self) -> None:
        if self.mode not in ("two_part", "u_shaped"):
            raise ValueError("mode must be two_part or u_shaped")
        if not (self.cut >= 1 and self.top_layers >= 0 and self.clip > 0 and math.isfinite(self.clip)
                and self.sigma >= 0 and math.isfinite(self.sigma) and 0 < self.delta < 1
                and 1 <= self.max_batch <= 1024 and 2 <= self.seq_len <= 4096 and self.server_lr > 0
                and self.publish_every >= 1 and self.pending_ttl_s > 0):
            raise ValueError(f"invalid split config: {self}")

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
