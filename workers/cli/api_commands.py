"""`fleettune federations|sessions|devices|groups|rollouts|split|models|keys`: the API from a terminal, as tables.

Each command is a thin call through the SDK; FLEETTUNE_URL and FLEETTUNE_API_KEY say where and who.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import click
from tabulate import tabulate

from fleettune import Client, Federation, FleettuneAPIError, ModelRegistry
from fleettune.shared.strategies.config import ALGORITHMS

url_option = click.option("--url", envvar="FLEETTUNE_URL", default="http://127.0.0.1:8000", show_default=True,
                          help="the API (FLEETTUNE_URL)")
key_option = click.option("--api-key", envvar="FLEETTUNE_API_KEY", required=True,
                          help="an operator key (FLEETTUNE_API_KEY)")


def _client(ctx: click.Context) -> Client:
    return ctx.obj["client"]


def _group(name: str, help_text: str) -> click.Group:
    @click.group(name, help=help_text)
    @url_option
    @key_option
    @click.pass_context
    def group(ctx: click.Context, url: str, api_key: str) -> None:
        ctx.obj = {"client": Client(api_key, url)}

    return group


def table(rows: Iterable[dict], columns: list[str]) -> None:
    click.echo(tabulate([[_cell(row.get(c)) for c in columns] for row in rows], headers=columns))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)[:60]
    return "" if value is None else str(value)


federations = _group("federations", "Federations through the API.")


@federations.command("list")
@click.pass_context
def federations_list(ctx) -> None:
    table(_client(ctx).get("/api/v1/federations")["federations"],
          ["name", "status", "round", "version", "devices", "session"])


@federations.command("get")
@click.argument("name")
@click.pass_context
def federations_get(ctx, name: str) -> None:
    click.echo(json.dumps(_client(ctx).get(f"/api/v1/federations/{name}"), indent=2))


@federations.command("create")
@click.argument("name")
@click.option("--model", default="tiny-llama", show_default=True)
@click.option("--adapter", "adapter_json", default=None, help='JSON, e.g. {"type": "lora", "rank": 8}')
@click.option("--strategy", "strategy_json", default=None, help='JSON, as PUT .../strategy takes it')
@click.pass_context
def federations_create(ctx, name: str, model: str, adapter_json: str | None, strategy_json: str | None) -> None:
    body = {"name": name, "model_id": model}
    for key, raw in (("adapter", adapter_json), ("strategy", strategy_json)):
        if raw:
            body[key] = json.loads(raw)
    created = _client(ctx).post("/api/v1/federations", body)
    table([created], ["name", "status", "round", "version"])


@federations.command("strategy")
@click.argument("name")
@click.option("--algorithm", type=click.Choice(sorted(ALGORITHMS)), default=None, help="an aggregation preset")
@click.option("--aggregation", "aggregation_json", default=None,
              help='JSON overrides, e.g. {"lora": "ffa", "optimizer": "adam", "dp": {"noise_multiplier": 1.0}}')
@click.option("--json", "strategy_json", default=None, help="the whole body, as PUT .../strategy takes it")
@click.pass_context
def federations_strategy(ctx, name: str, algorithm: str | None, aggregation_json: str | None,
                         strategy_json: str | None) -> None:
    """Choose how the federation trains and aggregates; a change during a round applies from the next."""
    body = json.loads(strategy_json) if strategy_json else {}
    if algorithm:
        body["algorithm"] = algorithm
    if aggregation_json:
        body["aggregation"] = json.loads(aggregation_json)
    answer = _client(ctx).put(f"/api/v1/federations/{name}/strategy", body)
    agg = answer["config"]["aggregation"]
    table([dict(answer, **{k: agg[k] for k in ("algorithm", "lora", "rule", "optimizer", "drift_control")},
                server_lr=answer["config"]["policy"]["server_lr"])],
          ["federation", "revision", "applies_from_round", "algorithm", "lora", "rule", "optimizer", "drift_control",
           "server_lr"])


@federations.command("delete")
@click.argument("name")
@click.pass_context
def federations_delete(ctx, name: str) -> None:
    _client(ctx).delete(f"/api/v1/federations/{name}")
    click.echo(f"deleted {name}")


@federations.command("resume")
@click.argument("name")
@click.pass_context
def federations_resume(ctx, name: str) -> None:
    """Reopen a federation the forgetting guard halted (or a stopped one) for its rounds left."""
    table([_client(ctx).post(f"/api/v1/federations/{name}/resume")], ["name", "status", "round", "version"])


@federations.command("versions")
@click.argument("name")
@click.pass_context
def federations_versions(ctx, name: str) -> None:
    rows = Federation(name=name, client=_client(ctx)).versions()
    table([dict(r, heldout=(r.get("evaluation") or {}).get("heldout_mean"), contributors=len(r["contributors"]),
                algorithm=(r.get("aggregation") or {}).get("algorithm"), epsilon=(r.get("dp") or {}).get("epsilon"))
           for r in rows], ["version", "round", "parent_version", "contributors", "algorithm", "global_norm", "heldout",
                            "epsilon"])


@federations.command("artifacts")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--export", "formats", multiple=True, help="ask a worker to export to this format first (repeat): "
              "onnx, executorch, coreml, litert")
@click.option("--download", "directory", type=click.Path(file_okay=False), default=None,
              help="download each ready artifact's base and adapter here, with progress, sha256-checked")
@click.pass_context
def federations_artifacts(ctx, name: str, version: int, formats: tuple[str, ...], directory: str | None) -> None:
    """A version's exports to on-device runtimes: status, parity, bytes."""
    fed = Federation(name=name, client=_client(ctx))
    if formats:
        fed.export(version, list(formats))
    rows = fed.artifacts(version)
    table([dict(r, base_bytes=(r.get("base") or {}).get("size"), adapter_bytes=(r.get("adapter") or {}).get("size"))
           for r in rows], ["format", "status", "attempts", "max_abs_logit_diff", "base_bytes", "adapter_bytes",
                            "full_over_adapter", "reason"])
    if directory:
        for artifact in rows:
            if artifact["status"] == "ready":
                for part, path in fed.download_artifact(artifact, Path(directory) / artifact["format"]).items():
                    click.echo(f"{artifact['format']} {part}: {path}")


