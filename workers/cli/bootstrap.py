"""`fleettune bootstrap …`: commands that write Redis directly, for before the API serves anyone.

The first admin key has to come from somewhere other than the API that checks it; a federation can
also be created and inspected here without the API. Everything else goes through the API
(`fleettune federations|sessions|devices|… `, in api_commands.py). The same groups answer under
their first names (`fleettune api-key`, `fleettune federation`, `fleettune deadletters`), hidden.
"""

from __future__ import annotations

import json

import click

from fleettune.workers.cli.options import federation_config, federation_kwargs, federation_options


@click.group()
def bootstrap() -> None:
    """Write Redis directly: the first API key, federations without the API, dead letters."""


@bootstrap.group("api-key")
def api_key() -> None:
    """Operator API keys, written straight to Redis (to bootstrap the first admin key)."""


@api_key.command("create")
@click.option("--scope", type=click.Choice(["admin", "read"]), default="admin", show_default=True)
@click.option("--name", default="", help="who or what the key is for")
def api_key_create(scope: str, name: str) -> None:
    """Create a key and print it once; only its sha256 is stored."""
    from fleettune.shared.control.auth import Tokens
    from fleettune.workers.worker.app import app, runtime_of

    key_id, token = Tokens(runtime_of(app).redis).create_api_key(scope, name)
    click.echo(token)
    click.echo(f"key id {key_id}, scope {scope}: store it now, it is not shown again", err=True)


@api_key.command("revoke")
@click.argument("key_id")
def api_key_revoke(key_id: str) -> None:
    """Revoke a key by its id."""
    from fleettune.shared.control.auth import Tokens
    from fleettune.workers.worker.app import app, runtime_of

    if not Tokens(runtime_of(app).redis).revoke_api_key(key_id):
        raise click.UsageError(f"no key {key_id}")
    click.echo(f"revoked {key_id}")


@bootstrap.group()
def federation() -> None:
    """Create and inspect federations."""


@federation.command("create")
@click.argument("name")
@click.option("--devices", "num_devices", default=0, help="enroll this many synthetic device ids")
@click.option("--device", "device_ids", multiple=True, help="enroll this device id (repeatable)")
@federation_options
def federation_create(name: str, num_devices: int, device_ids: tuple[str, ...], **kw) -> None:
    """Create a federation, publish version 0 and open round 1."""
    from fleettune.shared.device.synthetic import devices
    from fleettune.workers.worker.app import app, runtime_of

    config = federation_config(name, **federation_kwargs(kw))
    runtime = runtime_of(app)
    ids = list(device_ids) + [d.device for d in devices(num_devices, config.seed)]
    info, refused = runtime.coordinator.start(config, ids)
    click.echo(json.dumps({"federation": name, "round": info.round, "cohort": info.cohort_size,
                           "parameters": config.spec.num_parameters, "refused": refused}))


@federation.command("status")
@click.argument("name")
def federation_status(name: str) -> None:
    """Print a federation's state, current round and counters as JSON."""
    from fleettune.workers.worker.app import app, runtime_of

    state = runtime_of(app).state
    round_no = state.federations.current_round(name)
    info = state.rounds.round_info(name, round_no)
    status = state.federations.status(name)
    version = int(status.get("version", 0))
    click.echo(json.dumps({"state": status, "round": info.__dict__ if info else None, "stats": state.federations.stats(name),
                           "evaluation": state.evaluations.evaluation(name, version)}, indent=2))


@bootstrap.command()
@click.option("-n", "count", default=20, show_default=True)
def deadletters(count: int) -> None:
    """Print the newest rejected updates with their reasons."""
    from fleettune.workers.worker.app import app, runtime_of

    for entry in runtime_of(app).state.accounting.deadletters(count):
        click.echo(json.dumps(entry))
