"""Aggregation throughput of each rule against plain FedAvg, measured in one run.

    python bench/aggregation_rules.py [--updates 16] [--repeats 3] [--layout llama-1b]

Every rule runs the round close's own combiner (shared/strategies/combine.py) over the same parsed
updates of a 1B-class rank-8 q/k/v/o adapter, then its server step: one pass per rule, best of
`--repeats`. Updates/s is per rule; the ratio is against FedAvg's (higher is faster). FFA-LoRA
carries B only, so it moves half the bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig, build_spec, initial_weights  # noqa: E402
from fleettune.shared.strategies.combine import RoundAggregator  # noqa: E402
from fleettune.shared.strategies.config import AggregationConfig  # noqa: E402

RULES = {
    "fedavg": AggregationConfig(),
    "fedavgm": AggregationConfig.preset("fedavgm"),
    "fedadam": AggregationConfig.preset("fedadam"),
    "flexlora (exact)": AggregationConfig.preset("flexlora"),
    "ffa_lora (B only)": AggregationConfig.preset("ffa_lora"),
    "median": AggregationConfig.preset("median"),
    "trimmed_mean (k=1)": AggregationConfig.preset("trimmed_mean"),
    "dp_fedavg": AggregationConfig.preset("dp_fedavg"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layout", default="llama-1b", choices=sorted(LAYOUTS))
    args = parser.parse_args()
    torch.set_num_threads(1)

    spec = build_spec(LAYOUTS[args.layout], AdapterConfig(rank=8))
    base = initial_weights(spec, 0)
    rng = np.random.default_rng(0)
    updates = [{k: torch.from_numpy(rng.standard_normal(s, dtype=np.float32) * 1e-3) for k, s in spec.tensors.items()}
               for _ in range(args.updates)]
    b_only = {k: s for k, s in spec.tensors.items() if not k.endswith("lora_A.weight")}
    print(f"{args.layout} rank-8 q/k/v/o adapter, {spec.num_parameters * 4 / 1e6:.1f} MB per update, "
          f"{args.updates} updates, best of {args.repeats}")

    results = {}
    for name, agg in RULES.items():
        shapes = b_only if agg.lora == "ffa" else spec.tensors
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            combiner = RoundAggregator(agg, base, shapes, 8)
            for u in updates:
                combiner.add({k: u[k] for k in shapes}, 100.0, 0.5)
            combiner.finish(1e-2 if agg.adaptive else 1.0, {}, clip_bound=1.0, noise_seed=1)
            best = min(best, time.perf_counter() - started)
        results[name] = args.updates / best
    for name, rate in results.items():
        print(f"{name:20s} {rate:8.1f} updates/s   {rate / results['fedavg']:.2f}x FedAvg")


if __name__ == "__main__":
    main()
