"""The options that define a federation on the command line, and the config they build."""

from __future__ import annotations

import click

from fleettune.shared.federation import DeviceFilter, EvaluationConfig, FederationConfig, RoundPolicy, LocalTraining
from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig


def federation_config(name: str, layout: str, kind: str, rank: int, alpha: int, targets: str, virtual_tokens: int,
            min_updates: int, timeout: float, min_samples: int, max_rounds: int, max_update_norm: float,
            server_lr: float, max_num_samples: int, seed: int, learning_rate: float, local_epochs: int,
            batch_size: int, weight_decay: float, min_ram_mb: int, min_storage_mb: int,
            evaluate_with: str | None) -> FederationConfig:
    return FederationConfig(
        name=name, model=LAYOUTS[layout], base_model=evaluate_with or layout, seed=seed,
        training=LocalTraining(learning_rate=learning_rate, local_epochs=local_epochs, batch_size=batch_size,
                                  weight_decay=weight_decay),
        device_filter=DeviceFilter(min_ram_mb=min_ram_mb, min_storage_mb=min_storage_mb),
        evaluation=EvaluationConfig(base_model=evaluate_with) if evaluate_with else None,
        adapter=AdapterConfig(kind=kind, rank=rank, alpha=alpha, num_virtual_tokens=virtual_tokens,
                              target_modules=tuple(t.strip() for t in targets.split(",") if t.strip())),
        policy=RoundPolicy(min_updates=min_updates, timeout_seconds=timeout, min_samples_per_client=min_samples,
                           max_rounds=max_rounds, max_update_norm=max_update_norm if max_update_norm > 0 else None,
                           server_lr=server_lr, max_num_samples=max_num_samples),
    )


def federation_options(fn):
    """The options that define a federation, shared by `bootstrap federation create`, `simulate` and `demo`."""
    options = [
        click.option("--layout", type=click.Choice(sorted(LAYOUTS)), default="tiny-llama", show_default=True),
        click.option("--kind", type=click.Choice(["lora", "qlora", "prompt_tuning"]), default="lora", show_default=True),
        click.option("--rank", default=8, show_default=True),
        click.option("--alpha", default=16, show_default=True),
        click.option("--targets", default="q_proj,k_proj,v_proj,o_proj", show_default=True),
        click.option("--virtual-tokens", default=16, show_default=True),
        click.option("--min-updates", default=2, show_default=True, help="quorum per round"),
        click.option("--timeout", default=600.0, show_default=True, help="round deadline in seconds"),
        click.option("--min-samples", default=1, show_default=True, help="min_samples_per_client"),
        click.option("--max-rounds", default=10, show_default=True),
        click.option("--max-update-norm", "--max-grad-norm", "max_update_norm", default=1.0, show_default=True,
                     help="the server's L2 clip of a whole update; 0 disables (--max-grad-norm: its old name)"),
        click.option("--server-lr", default=1.0, show_default=True),
        click.option("--max-num-samples", default=100_000, show_default=True, help="cap on a device's claim"),
        click.option("--seed", default=0, show_default=True),
        click.option("--learning-rate", default=3e-3, show_default=True, help="devices' local learning rate"),
        click.option("--local-epochs", default=1, show_default=True),
        click.option("--batch-size", default=8, show_default=True),
        click.option("--weight-decay", default=0.0, show_default=True),
        click.option("--min-ram-mb", default=0, show_default=True, help="device filter"),
        click.option("--min-storage-mb", default=0, show_default=True, help="device filter"),
        click.option("--evaluate-with", default=None,
                     help="evaluate each version on this base model ('tiny', 'smollm2' or a directory)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def federation_kwargs(kw: dict) -> dict:
    names = ("layout", "kind", "rank", "alpha", "targets", "virtual_tokens", "min_updates", "timeout",
             "min_samples", "max_rounds", "max_update_norm", "server_lr", "max_num_samples", "seed",
             "learning_rate", "local_epochs", "batch_size", "weight_decay", "min_ram_mb", "min_storage_mb",
             "evaluate_with")
    return {n: kw.pop(n) for n in names}
