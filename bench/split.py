"""Split learning: quality, leakage and cost, each measured in one run.

    python bench/split.py quality [--model smollm2]   # held-out perplexity through the split, both modes, with
                                                     # and without the bottleneck, at sigma = 0 and at the sigma
                                                     # that gives epsilon 8, 3, 1; 3 seeds, mean and 95 % interval
    python bench/split.py leakage [--model smollm2]  # an inversion attack's token accuracy against sigma, k and r
    python bench/split.py cost [--model smollm2]     # bytes per step, and a step's time through the gateway
                                                     # and split server (loopback) against local compute;
                                                     # U-shaped with the server's residual and its correction
    python bench/split.py unigram [--model smollm2]  # a context-free reference: unigram counts of the same text

Quality runs in one process (the split server object called directly: the same code the server
process runs, without HTTP), one device holding legal text, equal steps for every variant. The
clip C is the median per-example norm of what crosses the cut, measured first (half the examples
are clipped). Perplexity is measured through the split as it runs: DP at the cut with fresh noise,
the server's layers, then the device's top (U-shaped) or the server's head (two-part). The
ablation row is U-shaped with the server's layers contributing nothing: what the device's own
layers reach alone. Cost starts real Redis, SeaweedFS, `fleettune split-server` and `fleettune api`.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettune.shared import corpora  # noqa: E402
from fleettune.shared.protocol.adapter_spec import AdapterConfig  # noqa: E402
from fleettune.shared.device import models, trainer  # noqa: E402
from fleettune.shared.federation import LocalTraining  # noqa: E402
from fleettune.shared.split import bottleneck  # noqa: E402
from fleettune.shared.split import model as split_model  # noqa: E402
from fleettune.shared.split.config import SplitConfig  # noqa: E402
from fleettune.shared.split.device import LocalTransport, SplitDevice  # noqa: E402
from fleettune.shared.split.server import SplitServer  # noqa: E402
from fleettune.shared.strategies import privacy  # noqa: E402

ADAPTER = AdapterConfig(rank=8, alpha=16)
BATCH, SEQ, DELTA = 8, 64, 1e-5
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student's t, 97.5th percentile, by degrees of freedom


def _data(source: str, chars: int, heldout_chars: int, part: str = "all"):
    tokenizer = models.load_tokenizer(source)
    train = trainer.blocks(tokenizer(corpora.train_text("legal", chars))["input_ids"], SEQ)
    heldout = trainer.blocks(tokenizer(corpora.heldout_text("legal", heldout_chars, part))["input_ids"], SEQ)
    return train, heldout


def _clip(source: str, train: torch.Tensor, cut: int, rank: int = 0) -> float:
    """The median per-example norm of what crosses the cut (half the examples are clipped)."""
    model = trainer.peft_model(models.load_model(source), ADAPTER)
    with torch.no_grad():
        _, sent = split_model.device_message(model, train[:64], cut, bottleneck.projection(model, rank), 1e30, 0.0)
    return float(sent.flatten(1).norm(dim=1).median())


class _NoServer:
    """The ablation: U-shaped with the server's layers contributing nothing (a zero residual), so the
    table shows what the server's layers add over the device's own layers alone."""

    def forward(self, activations):
        return "0" * 16, torch.zeros(*activations.shape[:2], self.hidden)

    def backward(self, step_id, grad):
        return torch.zeros(*grad.shape[:2], self.width)

    def infer(self, activations, labels=None):
        return torch.zeros(*activations.shape[:2], self.hidden)


def _split_run(source: str, train, heldout, config: SplitConfig, steps: int, lr: float, seed: int,
               ablate: bool = False) -> float:
    """Train `steps` split steps from `seed`; held-out perplexity through the split as it runs (DP
    at the cut with fresh noise, the server's layers, the device's top)."""
    torch.manual_seed(seed)
    device_model = trainer.peft_model(models.load_model(source), ADAPTER)
    server_model = trainer.peft_model(models.load_model(source), ADAPTER)
    server = SplitServer(server_model, config)
    if ablate:
        server = _NoServer()
        server.hidden, server.width = device_model.config.hidden_size, config.width(device_model.config.hidden_size)
        transport = server
    else:
        transport = LocalTransport(server)
    device = SplitDevice(transport, device_model, train, config, lr=lr, seed=seed, batch=BATCH)
    for _ in range(steps):
        device.step()
    return device.perplexity(server, heldout, seed=10_000 + seed)


def _interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and a 95 % t-interval over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = T95[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def _cell(values: list[float]) -> str:
    mean, lo, hi = _interval(values)
    return f"{mean:,.1f} [{lo:,.1f}, {hi:,.1f}]" if len(values) > 1 else f"{mean:,.1f}"


def quality(args) -> None:
    train, heldout = _data(args.model, args.chars, args.heldout_chars, args.heldout_part)
    rate, steps, seeds = min(1.0, BATCH / len(train)), args.steps, range(args.first_seed, args.first_seed + args.seeds)
    server_lr = args.server_lr or args.lr
    base_model = trainer.peft_model(models.load_model(args.model), ADAPTER)
    base = trainer.perplexity(base_model, heldout)
    local = []
    for seed in seeds if args.local else ():
        torch.manual_seed(seed)
        model = trainer.peft_model(models.load_model(args.model), ADAPTER)
        trainer.train(model, train, LocalTraining(learning_rate=args.lr, batch_size=BATCH, seq_len=SEQ,
                                                  max_steps=steps, local_epochs=10_000), seed=seed)
        local.append(trainer.perplexity(model, heldout))
    print(f"{args.model}: {len(train)} sequences of {SEQ} tokens, {heldout.numel()} held-out tokens "
          f"({args.heldout_part}), lr {args.lr:g} (server {server_lr:g}), {steps} steps "
          f"(q={rate:.3f}), cut k={args.cut}, delta={DELTA}, {len(seeds)} seeds: mean [95 % interval]")
    print(f"base {base:.2f}   local LoRA {_cell(local) if local else '(skipped)'}", flush=True)
    targets = [None if e == "inf" else float(e) for e in args.epsilons.split(",")]
    rows = [(mode, rank, False) for mode in args.modes.split(",") for rank in args.bottlenecks]
    if "u_shaped" in args.modes and args.ablation:
        rows.append(("u_shaped", args.bottlenecks[-1], True))
    if args.ablation_only:
        rows = [("u_shaped", args.bottlenecks[-1], True)]
    results = {}
    print(f"{'mode':>9} {'r':>4} {'epsilon':>8} {'sigma':>6} {'perplexity':>28} {'/ non-private':>14} {'/ base':>7}")
    for mode, rank, ablate in rows:
        clip = _clip(args.model, train, args.cut, rank)
        for target in targets:
            sigma = 0.0 if target is None else privacy.noise_for(target, rate, steps, DELTA)
            config = SplitConfig(mode=mode, base_model=args.model, cut=args.cut, top_layers=1, clip=clip,
                                 sigma=sigma, delta=DELTA, max_batch=64, seq_len=SEQ, server_lr=server_lr,
                                 bottleneck=rank, sample_rate=rate,
                                 server_returns=args.returns if mode == "u_shaped" else "residual")
            got = [_split_run(args.model, train, heldout, config, steps, args.lr, seed, ablate) for seed in seeds]
            results[mode, rank, ablate, target] = got
            private = results.get((mode, rank, ablate, None))
            ratio = f"{statistics.fmean(got) / statistics.fmean(private):.2f}x" if private and target else "-"
            eps = "inf" if target is None else f"{config.epsilon(steps):.2f}"
            name = f"{mode}{' (device layers only)' if ablate else ''}"
            print(f"{name:>9} {rank:>4} {eps:>8} {sigma:>6.3f} {_cell(got):>28} {ratio:>14} "
                  f"{statistics.fmean(got) / base:>6.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "base": base, "local": local, "steps": steps,
                                         "seeds": list(seeds), "lr": args.lr, "server_lr": server_lr,
                                         "heldout_part": args.heldout_part,
                                         "rows": [{"mode": m, "bottleneck": r, "ablation": a, "epsilon": t,
                                                   "perplexity": v} for (m, r, a, t), v in results.items()]},
                                        indent=2))


def unigram(args) -> None:
    """A context-free reference: a count-based unigram model of the device's training text, scored
    on the same held-out tokens as `quality` (each sequence's first token is not predicted)."""
    train, heldout = _data(args.model, args.chars, args.heldout_chars)
    counts = collections.Counter(train.flatten().tolist())
    vocab = len(models.load_tokenizer(args.model))
    targets = heldout[:, 1:].flatten().tolist()
    for k in (0.01, 0.1, 1.0):
        total = sum(counts.values()) + k * vocab
        nll = -sum(math.log((counts.get(t, 0) + k) / total) for t in targets) / len(targets)
        print(f"{args.model}: unigram perplexity {math.exp(nll):,.1f} (add-{k:g}) on {len(targets):,} held-out "
              f"tokens; vocabulary {vocab:,}, {len(train):,} training sequences", flush=True)


@torch.no_grad()
def leakage(args) -> None:
    """Nearest-neighbour inversion: each position's activation is matched (cosine) against every
    token's own representation at layer k (the token alone, through the attacker's copy of the
    public base's first k layers). Reported: the share of tokens recovered exactly."""
    train, heldout = _data(args.model, args.chars, 4_000)
    model = trainer.peft_model(models.load_model(args.model), ADAPTER)
    rate, steps = min(1.0, BATCH / len(train)), args.steps
    sigmas = {"sigma=0": 0.0, "sigma=0.003": 0.003, "sigma=0.01": 0.01, "sigma=0.03": 0.03,
              **{f"eps={e:g}": privacy.noise_for(e, rate, steps, DELTA) for e in (8.0, 3.0, 1.0)}}
    vocab = model.config.vocab_size
    tokens = heldout[:8]
    layers = [k for k in args.cuts or (1, 2, 3, 4, 8, 16) if k < split_model.num_layers(model)]
    dp = ", ".join(f"{name}: sigma {value:.3f}" for name, value in sigmas.items() if name.startswith("eps"))
    print(f"{args.model}: {tokens.numel()} held-out tokens, vocabulary {vocab}; {dp} ({steps} steps at q={rate:.3f}, "
          f"delta {DELTA}); C = the median norm of what crosses the cut; r = the bottleneck (0: none)")
    print(f"{'k':>3} {'r':>4} {'C':>8} " + " ".join(f"{e:>11}" for e in sigmas))
    for k in layers:
        # every token alone through the public base's first k layers: what the attacker matches against
        alone = torch.cat([split_model.bottom(model, torch.arange(i, min(i + 4096, vocab)).view(-1, 1), k)[:, 0]
                           for i in range(0, vocab, 4096)])
        hidden = split_model.bottom(model, tokens, k)
        for rank in args.bottlenecks:
            projection = bottleneck.projection(model, rank)  # public: the attacker applies it too
            templates = torch.nn.functional.normalize(projection.down(alone) if projection else alone, dim=-1)
            features = projection.down(hidden) if projection else hidden
            clip = float(features.flatten(1).norm(dim=1).median())
            row = []
            for sigma in sigmas.values():
                sent = split_model.privatize(features, clip, sigma, torch.Generator().manual_seed(0))
                guess = (torch.nn.functional.normalize(sent, dim=-1) @ templates.T).argmax(-1)
                row.append((guess == tokens).float().mean().item())
            print(f"{k:>3} {rank:>4} {clip:>8.1f} " + " ".join(f"{a:>11.3f}" for a in row))


def cost(args) -> None:
    from fleettune.workers.local import services

    work = Path(tempfile.mkdtemp(prefix="ft-split-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    with services.redis_server(work) as redis_url, services.s3_server(work) as s3:
        # the split server gets the same two torch threads as the local step it is compared with
        env = services.service_env(redis_url, s3, bucket="split-bench", FLEETTUNE_TORCH_THREADS="2")
        split = services.Api(env, work, command="split-server")
        api = services.Api(dict(env, FLEETTUNE_SPLIT_URL=split.url), work)
        try:
            _cost(args, env, api.url)
        finally:
            api.stop()
            split.stop()


def _cost(args, env: dict, api_url: str) -> None:
    from fleettune import DeviceClient, Federation
    from fleettune.shared.control.auth import Tokens
    from fleettune.shared.runtime import Runtime
    from fleettune.shared.settings import Settings
    from fleettune.shared.split.device import HttpTransport

    runtime = Runtime.from_settings(Settings.from_env(env))
    admin_key = Tokens(runtime.redis).create_api_key("admin", "bench")[1]
    train, _ = _data(args.model, 40_000, 1_000)
    batch = train[:BATCH]
    local = trainer.peft_model(models.load_model(args.model), ADAPTER)
    opt = torch.optim.AdamW([p for p in local.parameters() if p.requires_grad], lr=1e-4)

    def local_step() -> None:
        local(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()

    local_s = _timed(local_step, args.repeat)
    print(f"{args.model}: batch {BATCH} x {SEQ} tokens; local LoRA step (forward, backward, AdamW) "
          f"{local_s * 1000:.0f} ms")
    arms = [("two_part", "residual"), ("u_shaped", "residual"), ("u_shaped", "correction")]
    for (mode, returns), rank in [(arm, rank) for arm in arms for rank in args.bottlenecks]:
        name = f"split-bench-{mode.replace('_', '-')}-{returns}-{rank}"
        admin = Federation(admin_key, name, api_url)
        admin.create(model="smollm2" if args.model == "smollm2" else "tiny-llama", adapter={"type": "lora", "rank": 8})
        admin.client.put(f"/api/v1/federations/{name}/split", {"mode": mode, "base_model": args.model, "cut": 1,
                                                               "seq_len": SEQ, "max_batch": BATCH, "clip": 1e6,
                                                               "bottleneck": rank, "server_returns": returns})
        client = DeviceClient(admin.register_device("phone"), name, api_url)
        model = trainer.peft_model(models.load_model(args.model), ADAPTER)
        config = SplitConfig(mode=mode, base_model=args.model, cut=1, seq_len=SEQ, max_batch=BATCH, clip=1e6,
                             bottleneck=rank, server_returns=returns)
        transport = HttpTransport(client, model.config.hidden_size)
        device = SplitDevice(transport, model, batch, config, lr=1e-4, batch=BATCH)
        device.rate = 1.0  # every sequence each step: a fixed batch, comparable with the local step
        device.step()  # the split server loads the model on its first step
        transport.sent = transport.received = 0
        split_s = _timed(device.step, args.repeat)
        up, down = transport.sent / args.repeat, transport.received / args.repeat
        arm = f"{mode} (correction)" if returns == "correction" else mode
        print(f"{arm}, r={rank}: {(up + down) / 1e6:.2f} MB per step ({up / 1e6:.2f} up, {down / 1e6:.2f} down); "
              f"a step {split_s * 1000:.0f} ms through gateway and split server = "
              f"{split_s / local_s:.2f}x local compute")


def _timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ints(value: str) -> list[int]:
    return [int(x) for x in value.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["quality", "leakage", "cost", "unigram"])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--cut", type=int, default=1)
    parser.add_argument("--cuts", type=_ints, default=None,
                        help="leakage: the cuts k to attack (default 1, 2, 3, 4, 8, 16 below the model's depth)")
    parser.add_argument("--chars", type=int, default=120_000, help="the device's training text")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3, help="quality: seeds per configuration")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="quality: seeds run from here (to spread one table's seeds over processes)")
    parser.add_argument("--modes", default="two_part,u_shaped")
    parser.add_argument("--bottlenecks", type=_ints, default=[0, 16],
                        help="quality, leakage, cost: bottleneck ranks (0: the raw activations)")
    parser.add_argument("--epsilons", default="inf,8,3,1")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false",
                        help="quality: skip the U-shaped row with the server's layers contributing nothing")
    parser.add_argument("--ablation-only", action="store_true", help="quality: only the device-layers-only row")
    parser.add_argument("--heldout-chars", type=int, default=24_000)
    parser.add_argument("--heldout-part", choices=["all", "validation", "test"], default="all",
                        help="quality: the held-out documents to score (validation for choices, test to report)")
    parser.add_argument("--server-lr", type=float, default=None,
                        help="quality: the split server's learning rate (default: --lr, the device's)")
    parser.add_argument("--no-local", dest="local", action="store_false", help="quality: skip the local LoRA rows")
    parser.add_argument("--returns", choices=["residual", "correction"], default="residual",
                        help="quality: what a U-shaped server returns (SplitConfig.server_returns)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="quality: write every run's perplexity here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"quality": quality, "leakage": leakage, "cost": cost, "unigram": unigram}[args.what](args)


if __name__ == "__main__":
    main()
