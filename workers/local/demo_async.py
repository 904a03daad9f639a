"""`fleettune demo --async`: buffered asynchronous rounds (FedBuff) on embedded defaults.

Devices whose speeds differ tenfold train real LoRA updates on a simulated clock
(workers/local/paced.py): each checks in, trains from the newest version, sends and checks in
again; the server publishes every `buffer` accepted updates, weighting each by its staleness.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click
import numpy as np
import torch

from fleettune.shared import corpora
from fleettune.shared.device import models, trainer
from fleettune.shared.device.fleet import FleetSpec, build_fleet
from fleettune.shared.federation import RoundPolicy
from fleettune.shared.protocol.adapter_spec import ModelDims
from fleettune.shared.settings import Settings
from fleettune.workers.local import paced
from fleettune.workers.local.demo import DEVICE_RAM_MB, DEVICE_STORAGE_MB, SIZES, demo_config, fresh_out_dir
from fleettune.workers.local.harness import embedded, enroll, gateway


def run_async_demo(settings: Settings, num_devices: int = 8, rounds: int = 3, buffer: int = 4,
                   out_dir: str | Path = "fleettune-demo", domains: tuple[str, ...] = corpora.DOMAINS) -> None:
    torch.set_num_threads(1)
    out = fresh_out_dir(out_dir)
    started = time.monotonic()
    tokenizer, base = models.load_tokenizer("tiny"), models.load_model("tiny")
    device_chars, eval_chars = SIZES["tiny"]
    config = demo_config(f"demo-async-{int(time.time())}", "tiny", ModelDims.from_hf_config(base.config), "lora",
                         10**5, num_devices, 0, eval_chars, domains)
    config = dataclasses.replace(config, policy=RoundPolicy(
        mode="async", buffer_size=buffer, min_updates=1, max_staleness=20, timeout_seconds=3600, max_rounds=10**5,
        max_update_norm=5.0), training=dataclasses.replace(config.training, max_steps=8))
    model = trainer.peft_model(base, config.adapter)
    fleet = [d for d, _ in build_fleet(FleetSpec.spread(num_devices, device_chars, domains=domains), config, model,
                                       tokenizer, ram_mb=DEVICE_RAM_MB, storage_mb=DEVICE_STORAGE_MB)]
    seconds = paced.device_seconds(num_devices, spread=10.0)
    budget = num_devices * rounds
    click.echo(f"fleettune demo --async: {num_devices} devices train LoRA r=8 of tiny, {budget} updates in all; "
               f"seconds per update (simulated) {np.round(np.sort(seconds)).astype(int).tolist()}; "
               f"a version every {buffer} accepted updates, weighted (1 + staleness)^-0.5")
    with embedded(settings, out) as (app, runtime, _), gateway(app, runtime) as (url, admin_key):
        runtime.state.federations.create(config, status="idle")
        clients = enroll(url, admin_key, config.name, fleet)
        runtime.coordinator.begin_training(config.name, config.policy.max_rounds)
        base_ppl = runtime.evaluator(config).base["heldout_mean"]
        click.echo(f"{'version':>7} {'sim s':>7} {'updates':>7} {'mean staleness':>14} {'held-out ppl':>12}")
        click.echo(f"{0:>7} {0:>7} {0:>7} {'':>14} {base_ppl:>12.2f}")
        points = []
        for p in paced.run_async(app, runtime, config, fleet, clients, seconds, budget):
            points.append(p)
            click.echo(f"{p.version:>7} {p.clock:>7.0f} {p.contributors:>7} {p.stale:>14.2f} {p.heldout_ppl:>12.2f}")
        stats = runtime.state.federations.stats(config.name)
    last = points[-1]
    click.echo(f"counters: {stats}")
    click.echo(f"async rounds: {len(points)} versions from {last.updates} updates in {last.clock:,.0f} simulated s; "
               f"held-out perplexity {last.heldout_ppl:.2f} (base {base_ppl:.2f}); done in "
               f"{time.monotonic() - started:.0f}s")
