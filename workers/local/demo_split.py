"""`fleettune demo --split --epsilon 8`: split learning through the gateway and the split server, on
embedded defaults.

A device holding legal text trains the tiny model split at layer 1 (U-shaped by default: the
server runs the middle layers, the device the rest, and neither its text nor its labels leave
it), first without noise, then with DP at the cut at the noise that buys the asked epsilon over
the same steps. Each step goes device -> API (its token) -> `fleettune split-server` over HTTP, as
in production; both run in threads of this process. Held-out perplexity is measured through the
split as it runs: the device's layers, DP at the cut with fresh noise, the server's layers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import torch

from fleettune import DeviceClient, Federation
from fleettune.shared import corpora
from fleettune.shared.control.auth import Tokens
from fleettune.shared.device import models, trainer
from fleettune.shared.protocol.adapter_spec import AdapterConfig
from fleettune.shared.runtime import Runtime
from fleettune.shared.settings import Settings
from fleettune.shared.split import bottleneck
from fleettune.shared.split import model as split_model
from fleettune.shared.split.config import SplitConfig
from fleettune.shared.split.device import HttpTransport, SplitDevice
from fleettune.shared.strategies import privacy
from fleettune.workers.local.demo import fresh_out_dir
from fleettune.workers.local.harness import embedded, enqueuer

ADAPTER = {"type": "lora", "rank": 8, "alpha": 16}
BATCH, SEQ, DELTA, LR = 8, 64, 1e-5, 3e-3


@contextmanager
def _split_gateway(app, runtime: Runtime) -> Iterator[tuple[str, str, object]]:
    """The split server and the API (forwarding to it) in threads: (API URL, admin key, split servers)."""
    from fleettune.workers.api import create_app, serve_in_thread
    from fleettune.workers.split.server import create_split_app

    split_app = create_split_app(runtime)
    with serve_in_thread(split_app) as split_url:
        api_runtime = Runtime(runtime.settings.model_copy(update={"split_url": split_url}), runtime.redis,
                              runtime.store)
        with serve_in_thread(create_app(api_runtime, enqueuer(app))) as url:
            yield url, Tokens(runtime.redis).create_api_key("admin", "demo")[1], split_app.state.servers


def run_split_demo(settings: Settings, epsilon: float, steps: int = 200, mode: str = "u_shaped", rank: int = 16,
                   out_dir: str | Path = "fleettune-demo") -> dict:
    torch.set_num_threads(2)
    out = fresh_out_dir(out_dir)
    started = time.monotonic()
    tokenizer = models.load_tokenizer("tiny")
    train = trainer.blocks(tokenizer(corpora.train_text("legal", 120_000))["input_ids"], SEQ)
    heldout = trainer.blocks(tokenizer(corpora.heldout_text("legal", 24_000))["input_ids"], SEQ)
    rate = min(1.0, BATCH / len(train))
    adapter = AdapterConfig(rank=ADAPTER["rank"], alpha=ADAPTER["alpha"])
    probe = trainer.peft_model(models.load_model("tiny"), adapter)
    base = trainer.perplexity(probe, heldout)
    with torch.no_grad():  # C: the median norm of what crosses the cut, so about half the examples are clipped
        _, sent = split_model.device_message(probe, train[:64], 1, bottleneck.projection(probe, rank), 1e30, 0.0)
    clip = float(sent.flatten(1).norm(dim=1).median())
    sigma = privacy.noise_for(epsilon, rate, steps, DELTA)
    click.echo(f"fleettune demo --split: one device with {len(train)} sequences of legal text trains the tiny model "
               f"split at layer 1 ({mode}, bottleneck r={rank}) through the API and the split server, {steps} steps "
               f"at q={rate:.3f}; base held-out perplexity {base:.2f}")
    results = {}
    with embedded(settings, out) as (app, runtime, _), _split_gateway(app, runtime) as (url, admin_key, servers):
        for label, noise in (("non-private", 0.0), ("private", sigma)):
            name = f"split-demo-{label}-{int(time.time())}"
            admin = Federation(admin_key, name, url)
            admin.create(model="tiny-llama", adapter=ADAPTER)
            body = {"mode": mode, "cut": 1, "top_layers": 1, "clip": clip, "sigma": noise, "delta": DELTA,
                    "bottleneck": rank, "seq_len": SEQ, "max_batch": 4 * BATCH, "server_lr": LR, "publish_every": 100}
            if noise:  # the server's accountant holds the device to the asked epsilon
                body.update(sample_rate=rate, max_epsilon=epsilon * (1 + 1e-6))
            config = SplitConfig(**admin.client.put(f"/api/v1/federations/{name}/split", body)["config"])
            client = DeviceClient(admin.register_device("phone"), name, url)
            torch.manual_seed(0)
            model = trainer.peft_model(models.load_model("tiny"), adapter)
            device = SplitDevice(HttpTransport(client, model.config.hidden_size), model, train,
                                 dataclasses.replace(config, sample_rate=rate), lr=LR, batch=BATCH)
            losses = [loss for loss in (device.step() for _ in range(steps)) if loss is not None]
            ppl = device.perplexity(servers.get(name), heldout, seed=1)
            results[label] = {"perplexity": ppl, "epsilon": device.epsilon(), "sent_mb": device.transport.sent / 1e6,
                              "received_mb": device.transport.received / 1e6, "final_loss": losses[-1]}
            eps = "inf" if noise == 0 else f"{device.epsilon():.2f}"
            click.echo(f"  {label}: sigma {noise:.3f}, epsilon {eps}, held-out perplexity {ppl:.2f}; "
                       f"{device.transport.sent / 1e6:.1f} MB sent, {device.transport.received / 1e6:.1f} MB received")
    private, plain = results["private"], results["non-private"]
    click.echo(f"{time.monotonic() - started:.0f} s")
    click.echo(f"split learning: epsilon {private['epsilon']:.2f}, held-out perplexity {private['perplexity']:.2f} "
               f"(base {base:.2f}, non-private {plain['perplexity']:.2f})")
    return {"base": base, **results}
