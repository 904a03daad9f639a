"""Aggregation strategies: how a round's accepted updates become the next global adapter.

Each rule is a pure function or a small object with serialisable state, and the round close
(`shared.pipeline.rounds`) only orchestrates them:

    config.py             AggregationConfig: the federation's choice of rules and their knobs
    fedavg.py             update norms, the whole-update clip, and the streaming weighted mean
    partial.py            per-update weights no single device can dominate, and partial sums
    exact_lora.py         FlexLoRA: the exact weighted mean of B·A, streamed and re-factorised
    robust.py             coordinate-wise median and trimmed mean
    server_optimizers.py  FedAvgM, FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021)
    privacy.py            central DP-FedAvg: Gaussian noise on the clipped sum, and its accountant
    combine.py            one round's aggregation, from (update, weight) pairs to new weights
"""
