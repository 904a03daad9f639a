"""`fleettune simulate`: drive rounds of synthetic devices through the real queue and store."""

from __future__ import annotations

import time

import click
from celery import Celery
from tqdm import tqdm

from shared import simulate as sim
from shared.federation import FederationConfig
from shared.runtime import Runtime
from workers.app import enqueuer


def simulate(app: Celery, runtime: Runtime, config: FederationConfig, num_devices: int, rounds: int,
             round_wait: float) -> None:
    state = runtime.state
    fleet = sim.devices(num_devices, config.seed)
    if state.config(config.name) is None:
        runtime.coordinator.start(config, [d.device for d in fleet])
    else:
        config = state.config(config.name)  # an existing federation keeps its own config
        state.enroll(config.name, [d.device for d in fleet])
    push = enqueuer(app)
    for _ in range(rounds):
        round_no = state.current_round(config.name)
        info = state.round_info(config.name, round_no)
        if state.status(config.name).get("status") != "active" or info is None or info.status != "open":
            click.echo(f"{config.name}: no open round (status {state.status(config.name)}); stopping")
            return
        started = time.monotonic()
        sent = sim.run_round(runtime.store, push, config.spec, config.name, round_no, info.base_version,
                             fleet, config.seed)
        for _ in tqdm(sent, total=len(fleet), desc=f"round {round_no}", unit="update", leave=False):
            pass
        done = state.wait_settled(config.name, round_no, round_wait)
        click.echo(f"round {round_no}: {done.status} -> version {done.version} "
                   f"in {time.monotonic() - started:.1f}s; stats {state.stats(config.name)}")
