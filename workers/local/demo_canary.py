"""`fleettune demo --canary`: a good and a bad version through canary rollouts, on embedded defaults.

Trainers federate two rounds of real LoRA training (the good version); a third round comes from a
broken client build whose devices train on shuffled tokens (the bad version). Then a fleet of
serving devices checks in through the gateway, measures whatever version it is told to serve on
its own held-out text, and reports. The good version advances step by step to 100 %; the bad one
is refused by the server's evaluation gate, and when an operator overrides that gate, the devices'
reports roll it back.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from fleettune.shared import corpora
from fleettune.shared.protocol.adapter_spec import ModelDims
from fleettune.shared.device import models, trainer
from fleettune.shared.device.client import Device
from fleettune.shared.device.fleet import FleetSpec, build_fleet
from fleettune.shared.device.serving import ServingFleet
from fleettune import DeviceClient, Federation, FleettuneAPIError
from fleettune.shared.settings import Settings
from fleettune.workers.local.demo import DEVICE_RAM_MB, DEVICE_STORAGE_MB, demo_config, fresh_out_dir
from fleettune.workers.local.harness import embedded, enroll, gateway, run_rounds, wait_evaluation, wait_round

GATES = {"min_reports": 5}  # the rest at their defaults: margins 0.05 nats, alpha 0.05 over 20 looks


def run_canary_demo(settings: Settings, trainers: int = 6, users: int = 120,
                    out_dir: str | Path = "fleettune-demo") -> None:
    torch.set_num_threads(1)
    out = fresh_out_dir(out_dir)
    started = time.monotonic()
    tokenizer, base = models.load_tokenizer("tiny"), models.load_model("tiny")
    dims = ModelDims.from_hf_config(base.config)
    config = demo_config(f"canary-{int(time.time())}", "tiny", dims, "lora", 3, trainers, 0, 12_000, corpora.DOMAINS)
    model = trainer.peft_model(base, config.adapter)
    fleet = [d for d, _ in build_fleet(FleetSpec.spread(trainers, 24_000), config, model, tokenizer,
                                       ram_mb=DEVICE_RAM_MB, storage_mb=DEVICE_STORAGE_MB)]
    with embedded(settings, out) as (app, runtime, _), gateway(app, runtime) as (url, admin_key):
        runtime.state.federations.create(config, status="idle")
        clients = enroll(url, admin_key, config.name, fleet)
        runtime.coordinator.begin_training(config.name, 3)
        admin = Federation(admin_key, config.name, url)
        base_ppl = runtime.evaluator(config).base["heldout_mean"]
        click.echo(f"fleettune demo --canary: {trainers} trainers federate LoRA on the tiny model; base held-out "
                   f"perplexity {base_ppl:.2f}")
        for row in run_rounds(app, runtime, config, fleet, clients, 2, progress=False):
            click.echo(f"  round {row.round}: version {row.round} held-out perplexity {row.heldout_ppl:.2f}")
        broken = [Device(d.device_id, config, model, _shuffled(d.data, i), config.training, ram_mb=d.ram_mb,
                         storage_mb=d.storage_mb, tier=d.tier) for i, d in enumerate(fleet)]
        for device in broken:  # a client build that scrambles token order ships to every trainer
            device.run_round(clients[device.device_id], seed=3)
        wait_round(app, runtime, config.name, 3, 300)
        bad_ppl = wait_evaluation(runtime, config.name, 3, 300)["heldout_mean"]
        click.echo(f"  round 3 (broken client build, shuffled tokens): version 3 held-out perplexity {bad_ppl:.2f}\n")

        serving = _serving_fleet(admin, url, config.name, model, tokenizer, users)
        click.echo(f"{users} serving devices check in, evaluate what they are told to serve on their own held-out "
                   "text, and report its loss")
        _canary(admin, serving, 2, "the good version", GATES)
        try:
            admin.rollout(3, start_percent=20, step_percent=30, min_step_seconds=0, gates=GATES, start=True)
        except FleettuneAPIError as refused:
            click.echo(f"\nversion 3: {refused.status} {refused.code}: {refused.detail}")
            admin.rollout_action(admin.rollouts()[0]["id"], "rollback", reason="server gate failed")
            click.echo("an operator overrides the server's gate; the devices' gate still holds")
        _canary(admin, serving, 3, "the bad version", dict(GATES, max_perplexity_ratio=100, max_forgetting_ratio=100))
        click.echo(f"\nserving version now: {admin.serving()['serving']}; done in {time.monotonic() - started:.0f}s")


def _shuffled(data: torch.Tensor, seed: int) -> torch.Tensor:
    flat = data.flatten()
    return flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))].view_as(data)


def _serving_fleet(admin: Federation, url: str, fed: str, model, tokenizer, users: int) -> ServingFleet:
    """Users whose local held-out text mixes the three domains (one block of each, none shared)."""
    blocks = {d: trainer.blocks(tokenizer(corpora.heldout_text(d, 60_000))["input_ids"], 64) for d in corpora.DOMAINS}
    clients, texts = {}, {}
    for i in range(users):
        device = f"user-{i:03d}"
        clients[device] = DeviceClient(admin.register_device(device, DEVICE_RAM_MB, DEVICE_STORAGE_MB), fed, url)
        texts[device] = torch.stack([b[i % len(b)] for b in blocks.values()])
    return ServingFleet(model, clients, texts)


def _canary(admin: Federation, serving: ServingFleet, version: int, label: str, gates: dict) -> None:
    rec = admin.rollout(version, start_percent=20, step_percent=30, min_step_seconds=0, gates=gates, start=True)
    click.echo(f"\nrollout {rec['id']} of version {version} ({label}) from version {rec['previous']}: "
               f"{rec['status']} at {rec['percent']:.0f}%")

    def changed(out: dict, check_ins: int) -> None:
        click.echo(f"  after {check_ins:>4} check-ins: {out['rollout_status']:<11} {out['percent']:5.1f}%")

    serving.check_ins = 0
    try:
        serving.until_settled(on_change=changed)
    except TimeoutError as stuck:
        click.echo(f"  {stuck}: {admin.get_rollout(rec['id'])['comparisons']}")
        raise
    rec = admin.get_rollout(rec["id"])
    arms = rec["arms"]
    click.echo(f"  mean reported loss: canary {arms['canary'].get('eval_loss', float('nan')):.3f} "
               f"(n={arms['canary']['devices']}), control {arms['control'].get('eval_loss', float('nan')):.3f} "
               f"(n={arms['control']['devices']})")
    last = rec["history"][-1]
    click.echo(f"  {last['action']} by {last['by']}: {last['reason']}")