sessions = _group("sessions", "Training sessions through the API.")
SESSION_COLUMNS = ["id", "federation", "status", "current_round", "last_round", "version", "created_by"]


@sessions.command("list")
@click.pass_context
def sessions_list(ctx) -> None:
    table(_client(ctx).get("/api/v1/training-sessions")["sessions"], SESSION_COLUMNS)


@sessions.command("create")
@click.option("--federation", "name", required=True)
@click.option("--model", default="tiny-llama", show_default=True)
@click.option("--rounds", default=10, show_default=True)
@click.option("--min-updates", default=2, show_default=True)
@click.option("--timeout", "timeout_seconds", default=None, type=float, help="round deadline in seconds")
@click.option("--algorithm", type=click.Choice(sorted(ALGORITHMS)), default="fedavg", show_default=True)
@click.pass_context
def sessions_create(ctx, name: str, model: str, rounds: int, min_updates: int, timeout_seconds: float | None,
                    algorithm: str) -> None:
    extra = {"timeout_seconds": timeout_seconds} if timeout_seconds else None
    session = Federation(name=name, client=_client(ctx)).train(model=model, algorithm=algorithm, rounds=rounds,
                                                               min_updates=min_updates, round_config=extra)
    table([session.last], SESSION_COLUMNS)


@sessions.command("get")
@click.argument("session_id")
@click.pass_context
def sessions_get(ctx, session_id: str) -> None:
    table([_client(ctx).get(f"/api/v1/training-sessions/{session_id}")], SESSION_COLUMNS + ["round_status", "reason"])


@sessions.command("stop")
@click.argument("session_id")
@click.pass_context
def sessions_stop(ctx, session_id: str) -> None:
    table([_client(ctx).post(f"/api/v1/training-sessions/{session_id}/stop")], SESSION_COLUMNS)


devices = _group("devices", "Devices of a federation through the API.")


@devices.command("list")
@click.argument("federation")
@click.pass_context
def devices_list(ctx, federation: str) -> None:
    table(Federation(name=federation, client=_client(ctx)).devices(),
          ["device", "tier", "ram_mb", "storage_mb", "enrolled", "revoked"])


@devices.command("register")
@click.argument("federation")
@click.argument("device_id")
@click.option("--ram-mb", type=int, default=None)
@click.option("--storage-mb", type=int, default=None)
@click.option("--tier", default="default", show_default=True)
@click.pass_context
def devices_register(ctx, federation: str, device_id: str, ram_mb, storage_mb, tier: str) -> None:
    """Print the device's token (shown once)."""
    click.echo(Federation(name=federation, client=_client(ctx)).register_device(device_id, ram_mb, storage_mb, tier))


@devices.command("revoke")
@click.argument("federation")
@click.argument("device_id")
@click.pass_context
def devices_revoke(ctx, federation: str, device_id: str) -> None:
    Federation(name=federation, client=_client(ctx)).revoke_device(device_id)
    click.echo(f"revoked {device_id}")


groups = _group("groups", "Device groups of a federation: static, dynamic (rules) or hybrid.")
GROUP_COLUMNS = ["group", "kind", "devices", "rules", "exclude", "matched"]


@groups.command("list")
@click.argument("federation")
@click.pass_context
def groups_list(ctx, federation: str) -> None:
    sizes = Federation(name=federation, client=_client(ctx)).groups()
    table([{"group": g, "size": n} for g, n in sizes.items()], ["group", "size"])


