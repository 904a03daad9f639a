"""Synchronous rounds against async buffered rounds (FedBuff) when device speeds differ.

    python bench/async.py [--devices 8] [--rounds 6] [--ks 2,4,8] [--spread 10] [--quorum 6] [--steps 8]
                          [--server-lr 1] [--optimizer sgd] [--no-participation] [--seed 0] [--json F]

Devices of the tiny model really train (non-IID, one domain each) and everything goes through the
gateway and the production tasks on embedded services; only time is simulated
(workers/local/paced.py). Each device takes a fixed time per update (times 10 % jitter): the
quantiles of a lognormal, the slowest `--spread` times the fastest (paced.device_seconds). Every
run spends the same compute, devices x rounds updates. Two synchronous baselines: rounds of
every device (a round lasts as long as its slowest device), and rounds that close when their
`--quorum` fastest devices have sent (over-selection, as production systems run; the slow ones'
updates are dropped). Then FedBuff with buffer size K for each K (staleness weight
(1 + tau)^-0.5, max_staleness 20).

The target is the perplexity synchronous rounds of every device end at, plus 1 %. Speed-ups and
final ratios are against those rounds; the line before the last compares the best K with
over-selection, the stronger baseline where it reaches the target. The last line:
    speed-up to target perplexity: X× (sync T1 s, async K=k T2 s); final perplexity ratio async / sync = Y
for the K that reaches the target first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettune.shared.device import models, trainer  # noqa: E402
from fleettune.shared.device.fleet import FleetSpec, build_fleet  # noqa: E402
from fleettune.shared.federation import EvaluationConfig, FederationConfig, LocalTraining, RoundPolicy  # noqa: E402
from fleettune.shared.protocol.adapter_spec import AdapterConfig, ModelDims  # noqa: E402
from fleettune.shared.settings import Settings  # noqa: E402
from fleettune.shared.strategies.config import AggregationConfig  # noqa: E402
from fleettune.workers.local import paced  # noqa: E402
from fleettune.workers.local.harness import embedded, enroll, gateway  # noqa: E402

SOURCE, CHARS, EVAL_CHARS = "tiny", 12_000, 6_000


def config_for(name: str, dims: ModelDims, mode: str, k: int, devices: int, rounds: int, steps: int,
               server_lr: float = 1.0, optimizer: str = "sgd", participation: bool = True) -> FederationConfig:
    policy = (RoundPolicy(min_updates=k or devices, max_rounds=rounds * devices, timeout_seconds=3600,
                          max_update_norm=5.0)
              if mode == "sync" else
              RoundPolicy(mode="async", buffer_size=k, min_updates=1, max_staleness=20, staleness_exponent=0.5,
                          max_rounds=10**5, timeout_seconds=3600, max_update_norm=5.0, server_lr=server_lr,
                          participation_weighting=participation))
    return FederationConfig(
        name=name, model=dims, base_model=SOURCE, policy=policy,
        adapter=AdapterConfig(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
        training=LocalTraining(learning_rate=5e-3, batch_size=8, seq_len=128, max_steps=steps),
        evaluation=EvaluationConfig(base_model=SOURCE, forgetting_threshold=100.0, general_every=10**6,
                                    eval_chars=EVAL_CHARS),
        aggregation=AggregationConfig(optimizer=optimizer) if mode == "async" else AggregationConfig(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="the compute budget: devices x rounds updates")
    parser.add_argument("--ks", default="2,4,8", help="FedBuff buffer sizes")
    parser.add_argument("--spread", type=float, default=10.0, help="slowest / fastest device time per update")
    parser.add_argument("--steps", type=int, default=8, help="local steps per update")
    parser.add_argument("--quorum", type=int, default=6, help="the second synchronous baseline: rounds close "
                        "when their fastest QUORUM devices have sent (over-selection)")
    parser.add_argument("--server-lr", type=float, default=1.0, help="the async runs' server learning rate")
    parser.add_argument("--optimizer", default="sgd", help="the async runs' server optimizer (sgd, avgm, adam, ...)")
    parser.add_argument("--no-participation", action="store_true",
                        help="async runs without FedAU's participation weight (FedBuff's weights alone)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    budget = args.devices * args.rounds
    seconds = paced.device_seconds(args.devices, args.spread, seed=args.seed)
    print(f"{args.devices} devices, seconds per update {np.round(np.sort(seconds), 1).tolist()} "
          f"(spread {seconds.max() / seconds.min():.1f}x); budget {budget} updates of {args.steps} steps each")

    tokenizer, base = models.load_tokenizer(SOURCE), models.load_model(SOURCE)
    dims = ModelDims.from_hf_config(base.config)
    probe = config_for("probe", dims, "sync", 0, args.devices, args.rounds, args.steps)
    model = trainer.peft_model(base, probe.adapter)
    fleet = [d for d, _ in build_fleet(FleetSpec.spread(args.devices, CHARS, seed=args.seed), probe, model, tokenizer)]
    runs: dict[str, list[paced.Point]] = {}
    started = time.monotonic()
    with embedded(Settings(), Path(tempfile.mkdtemp(prefix="ft-async-"))) as (app, runtime, _), \
            gateway(app, runtime) as (url, admin_key):
        base_ppl = None
        plan = [("sync", "sync", 0), (f"sync Q={args.quorum}", "sync", args.quorum)]
        for label, mode, k in plan + [(f"async K={k}", "async", k) for k in ks]:
            config = config_for(f"bench-{mode}{k}-{int(time.time())}", dims, mode, k, args.devices, args.rounds,
                                args.steps, args.server_lr, args.optimizer, not args.no_participation)
            runtime.state.federations.create(config, status="idle")
            clients = enroll(url, admin_key, config.name, fleet)
            runtime.coordinator.begin_training(config.name, config.policy.max_rounds)
            base_ppl = base_ppl or runtime.evaluator(config).base["heldout_mean"]
            if mode == "sync":
                points = list(paced.run_sync(app, runtime, config, fleet, clients, seconds, budget, seed=args.seed,
                                             quorum=k or None))
            else:
                points = list(paced.run_async(app, runtime, config, fleet, clients, seconds, budget, seed=args.seed))
            runs[label] = points
            last = points[-1]
            print(f"{label:>11}: {len(points):>3} versions, {last.updates} updates, final held-out ppl "
                  f"{last.heldout_ppl:.2f} at {last.clock:,.0f} s; mean staleness "
                  f"{np.mean([p.stale for p in points]):.2f}  ({time.monotonic() - started:.0f} s so far)", flush=True)
            if mode == "async":
                taus = [t for p in points for t in p.staleness]
                counts = np.bincount(taus) if taus else np.zeros(1, int)
                print(f"{'':>13}staleness of accepted updates (versions: count): "
                      + ", ".join(f"{t}: {n}" for t, n in enumerate(counts) if n), flush=True)

    sync = runs["sync"]
    target = sync[-1].heldout_ppl * 1.01
    t_sync = paced.time_to(sync, target)
    overselect = f"sync Q={args.quorum}"
    t_over = paced.time_to(runs[overselect], target)
    print(f"\nbase held-out perplexity {base_ppl:.2f}; target {target:.2f} (synchronous final + 1 %)")
    print(f"{'run':>11} {'time to target s':>16} {'speed-up':>8} {'final ppl':>9} {'final / sync':>12}")
    best = None
    for label, points in runs.items():
        t = paced.time_to(points, target)
        ratio = points[-1].heldout_ppl / sync[-1].heldout_ppl
        speedup = t_sync / t if t else None
        print(f"{label:>11} {t if t else float('nan'):>16,.0f} {speedup or float('nan'):>8.2f} "
              f"{points[-1].heldout_ppl:>9.2f} {ratio:>12.4f}")
        if label.startswith("async") and speedup and (best is None or speedup > best[1]):
            best = (label, speedup, t, ratio)
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds.tolist(), "target": target, "base": base_ppl,
                                         "runs": {k: [p.__dict__ for p in v] for k, v in runs.items()}}, indent=1))
    if best is None:
        print("speed-up to target perplexity: none (no async run reached the target)")
        return
    label, speedup, t, ratio = best
    versus = (f"{t_over / t:.2f}× ({overselect} {t_over:,.0f} s)" if t_over else
              f"{overselect} never reaches it (final {runs[overselect][-1].heldout_ppl:.2f})")
    print(f"against over-selection, async K={label.split('=')[1]}: {versus}")
    print(f"speed-up to target perplexity: {speedup:.2f}× (sync {t_sync:,.0f} s, async K={label.split('=')[1]} "
          f"{t:,.0f} s); final perplexity ratio async / sync = {ratio:.4f}")


if __name__ == "__main__":
    main()
