"""`fleettune simulate`: synthetic devices drive rounds through the API and the device gateway.

It is a client like any other: an admin key to set the federation up and register the devices,
then each device holds only its own token.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import click
import httpx
from tqdm import tqdm

from fleettune.shared.device import synthetic as sim
from fleettune.shared.federation import FederationConfig
from fleettune import DeviceClient, Federation, FleettuneAPIError
from fleettune.http import Client


def federation_body(config: FederationConfig, layout: str) -> dict:
    """The POST /federations body for a config built from the CLI's federation options."""
    adapter = dataclasses.asdict(config.adapter)
    kind = adapter.pop("kind")
    adapter = ({"type": kind, "num_virtual_tokens": adapter["num_virtual_tokens"]} if kind == "prompt_tuning" else
               {"type": kind, "rank": adapter["rank"], "alpha": adapter["alpha"], "dropout": adapter["dropout"],
                "target_modules": list(adapter["target_modules"])})
    policy, training = config.policy, config.training
    return {"name": config.name, "model_id": layout, "seed": config.seed, "adapter": adapter, "strategy": {
        "algorithm": "fedavg", "learning_rate": training.learning_rate, "local_epochs": training.local_epochs,
        "batch_size": training.batch_size, "weight_decay": training.weight_decay,
        "round_config": {"min_clients": policy.min_updates, "timeout_seconds": policy.timeout_seconds,
                         "min_samples_per_client": policy.min_samples_per_client, "max_rounds": policy.max_rounds,
                         "max_update_norm": policy.max_update_norm, "server_lr": policy.server_lr,
                         "max_num_samples": policy.max_num_samples},
        "device_filter": {"min_ram_mb": config.device_filter.min_ram_mb,
                          "min_storage_mb": config.device_filter.min_storage_mb}}}


def simulate(url: str | None, api_key: str | None, config: FederationConfig, layout: str, num_devices: int,
             rounds: int, round_wait: float, concurrency: int = 8) -> None:
    federation = Federation(api_key, config.name, url)
    try:
        federation.get()
    except FleettuneAPIError as err:
        if err.status != 404:
            raise
        federation.client.post("/api/v1/federations", federation_body(config, layout))
    fleet = sim.devices(num_devices, config.seed)
    tokens = [federation.register_device(d.device) for d in fleet]
    base_url = federation.client.base_url
    # every simulated device uses the same two connection pools: 10,000 devices must not hold
    # 20,000 sockets, nor build an SSL context each
    limits = httpx.Limits(max_connections=2 * concurrency)
    api_pool, store_pool = (httpx.HTTPTransport(retries=3, limits=limits) for _ in range(2))

    def send(i: int) -> dict:
        client = DeviceClient(tokens[i], config.name, client=Client(tokens[i], base_url, transport=api_pool,
                                                                    plain_transport=store_pool))
        return sim.send_update(client, spec, config.seed, i, fleet[i])

    session = federation.train(model=layout, rounds=rounds, min_updates=config.policy.min_updates)
    spec = config.spec
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(rounds):
            body = session.refresh()
            if body["status"] not in ("active", "aggregating") or body["round_status"] != "open":
                click.echo(f"{config.name}: session {session.id} is {body['status']}; stopping")
                break
            round_no, started = body["current_round"], time.monotonic()
            sends = pool.map(send, range(len(fleet)))
            for _ in tqdm(sends, total=len(fleet), desc=f"round {round_no}", unit="update", leave=False):
                pass
            done = wait_round(federation, round_no, round_wait)
            click.echo(f"round {round_no}: {done['status']} -> version {done['version']} in "
                       f"{time.monotonic() - started:.1f}s; accepted {done['accepted']}, rejected {done['rejected']}")
    click.echo(f"session {session.id}: {session.refresh()['status']}")
    api_pool.close()
    store_pool.close()


def wait_round(federation: Federation, round_no: int, timeout: float, poll: float = 0.1) -> dict:
    """Poll the API until the round is closed or failed."""
    end = time.monotonic() + timeout
    while (body := federation.round(round_no))["status"] not in ("closed", "failed"):
        if time.monotonic() > end:
            raise TimeoutError(f"round {round_no} still {body['status']} after {timeout}s")
        time.sleep(poll)
    return body