@groups.command("get")
@click.argument("federation")
@click.argument("group")
@click.pass_context
def groups_get(ctx, federation: str, group: str) -> None:
    table([Federation(name=federation, client=_client(ctx)).group(group)], GROUP_COLUMNS)


@groups.command("set")
@click.argument("federation")
@click.argument("group")
@click.option("--device", "devices", multiple=True, help="a listed member (repeat)")
@click.option("--rules", "rules_json", default=None,
              help='JSON, e.g. {"min_ram_mb": 4096, "os": ["android"], "min_app_version": "2.1"}')
@click.option("--exclude", multiple=True, help="a device never in the group (repeat)")
@click.pass_context
def groups_set(ctx, federation: str, group: str, devices: tuple[str, ...], rules_json: str | None,
               exclude: tuple[str, ...]) -> None:
    """Create or replace a group: listed devices (static), rules (dynamic) or both (hybrid)."""
    rules = json.loads(rules_json) if rules_json else None
    table([Federation(name=federation, client=_client(ctx)).set_group(group, list(devices), rules,
                                                                      exclude=list(exclude))], GROUP_COLUMNS)


@groups.command("delete")
@click.argument("federation")
@click.argument("group")
@click.pass_context
def groups_delete(ctx, federation: str, group: str) -> None:
    Federation(name=federation, client=_client(ctx)).delete_group(group)
    click.echo(f"deleted {group}")


rollouts = _group("rollouts", "Canary rollouts of published versions, and the tier deployment.")
ROLLOUT_COLUMNS = ["id", "version", "previous", "status", "percent", "groups", "created_by"]


@rollouts.command("create")
@click.argument("federation")
@click.argument("version", type=int)
@click.option("--group", "target", multiple=True, help="a target group (repeat); none: every device")
@click.option("--start-percent", default=10.0, show_default=True)
@click.option("--step", "step_percent", default=10.0, show_default=True)
@click.option("--min-step-seconds", default=3600.0, show_default=True)
@click.option("--manual", is_flag=True, help="no automatic advance (rollback on a broken gate stays automatic)")
@click.option("--gates", "gates_json", default=None, help='JSON, e.g. {"max_loss_increase": 0.05, "min_reports": 20}')
@click.option("--start", is_flag=True, help="start at once (the server's evaluation gate still applies)")
@click.pass_context
def rollouts_create(ctx, federation: str, version: int, target, start_percent, step_percent, min_step_seconds,
                    manual: bool, gates_json: str | None, start: bool) -> None:
    rec = Federation(name=federation, client=_client(ctx)).rollout(
        version, list(target), start_percent, step_percent, min_step_seconds, not manual,
        json.loads(gates_json) if gates_json else None, start)
    table([rec], ROLLOUT_COLUMNS)


@rollouts.command("list")
@click.argument("federation")
@click.pass_context
def rollouts_list(ctx, federation: str) -> None:
    table(Federation(name=federation, client=_client(ctx)).rollouts(), ROLLOUT_COLUMNS)


@rollouts.command("history")
@click.argument("federation")
@click.argument("rollout_id")
@click.pass_context
def rollouts_history(ctx, federation: str, rollout_id: str) -> None:
    rec = Federation(name=federation, client=_client(ctx)).get_rollout(rollout_id)
    table(rec["history"], ["at", "by", "action", "from_percent", "to_percent", "status", "reason"])


@rollouts.command("set")
@click.argument("federation")
@click.argument("rollout_id")
@click.argument("action", type=click.Choice(["start", "advance", "pause", "resume", "rollback", "promote",
                                             "percentage"]))
@click.option("--reason", default=None, help="recorded in the history (required with percentage)")
@click.option("--percent", type=float, default=None, help="with percentage")
@click.pass_context
def rollouts_set(ctx, federation: str, rollout_id: str, action: str, reason: str | None, percent) -> None:
    """Move a rollout: start, advance, pause, resume, rollback, promote, or set its percentage."""
    rec = Federation(name=federation, client=_client(ctx)).rollout_action(rollout_id, action, reason, percent)
    table([rec], ROLLOUT_COLUMNS)


@rollouts.command("deployment")
@click.argument("federation")
@click.option("--json", "tiers_json", default=None,
              help='set it: {"phone": {"mode": "train"}, "watch": {"mode": "infer", "base_model": "tiny", '
                   '"adapter": "distilled"}}')
@click.pass_context
def rollouts_deployment(ctx, federation: str, tiers_json: str | None) -> None:
    """Show (or set) which variant each device tier runs."""
    fed = Federation(name=federation, client=_client(ctx))
    tiers = fed.set_deployment(json.loads(tiers_json))["tiers"] if tiers_json else fed.deployment()
    table([dict(v, tier=t) for t, v in tiers.items()], ["tier", "mode", "base_model", "adapter", "api_url"])


