"""`fleettune demo`: a whole federation on embedded defaults.

Without FLEETTUNE_REDIS_URL the broker is kombu's in-memory transport and the state store is
fakeredis, both inside this process; without FLEETTUNE_S3_ENDPOINT the object store is a directory.
The tasks, codec and aggregation are the ones production runs, consumed by a real Celery worker
(solo pool, in a thread); only the transports differ.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path

import click
import fakeredis
import numpy as np
import redis
import torch
from celery.contrib.testing.worker import start_worker
from tqdm import tqdm

from shared import keys, versions
from shared import simulate as sim
from shared.adapter_spec import LAYOUTS, AdapterConfig
from shared.federation import FederationConfig, RoundPolicy
from shared.runtime import Runtime
from shared.settings import Settings
from shared.storage import LocalObjectStore, open_store
from shared.submit import encode_update, submit_update
from workers.app import INGEST_QUEUE, ROUNDS_QUEUE, make_app
from workers.simulate import enqueuer


def embedded_runtime(settings: Settings, out_dir: Path) -> tuple[Runtime, str]:
    """Real services where the settings name them, embedded stand-ins where they do not."""
    if settings.redis_url:
        client, broker = redis.Redis.from_url(settings.redis_url), settings.redis_url
    else:
        client, broker = fakeredis.FakeRedis(), "memory://"
    store = open_store(settings) if settings.s3_endpoint else LocalObjectStore(out_dir / "objects")
    return Runtime(settings, client, store), broker


def run_demo(settings: Settings, num_devices: int, rounds: int, out_dir: str | Path) -> Path:
    torch.set_num_threads(1)
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    runtime, broker = embedded_runtime(settings, out)
    app = make_app(settings, broker_url=broker, runtime=runtime)
    if broker == "memory://":
        app.conf.broker_transport_options = {"polling_interval": 0.05}  # its default idles 1 s per poll
    fed = f"demo-{int(time.time())}"
    config = FederationConfig(
        name=fed, model=LAYOUTS["tiny-llama"], adapter=AdapterConfig(rank=8, alpha=16),
        policy=RoundPolicy(min_updates=max(2, num_devices // 2), timeout_seconds=60, max_rounds=rounds,
                           max_grad_norm=1.0),
    )
    fleet = sim.devices(num_devices, seed=7)
    push = enqueuer(app)
    click.echo(f"fleettune demo: federation {fed}, {num_devices} devices, {rounds} rounds, "
               f"LoRA r=8 on q/k/v/o of {config.base_model} ({config.spec.num_parameters:,} parameters)")
    click.echo(f"broker {broker.split('@')[-1]}, store {type(runtime.store).__name__}, outputs in {out}/\n")
    rows = []
    with start_worker(app, pool="solo", perform_ping_check=False, queues=[INGEST_QUEUE, ROUNDS_QUEUE],
                      shutdown_timeout=30):
        runtime.coordinator.start(config, [d.device for d in fleet])
        for round_no in range(1, rounds + 1):
            started = time.monotonic()
            info = runtime.state.round_info(fed, round_no)
            _send_hostile(runtime, push, config, fleet[0].device, round_no, info.base_version)
            for _ in tqdm(sim.run_round(runtime.store, push, config.spec, fed, round_no, info.base_version,
                                        fleet, seed=7), total=len(fleet), desc=f"round {round_no}",
                          unit="update", leave=False):
                pass
            done = _wait_round(app, runtime, fed, round_no, timeout=120)
            manifest = versions.manifest(runtime.store, fed, done.version) if done.status == "closed" else {}
            rows.append((round_no, done.status, len(manifest.get("contributors", [])), done.rejected,
                         manifest.get("update_norms", {}).get("clipped", 0),
                         manifest.get("mean_delta_norm", math.nan), manifest.get("global_norm", math.nan),
                         time.monotonic() - started))
    _print_table(rows)
    stats = runtime.state.stats(fed)
    click.echo(f"\ncounters: {stats}")
    for entry in runtime.state.deadletters(3):
        click.echo(f"dead-letter: {entry['device']} round {entry['round']}: {entry['reason']} ({entry['detail']})")
    final = int(runtime.state.status(fed)["version"])
    adapter_dir = out / "final-adapter"
    versions.download(runtime.store, fed, final, adapter_dir)
    _load_with_peft(config, adapter_dir)
    return adapter_dir


def _wait_round(app, runtime: Runtime, fed: str, round_no: int, timeout: float):
    """Wait for the round to settle, sending the deadline sweep each second as beat would."""
    end = time.monotonic() + timeout
    while True:
        try:
            return runtime.state.wait_settled(fed, round_no, timeout=1.0)
        except TimeoutError:
            if time.monotonic() > end:
                raise
            app.send_task("fleettune.sweep")


def _send_hostile(runtime: Runtime, push, config: FederationConfig, device: str, round_no: int, base: int) -> None:
    """One device first sends an update holding NaN: it must be rejected, and its retry accepted."""
    arrays = sim.synthetic_delta(config.spec, 99, round_no, 0, 1e-3)
    first = next(iter(arrays))
    arrays[first][0, 0] = np.nan
    submit_update(runtime.store, push, federation=config.name, round_no=round_no, device=device,
                  blob=encode_update(arrays), base_version=base, num_samples=10)
    # wait for the reject before the honest retry overwrites the object
    deadline = time.monotonic() + 30
    while runtime.state.stats(config.name).get("rejected", 0) < round_no and time.monotonic() < deadline:
        time.sleep(0.02)


def _print_table(rows: list[tuple]) -> None:
    click.echo(f"{'round':>5} {'status':>7} {'updates':>7} {'rejected':>8} {'clipped':>7} "
               f"{'delta norm':>10} {'adapter norm':>12} {'seconds':>7}")
    for r, status, n, rej, clipped, delta, norm, secs in rows:
        click.echo(f"{r:>5} {status:>7} {n:>7} {rej:>8} {clipped:>7} {delta:>10.4f} {norm:>12.4f} {secs:>7.2f}")


def _load_with_peft(config: FederationConfig, adapter_dir: Path) -> None:
    """Prove the published adapter is a real PEFT adapter: load it and compare outputs."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**config.model.llama_config())).eval()
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        after = model(ids).logits
    sha = hashlib.sha256((adapter_dir / versions.ADAPTER_FILE).read_bytes()).hexdigest()[:12]
    click.echo(f"\nfinal adapter {adapter_dir}/ (sha256 {sha}…) loads with PeftModel.from_pretrained; "
               f"max |logit change| on a test input: {(after - before).abs().max():.4f}")
