"""Per-device memory budget for local adapter training (the product spec's formula).

    total = quantized base + adapters (weights + gradients) + optimizer state
            + activations (batch x sequence) + OS/app overhead

- base: params x bits/8, plus for 4-bit NF4 one fp32 absmax per block of 64 weights;
- adapters: fp32 weights and gradients;  optimizer: AdamW's two fp32 moments per adapter weight;
- activations: per layer batch*seq*(34*hidden + 5*heads*seq) bytes at 16-bit (Korthikanti et al.,
  2022, without recomputation), scaled by act_bytes/2, plus fp32 logits and their gradient
  (batch*seq*vocab*8), which dominate for small models with large vocabularies;
- overhead: the interpreter, torch and tokenizer runtime.

The spec's worked example, a 1B-parameter model at 4 bits with rank-8 q/k/v/o adapters (batch 1,
sequence 256, 16-bit activations), comes to about 1.7 GB.
"""

from __future__ import annotations

import dataclasses

from fleettune.shared.protocol.adapter_spec import ModelDims

MB = 1_000_000


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    base: float
    adapters: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.base + self.adapters + self.optimizer + self.activations + self.overhead

    def as_mb(self) -> dict[str, float]:
        parts = dataclasses.asdict(self) | {"total": self.total}
        return {k: round(v / MB, 1) for k, v in parts.items()}


def estimate(num_params: float, adapter_params: float, dims: ModelDims, *, bits: int = 4, batch: int = 1,
             seq: int = 256, act_bytes: int = 2, overhead_mb: float = 400.0) -> MemoryEstimate:
    if bits not in (4, 8, 16, 32):
        raise ValueError(f"bits must be 4, 8, 16 or 32, got {bits}")
    if min(num_params, batch, seq, act_bytes) <= 0 or adapter_params < 0:
        raise ValueError("parameter counts, batch, sequence and activation bytes must be positive")
    quant_constants = num_params / 64 * 4 if bits == 4 else 0.0
    per_layer = batch * seq * (34 * dims.hidden + 5 * dims.heads * seq) * act_bytes / 2
    logits = batch * seq * dims.vocab * 4 * 2
    return MemoryEstimate(
        base=num_params * bits / 8 + quant_constants,
        adapters=adapter_params * 4 * 2,
        optimizer=adapter_params * 4 * 2,
        activations=per_layer * dims.layers + logits,
        overhead=overhead_mb * MB,
    )


def fits(estimate_: MemoryEstimate, ram_mb: float) -> bool:
    return estimate_.total <= ram_mb * MB