split = _group("split", "Split learning of a federation: the cut, DP at the cut, and its devices' steps.")


@split.command("set")
@click.argument("federation")
@click.option("--mode", type=click.Choice(["two_part", "u_shaped"]), default="u_shaped", show_default=True,
              help="two_part: the server computes the loss and sees the labels (the text itself)")
@click.option("--base-model", type=click.Choice(["tiny", "smollm2"]), default="tiny", show_default=True)
@click.option("--cut", default=1, show_default=True, help="k: the device runs the embeddings and layers [0, k)")
@click.option("--top-layers", default=1, show_default=True, help="u_shaped: last layers kept on the device")
@click.option("--clip", default=100.0, show_default=True, help="C: per-example L2 bound on the activations")
@click.option("--sigma", default=0.0, show_default=True, help="noise std = sigma x C")
@click.option("--bottleneck", default=0, show_default=True,
              help="r: each token's activations projected onto r directions before the noise (0: whole)")
@click.option("--server-returns", type=click.Choice(["residual", "correction"]), default="residual",
              show_default=True, help="u_shaped: correction keeps the server's layers' frozen base on the device")
@click.option("--sample-rate", type=float, default=None, help="q: devices' Poisson sampling rate (the accountant's)")
@click.option("--max-epsilon", type=float, default=None, help="refuse a device's steps past this epsilon")
@click.option("--seq-len", default=64, show_default=True)
@click.option("--max-batch", default=32, show_default=True)
@click.pass_context
def split_set(ctx, federation: str, **fields) -> None:
    body = _client(ctx).put(f"/api/v1/federations/{federation}/split", fields)
    table([body["config"]], list(fields))


@split.command("status")
@click.argument("federation")
@click.pass_context
def split_status(ctx, federation: str) -> None:
    body = _client(ctx).get(f"/api/v1/federations/{federation}/split")
    table([body], ["server_part_version", "server_steps", "rejected"])
    table([dict(v, device=d) for d, v in body["devices"].items()], ["device", "steps"])


models = _group("models", "The model registry through the API.")


@models.command("list")
@click.pass_context
def models_list(ctx) -> None:
    rows = ModelRegistry(client=_client(ctx)).models()
    table([dict(m, versions=len(m["versions"])) for m in rows], ["id", "kind", "current_version", "versions", "base_model"])


@models.command("versions")
@click.argument("model_id")
@click.pass_context
def models_versions(ctx, model_id: str) -> None:
    table(ModelRegistry(client=_client(ctx)).versions(model_id), ["version", "status", "filename", "size", "sha256", "formats"])


@models.command("upload")
@click.argument("model_id")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--version", required=True)
@click.option("--format", "formats", multiple=True, default=("safetensors",), show_default=True)
@click.option("--kind", type=click.Choice(["base", "adapter"]), default=None, help="for a new model (default base)")
@click.pass_context
def models_upload(ctx, model_id: str, path: str, version: str, formats: tuple[str, ...], kind: str | None) -> None:
    """Upload a file as an immutable version, with a progress bar."""
    done = ModelRegistry(client=_client(ctx)).upload_version_from_path(model_id, path, version, list(formats), kind)
    table([done], ["model_id", "version", "status", "size", "sha256"])


@models.command("download")
@click.argument("model_id")
@click.argument("version")
@click.argument("dest", type=click.Path())
@click.pass_context
def models_download(ctx, model_id: str, version: str, dest: str) -> None:
    click.echo(ModelRegistry(client=_client(ctx)).download(model_id, version, dest))


@models.command("set-current")
@click.argument("model_id")
@click.argument("version")
@click.pass_context
def models_set_current(ctx, model_id: str, version: str) -> None:
    table([ModelRegistry(client=_client(ctx)).set_current(model_id, version)], ["id", "kind", "current_version"])


keys = _group("keys", "Operator API keys through the API (admin).")


@keys.command("list")
@click.pass_context
def keys_list(ctx) -> None:
    table(_client(ctx).get("/api/v1/keys")["keys"], ["id", "scope", "name", "created_at", "revoked"])


@keys.command("create")
@click.option("--scope", type=click.Choice(["admin", "read"]), default="read", show_default=True)
@click.option("--name", default="")
@click.pass_context
def keys_create(ctx, scope: str, name: str) -> None:
    """Print the new key (shown once)."""
    click.echo(_client(ctx).post("/api/v1/keys", {"scope": scope, "name": name})["key"])


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx, key_id: str) -> None:
    _client(ctx).delete(f"/api/v1/keys/{key_id}")
    click.echo(f"revoked {key_id}")


GROUPS = (federations, sessions, devices, groups, rollouts, split, models, keys)
__all__ = ["GROUPS", "FleettuneAPIError"]
