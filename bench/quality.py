"""Quality and cost figures for federated adapter training, each measured in one run.

    python bench/quality.py fed-vs-central   # federated LoRA (non-IID) vs centralized, equal total steps
    python bench/quality.py prompt           # prompt tuning through the same pipeline: perplexity gain
    python bench/quality.py qlora            # QLoRA (4-bit NF4 base) vs LoRA (fp32 base): perplexity, peak RSS
    python bench/quality.py memory           # memory calculator vs measured peak RSS (tiny; --model smollm2)
    python bench/quality.py dp               # central DP's perplexity cost at epsilon 8, 3 and 1 (a population)
    python bench/quality.py hetero           # tier ranks 16/8/4: exact aggregation vs naive zero-padding
    python bench/quality.py tiers            # cascading tiers: SmolLM2 trains (tier 1), distilled onto tiny
    python bench/quality.py compression      # compressed updates: bytes per update and held-out perplexity cost

Federated runs go through the real tasks on embedded services (workers/local/harness.py); the
device-side federation overhead is printed with every federated run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettune.shared import corpora, keys  # noqa: E402
from fleettune.shared.protocol.adapter_spec import AdapterConfig, ModelDims  # noqa: E402
from fleettune.shared.device import memory, models, trainer  # noqa: E402
from fleettune.shared.device.client import Device  # noqa: E402
from fleettune.shared.device.fleet import FleetSpec, build_fleet, pooled  # noqa: E402
from fleettune.shared.federation import EvaluationConfig, FederationConfig, RoundPolicy, LocalTraining  # noqa: E402
from fleettune.shared.settings import Settings  # noqa: E402
from fleettune.shared.strategies import privacy  # noqa: E402
from fleettune.shared.strategies.config import ADAPTIVE_SERVER_LR, FEDPROX_MU, AggregationConfig  # noqa: E402

import quality_protocol as qp  # noqa: E402

ROUNDS, DEVICES, CHARS = 5, 8, 24_000
PROTOCOL_CHARS = 24_000  # text per device under the protocol: about one local epoch per round of 8 steps
PATIENCE = 5  # the centralized run stops after this many checkpoints in a row without a better validation score
# the protocol's recipe and baseline, as chosen on validation (docs/quality.md has the tuning table);
# a flag given on the command line wins
PROTOCOL_DEFAULTS = {"algorithm": "flexlora", "rounds": 20, "max_steps": 8, "lr": 5e-3, "server_lr": 2.0,
                     "lr_schedule": "cosine", "chars": PROTOCOL_CHARS, "central_lr": 1e-2}
EVAL_CHARS = 12_000  # held-out characters per domain (--eval-chars)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One federated configuration to measure: the aggregation preset and how rounds are cut."""

    algorithm: str = "fedavg"
    rounds: int = ROUNDS
    max_steps: int = 0  # steps per device per round; 0: one local epoch
    server_lr: float | None = None  # None: the preset's default
    proximal_mu: float = 0.0
    overrides: tuple[tuple[str, object], ...] = ()  # AggregationConfig fields
    clients_per_round: int = 0  # 0: every device every round
    local_optimizer: str = "adamw"
    encoding: str = "float32"  # how devices code their updates (shared/protocol/compression.py)
    density: float = 0.05  # topk's share of entries
    lr_schedule: str = "constant"  # the devices' learning rate across rounds (LocalTraining.lr_schedule)
    guard: float = 100.0  # the forgetting guard's threshold (general perplexity / base); 100: off
    guard_action: str = "lower_lr"  # EvaluationConfig.forgetting_action

    def aggregation(self) -> AggregationConfig:
        return AggregationConfig.preset(self.algorithm, **dict(self.overrides))


def _config(name: str, dims: ModelDims, adapter: AdapterConfig, lr: float, source: str,
            recipe: Recipe = Recipe(), clip: float = 5.0, min_updates: int = DEVICES, seed: int = 0) -> FederationConfig:
    agg = recipe.aggregation()
    server_lr = recipe.server_lr or (ADAPTIVE_SERVER_LR if agg.adaptive else 1.0)
    return FederationConfig(
        name=name, model=dims, adapter=adapter, base_model=source,
        policy=RoundPolicy(min_updates=min(min_updates, recipe.clients_per_round or min_updates),
                           max_rounds=recipe.rounds, max_update_norm=clip, timeout_seconds=900, server_lr=server_lr,
                           clients_per_round=recipe.clients_per_round),
        # with max_steps, a device takes exactly that many steps, into another epoch when its text is short
        training=LocalTraining(learning_rate=lr, batch_size=8, seq_len=128, max_steps=recipe.max_steps,
                               local_epochs=1000 if recipe.max_steps else 1,
                                  proximal_mu=recipe.proximal_mu or (FEDPROX_MU if recipe.algorithm == "fedprox" else 0),
                                  local_optimizer=recipe.local_optimizer, update_encoding=recipe.encoding,
                                  update_density=recipe.density, lr_schedule=recipe.lr_schedule),
        evaluation=EvaluationConfig(base_model=source, forgetting_threshold=recipe.guard,
                                    forgetting_action=recipe.guard_action,
                                    general_every=1 if recipe.guard < 100 else 10**6,
                                    eval_chars=EVAL_CHARS),
        aggregation=agg, seed=seed,
    )


def federated(source: str, adapter: AdapterConfig, lr: float, recipe: Recipe = Recipe(),
              fleet_spec: FleetSpec | None = None, clip: float = 5.0, min_updates: int = DEVICES,
              seed: int = 0, keep_versions: bool = False) -> dict:
    """recipe.rounds rounds of DEVICES non-IID devices through the real tasks; returns the last evaluation.

    `seed` sets the adapter's initialisation and the devices' batch order (the fleet's data is
    fleet_spec's); `keep_versions` returns every published version's weights ("versions")."""
    from fleettune.workers.local.harness import embedded, enroll, gateway, run_rounds

    tokenizer, base = models.load_tokenizer(source), models.load_model(source)
    config = _config(f"bench-{adapter.kind}-{int(time.time())}", ModelDims.from_hf_config(base.config), adapter, lr,
                     source, recipe, clip, min_updates, seed)
    model = trainer.peft_model(base, config.adapter)
    fleet = [d for d, _ in build_fleet(fleet_spec or FleetSpec.spread(DEVICES, CHARS), config, model, tokenizer)]
    if config.tier_ranks:  # heterogeneous ranks: every domain gets one device of each tier, each tier its model
        names = [t for t, _ in adapter.tier_ranks]
        tier_models = {r: trainer.peft_model(models.load_model(source), adapter.for_rank(r)) for r in {r for _, r in
                                                                                                    adapter.tier_ranks}}
        fleet = [Device(d.device_id, config, tier_models[adapter.rank_of(names[i % len(names)])], d.data,
                        config.training, tier=names[i % len(names)]) for i, d in enumerate(fleet)]
    with embedded(Settings(), Path(tempfile.mkdtemp(prefix="ft-bench-"))) as (app, runtime, _), \
            gateway(app, runtime) as (url, admin_key):
        runtime.state.federations.create(config, status="idle")
        clients = enroll(url, admin_key, config.name, fleet)
        runtime.coordinator.begin_training(config.name, recipe.rounds)
        base_eval = runtime.evaluator(config).base
        rows = list(run_rounds(app, runtime, config, fleet, clients, recipe.rounds, progress=False, seed=seed))
        final = runtime.state.evaluations.evaluation(config.name, rows[-1].round if rows else 0)
        from fleettune.shared.protocol import versions

        newest = int(runtime.state.federations.status(config.name)["version"])
        weights = versions.load_weights(runtime.store, config.name, newest, config.spec, 1 << 30, 1 << 20)
        every = [versions.load_weights(runtime.store, config.name, v, config.spec, 1 << 30, 1 << 20)
                 for v in range(1, newest + 1)] if keep_versions else []
        tiers = {}  # each tier's own published adapter, evaluated on its own rank
        for tier, rank in config.tier_ranks.items():
            from fleettune.shared.protocol import versions
            from fleettune.shared.pipeline.evaluation import Evaluator

            version = int(runtime.state.federations.status(config.name)["version"])
            weights = versions.load_tier_weights(runtime.store, config.name, version, rank, config.spec_for(rank),
                                                 1 << 30, 1 << 20)
            evaluator = Evaluator(config.evaluation, adapter.for_rank(rank))
            tiers[tier] = evaluator.perplexities(weights, general=False)["heldout_mean"]
        sizes = [runtime.store.digest(key)[1] for r in rows for d in fleet
                 if runtime.store.exists(key := keys.update_object(config.name, r.round, d.device_id))]
    train = sum(r.train_seconds for r in rows) / len(rows)
    send = sum(r.send_seconds for r in rows) / len(rows)
    steps = sum(r.device_steps for r in rows)  # what the devices did, so the centralized run matches it
    return {"base": base_eval, "final": final, "rounds": [r.heldout_ppl for r in rows], "steps": steps,
            "update_bytes": sum(sizes) / max(len(sizes), 1), "train_s_per_device_round": train,
            "send_s_per_device_round": send, "fleet": fleet, "model": model, "config": config, "tokenizer": tokenizer, "tiers": tiers, "weights": weights,
            "versions": every}


def centralized(run: dict, lr: float | None = None) -> float:
    """The same adapter trained on everyone's data pooled, for the same total number of steps
    (at learning rate `lr`, by default the devices' own)."""
    model, config = run["model"], run["config"]
    from fleettune.shared.pipeline.evaluation import Evaluator

    trainer.load_adapter_weights(model, {k: v for k, v in _initial(config).items()})
    strategy = dataclasses.replace(config.training, local_epochs=10_000, max_steps=run["steps"], proximal_mu=0.0,
                                   local_optimizer="adamw",
                                   learning_rate=lr or config.training.learning_rate)
    trainer.train(model, pooled([(d, "") for d in run["fleet"]]), strategy, seed=0)
    weights = trainer.adapter_weights(model)
    return Evaluator(config.evaluation, config.adapter).perplexities(weights, general=True)["heldout_mean"]


def _initial(config: FederationConfig) -> dict:
    from fleettune.shared.protocol.adapter_spec import initial_weights

    return initial_weights(config.spec, config.seed)


def fed_vs_central(args) -> None:
    recipe = Recipe(args.algorithm, args.rounds, args.max_steps, args.server_lr, args.mu,
                    tuple((k, _number(v)) for k, v in (o.split("=", 1) for o in args.set)), args.clients_per_round,
                    args.local_optimizer)
    run = federated(args.model, AdapterConfig(rank=8, alpha=16), lr=args.lr, recipe=recipe,
                    fleet_spec=FleetSpec.spread(DEVICES, args.chars) if args.chars else None)
    central = centralized(run, args.central_lr)
    fed = run["final"]["heldout_mean"]
    print(f"model {args.model}; {DEVICES} devices over {len(corpora.DOMAINS)} domains, {recipe.rounds} rounds, "
          f"{run['steps']} device steps in all; {recipe}")
    print(f"base held-out perplexity        {run['base']['heldout_mean']:.2f}")
    print(f"federated LoRA, per round       {', '.join(f'{p:.2f}' for p in run['rounds'])}")
    print(f"centralized LoRA, same steps    {central:.2f} (lr {args.central_lr or args.lr:g}; devices lr {args.lr:g})")
    print(f"ratio federated / centralized = {fed / central:.3f} (goal within 5%: <= 1.05)")
    _overhead(run)


def compression(args) -> None:
    """The fed-vs-central recipe with each update encoding: bytes per update and held-out perplexity
    against float32 updates. Training and data are seeded alike, so the gap is the code's."""
    encodings = [(e.split(":")[0], float(e.split(":")[1]) if ":" in e else 0.05) for e in args.encodings.split(",")]
    rows = []
    for encoding, density in encodings:
        recipe = Recipe(args.algorithm, args.rounds, args.max_steps, args.server_lr, args.mu, (), 0,
                        args.local_optimizer, encoding, density)
        run = federated(args.model, AdapterConfig(rank=8, alpha=16), lr=args.lr, recipe=recipe,
                        fleet_spec=FleetSpec.spread(DEVICES, args.chars) if args.chars else None)
        label = f"topk {density:g}" if encoding == "topk" else encoding
        rows.append((label, run["update_bytes"], run["final"]["heldout_mean"]))
        print(f"{label:>10}: {run['update_bytes']:>9,.0f} bytes per update, held-out perplexity "
              f"{run['final']['heldout_mean']:.2f} (rounds: {', '.join(f'{p:.2f}' for p in run['rounds'])})", flush=True)
    ref = next((r for r in rows if r[0] == "float32"), rows[0])
    print(f"\nmodel {args.model}; {DEVICES} non-IID devices, {args.rounds} rounds of "
          f"{args.max_steps or 'one epoch of'} step(s), {args.algorithm}; against {ref[0]} updates")
    print(f"{'encoding':>10} {'bytes/update':>12} {'fewer bytes':>11} {'held-out ppl':>12} {'cost':>7}")
    for label, nbytes, ppl in rows:
        print(f"{label:>10} {nbytes:>12,.0f} {ref[1] / nbytes:>10.2f}x {ppl:>12.2f} {100 * (ppl / ref[2] - 1):>+6.2f}%")


def hetero(args) -> None:
    """Tier ranks 16 / 8 / 4 in one federation: exact (FlexLoRA) against naive zero-padding."""
    tiers = (("high", 16), ("mid", 8), ("low", 4))
    adapter = AdapterConfig(rank=16, alpha=16, tier_ranks=tiers)
    print(f"{DEVICES + 1} devices, one of each tier per domain (ranks {dict(tiers)}), {args.rounds} rounds")
    for lora in ("naive", "exact"):
        recipe = Recipe("fedavg", args.rounds, args.max_steps, args.server_lr, 0.0, (("lora", lora),))
        run = federated(args.model, adapter, args.lr, recipe, FleetSpec.spread(DEVICES + 1, CHARS))
        per_tier = ", ".join(f"{t} (rank {dict(tiers)[t]}) {p:.2f}" for t, p in sorted(run["tiers"].items()))
        print(f"{lora:6s} global rank-16 held-out perplexity {run['final']['heldout_mean']:.2f}; "
              f"each tier's own adapter: {per_tier}", flush=True)


def dp_cost(args) -> None:
    """DP-FedAvg on a sampled population: held-out perplexity without noise and at epsilon 8, 3, 1."""
    delta = 1e-5
    args.chars = args.chars or 3000
    fleet = FleetSpec.spread(args.population, args.chars)
    print(f"{args.population} devices ({args.chars} chars each), Poisson sampling q = {args.rate}, "
          f"{args.rounds} rounds of {args.max_steps or 'one epoch of'} step(s) per device, clip 1.0, delta {delta:g}")
    rows = []
    for target in (None, 8.0, 3.0, 1.0):
        z = 0.0 if target is None else privacy.noise_for(target, args.rate, args.rounds, delta)
        overrides = (("sampling_rate", args.rate),) + ((("dp_noise_multiplier", z),) if z else ())
        recipe = Recipe("dp_fedavg" if z else "fedavg", args.rounds, args.max_steps, args.server_lr, 0.0, overrides)
        run = federated(args.model, AdapterConfig(rank=8, alpha=16), args.lr, recipe, fleet, clip=1.0, min_updates=2)
        eps = privacy.epsilon(z, args.rate, args.rounds, delta) if z else float("inf")
        rows.append((target, z, eps, run["final"]["heldout_mean"], run["base"]["heldout_mean"]))
        print(f"target eps {target}: z = {z:.3f}, eps = {eps:.2f}, held-out perplexity {rows[-1][3]:.2f} "
              f"(base {rows[-1][4]:.2f})", flush=True)
    clean = rows[0][3]
    for target, z, eps, ppl, _ in rows[1:]:
        print(f"epsilon {eps:5.2f} (z {z:.2f}): perplexity {ppl:.2f} = {ppl / clean:.3f}x the noiseless run")


def _recipe(args) -> Recipe:
    return Recipe(args.algorithm, args.rounds, args.max_steps, args.server_lr, args.mu,
                  tuple((k, _number(v)) for k, v in (o.split("=", 1) for o in args.set)), args.clients_per_round,
                  args.local_optimizer, lr_schedule=args.lr_schedule, guard=args.guard,
                  guard_action=args.guard_action)


def _seed_run(args, recipe: Recipe, central: qp.Central, seed: int, scorer: qp.Scorer) -> dict:
    """One seed of the protocol: the federation, then the centralized run on the same tokens."""
    started = time.perf_counter()
    run = federated(args.model, AdapterConfig(rank=8, alpha=16), args.lr, recipe,
                    FleetSpec.spread(DEVICES, args.chars, seed=seed), seed=seed, keep_versions=True)
    fed = qp.federated_trajectory(run["versions"], scorer, time.perf_counter() - started)
    if args.side == "fed":  # no baseline, no ratio: the federation's test and general figures alone
        return {"seed": seed, "fed": fed, "steps": run["steps"], "run": run,
                "fed_test": scorer.score(fed.weights, "test"), "general": scorer.general_ppl(fed.weights)}
    training = run["config"].training
    tokens = run["steps"] * training.batch_size * training.seq_len
    cen = qp.centralized(run["model"], pooled([(d, "") for d in run["fleet"]]), _initial(run["config"]), tokens,
                         central, len(fed.val), lambda w: scorer.score(w, "validation"), seed, patience=PATIENCE)
    out = {"seed": seed, "fed": fed, "central": cen, "tokens": tokens, "steps": run["steps"],
           "fed_test": scorer.score(fed.weights, "test"), "central_test": scorer.score(cen.weights, "test"),
           "bytes_per_device": run["update_bytes"] * len(run["versions"]) * (recipe.clients_per_round or DEVICES)
           / DEVICES, "general": scorer.general_ppl(fed.weights), "run": run}
    out["ratio"] = out["fed_test"] / out["central_test"]
    return out


def tune(args) -> None:
    """The protocol's equal tuning budget, on seed 0's validation text: each learning rate of
    --lr-grid for the federated recipe, each of --central-lr-grid for the centralized baseline
    (the same number of configurations, both with the same early stopping)."""
    recipe = _recipe(args)
    args.chars = args.chars or PROTOCOL_CHARS
    fed_grid, central_grid = _floats(args.lr_grid), _floats(args.central_lr_grid)
    if args.side == "both" and len(fed_grid) != len(central_grid):
        raise SystemExit("an equal budget: --lr-grid and --central-lr-grid need as many values")
    scorer = qp.Scorer(args.model, AdapterConfig(rank=8, alpha=16), test_chars=0)
    print(f"tuning on seed 0's validation text; {recipe}; centralized {args.central_schedule}, "
          f"batch {args.central_batch}", flush=True)
    from fleettune.shared.device.fleet import build_fleet

    config = _config("tune", ModelDims.from_hf_config(scorer.model.config), AdapterConfig(rank=8, alpha=16),
                     args.lr, args.model, recipe)
    fleet = build_fleet(FleetSpec.spread(DEVICES, args.chars, seed=0), config, scorer.model,
                        models.load_tokenizer(args.model))

    def judge(w):
        return scorer.score(w, "validation")

    agg = recipe.aggregation()
    if args.side != "central" and (agg.rule != "mean" or agg.lora == "ffa" or agg.dp_noise_multiplier
                                   or (agg.optimizer != "sgd" and agg.lora == "exact")):
        raise SystemExit("tune's federated side runs the mean (naive or exact LoRA, a server optimizer over "
                         "naive); score other rules with `protocol`")
    if args.exact_momentum and agg.lora != "exact":
        raise SystemExit("--exact-momentum is the exact rule's server momentum: use it with exact aggregation")
    for lr in fed_grid if args.side in ("fed", "both") else ():
        # FedAvg in-process (the same trainer and mean as the tasks, without the services) keeps a
        # grid affordable; the protocol's reported runs go through the real pipeline
        training = dataclasses.replace(config.training, learning_rate=lr)
        shards = [d.data for d, _ in fleet]
        if args.iid:  # the control: the same sequences dealt to the devices at random
            everything = pooled(fleet)
            mixed = everything[torch.randperm(len(everything), generator=torch.Generator().manual_seed(0))]
            shards = list(mixed.chunk(len(fleet)))
        tr = qp.simulated_fedavg(scorer.model, shards, _initial(config), training, recipe.rounds,
                                 judge, 0, exact=agg.lora == "exact",
                                 working_rank=agg.working_rank_factor * config.adapter.rank,
                                 server_lr=config.policy.server_lr, aggregation=agg,
                                 keep_optimizer=args.keep_optimizer, momentum=args.exact_momentum)
        label = f"{recipe.algorithm}{' (IID)' if args.iid else ''}"
        label += f", product-space Nesterov momentum {args.exact_momentum:g}" if args.exact_momentum else ""
        print(f"federated {label}, lr {lr:g}, server lr {config.policy.server_lr:g}, "
              f"{training.lr_schedule}: best validation {min(tr.val):.2f} at round {tr.best + 1} ({tr.seconds:.0f} s); "
              f"per round {', '.join(f'{v:.1f}' for v in tr.val)}", flush=True)
    if args.side in ("central", "both"):
        tokens = DEVICES * recipe.rounds * recipe.max_steps * config.training.batch_size * config.training.seq_len
        for lr in central_grid:
            central = qp.Central(lr, args.central_schedule, args.central_batch)
            tr = qp.centralized(scorer.model, pooled(fleet), _initial(config), tokens, central, recipe.rounds,
                                judge, 0)
            print(f"centralized {central.label()}: best validation {min(tr.val):.2f} at checkpoint {tr.best + 1} "
                  f"({tr.seconds:.0f} s); per checkpoint {', '.join(f'{v:.1f}' for v in tr.val)}", flush=True)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _print_seed(r: dict, base_general: float) -> None:
    seed = r["seed"]
    print(f"seed {seed}: federated test {r['fed_test']:.2f} (round {r['fed'].best + 1} of {len(r['fed'].val)} "
          f"by validation; {r['fed'].seconds:.0f} s), centralized test {r['central_test']:.2f} (checkpoint "
          f"{r['central'].best + 1} of {len(r['central'].val)}; {r['central'].seconds:.0f} s), ratio "
          f"{r['ratio']:.3f}; {r['tokens']:,} training tokens each; "
          f"{r['bytes_per_device'] / 1e6:.2f} MB sent per device; general perplexity "
          f"{r['general']:.2f} ({r['general'] / base_general:.3f}x base)", flush=True)
    print(f"  validation per round, federated: {', '.join(f'{v:.1f}' for v in r['fed'].val)}")
    print(f"  validation per checkpoint, centralized: {', '.join(f'{v:.1f}' for v in r['central'].val)}",
          flush=True)


def protocol(args) -> None:
    """The evaluation protocol (bench/quality_protocol.py) for one recipe over --seeds seeds."""
    recipe = _recipe(args)
    central = qp.Central(args.central_lr or args.lr, args.central_schedule, args.central_batch)
    args.chars = args.chars or PROTOCOL_CHARS
    started = time.perf_counter()
    scorer = qp.Scorer(args.model, AdapterConfig(rank=8, alpha=16))
    base_test, base_general = scorer.score(None, "test"), scorer.general_ppl(None)
    print(f"model {args.model}; {DEVICES} non-IID devices of {args.chars:,} characters over "
          f"{len(corpora.DOMAINS)} domains; {recipe.rounds} rounds of {recipe.max_steps} local steps; {recipe}")
    print(f"centralized: {central.label()}; test tokens per domain {scorer.tokens('test')}; "
          f"base test perplexity {base_test:.2f}, general {base_general:.2f}", flush=True)
    seeds = []
    for seed in range(args.seeds):
        r = _seed_run(args, recipe, central, seed, scorer)
        seeds.append(r)
        if args.side == "fed":
            print(f"seed {seed}: federated test {r['fed_test']:.2f} (round {r['fed'].best + 1} of {len(r['fed'].val)} "
                  f"by validation), general perplexity {r['general']:.2f} ({r['general'] / base_general:.3f}x base); "
                  f"validation per round: {', '.join(f'{v:.1f}' for v in r['fed'].val)}", flush=True)
        else:
            _print_seed(r, base_general)
        if args.personalization:
            rows = qp.personalization(r["run"]["model"], [(d, d.tier) for d in r["run"]["fleet"]], r["fed"].weights,
                                      _initial(r["run"]["config"]), r["steps"] // DEVICES, args.lr, recipe.rounds,
                                      scorer, seed, r["run"]["config"].training)
            r["personal"] = rows
            for row in rows:
                print(f"  {row['device']:>34} ({row['domain']}): own-domain test perplexity local-only "
                      f"{row['local']:.2f}, global {row['global']:.2f}, group {row['group']:.2f}, personalized "
                      f"{row['personalized']:.2f} (group weight {row['mix']:g})", flush=True)
    if args.personalization:
        print("personalization, mean over seeds [95 % interval], each device on its own domain's test text "
              "(a device's data differs by seed; its position and domain do not):")
        for i, first in enumerate(seeds[0]["personal"]):
            cells = {k: [r["personal"][i][k] for r in seeds] for k in ("local", "global", "group", "personalized")}
            wins = sum(r["personal"][i]["personalized"] < min(r["personal"][i]["local"], r["personal"][i]["global"])
                       for r in seeds)
            means = {k: statistics.fmean(v) for k, v in cells.items()}
            best = "yes" if means["personalized"] < min(means["local"], means["global"]) else "no"
            print(f"  device {i} ({first['domain']}): " + ", ".join(f"{k} {qp.fmt(v, 1)}" for k, v in cells.items())
                  + f"; personalized best on {wins} of {len(seeds)} seeds, in the mean: {best}")
    if args.side == "fed":
        print(f"federated test perplexity {qp.fmt([r['fed_test'] for r in seeds], 2)}; general perplexity / base "
              f"{qp.fmt([r['general'] / base_general for r in seeds])}")
        print(f"wall time {time.perf_counter() - started:.0f} s")
        return
    ratios = [r["ratio"] for r in seeds]
    print(f"federated test perplexity {qp.fmt([r['fed_test'] for r in seeds], 2)}, centralized "
          f"{qp.fmt([r['central_test'] for r in seeds], 2)}; general perplexity / base "
          f"{qp.fmt([r['general'] / base_general for r in seeds])}; sent per device "
          f"{statistics.fmean(r['bytes_per_device'] for r in seeds) / 1e6:.2f} MB over {recipe.rounds} rounds")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    mean, lo, hi = qp.interval(ratios)
    print(f"protocol {args.model}: test ratio federated / centralized = {mean:.3f} [{lo:.3f}, {hi:.3f}] at "
          f"{recipe.rounds} rounds, {recipe.max_steps} local steps, {len(seeds)} seeds")


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def prompt(args) -> None:
    run = federated(args.model, AdapterConfig(kind="prompt_tuning", num_virtual_tokens=16), lr=args.lr)
    b, f = run["base"]["heldout_mean"], run["final"]["heldout_mean"]
    print(f"prompt tuning (16 virtual tokens) through the pipeline, {ROUNDS} rounds x {DEVICES} devices")
    print(f"held-out perplexity {b:.2f} -> {f:.2f}: gain {100 * (b - f) / b:.1f}%  per round: "
          f"{', '.join(f'{p:.2f}' for p in run['rounds'])}")
    _overhead(run)


def _overhead(run: dict) -> None:
    share = run["send_s_per_device_round"] / run["train_s_per_device_round"]
    print(f"device federation overhead (delta + encode + upload + submit) / local epoch = {100 * share:.2f}% (goal <= 5%)")


def _child_train(source: str, quantize: bool, steps: int) -> dict:
    """In a fresh process: load, train LoRA for `steps`, report held-out perplexity and peak RSS."""
    torch.set_num_threads(2)
    tokenizer, base = models.load_tokenizer(source), models.load_model(source, quantize_4bit=quantize)
    if quantize:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    adapter = AdapterConfig(rank=8, alpha=16)
    model = trainer.peft_model(base, adapter)
    load_peak_mb = _kib("VmHWM") * 1024 / 1e6
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak: measure training on its own
    strategy = LocalTraining(learning_rate=5e-3, batch_size=8, seq_len=128, local_epochs=100, max_steps=steps)
    text = "\n\n".join(corpora.train_text(d, 40_000, seed=2) for d in corpora.DOMAINS)
    result = trainer.train(model, trainer.blocks(tokenizer(text)["input_ids"], 128), strategy, seed=0)
    heldout = {d: trainer.perplexity(model, trainer.blocks(tokenizer(corpora.heldout_text(d, 8000))["input_ids"], 128))
               for d in corpora.DOMAINS}
    return {"heldout_mean": sum(heldout.values()) / len(heldout), "peak_mb": _kib("VmHWM") * 1024 / 1e6,
            "load_peak_mb": load_peak_mb,
            "seconds": result.seconds, "steps": result.steps,
            "params": sum(p.numel() for p in base.parameters()), "dims": dataclasses.asdict(ModelDims.from_hf_config(base.config)),
            "adapter_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _kib(field: str) -> int:
    return int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(field + ":")))


def _in_child(source: str, quantize: bool, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "child", "--model", source, "--steps", str(steps)]
                         + (["--quantize"] if quantize else []), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def qlora(args) -> None:
    source = args.model
    if source == "smollm2":  # the 4-bit loader needs a plain checkpoint, not the GGUF file
        source = str(models.materialize("smollm2", Path(tempfile.gettempdir()) / "fleettune-smollm2-hf"))
    lora, q = _in_child(source, False, args.steps), _in_child(source, True, args.steps)
    print(f"{args.model}, LoRA r=8 q/k/v/o, {args.steps} steps of 8 x 128 tokens, one process each")
    for name, r in (("LoRA, fp32 base ", lora), ("QLoRA, NF4 base ", q)):
        print(f"{name} held-out perplexity {r['heldout_mean']:8.2f}  peak RSS training {r['peak_mb']:7.1f} MB"
              f" (loading {r['load_peak_mb']:7.1f} MB)  {r['seconds']:.1f}s")
    print(f"QLoRA / LoRA: perplexity {q['heldout_mean'] / lora['heldout_mean']:.3f}, "
          f"peak RSS in training {q['peak_mb'] / lora['peak_mb']:.3f}")


def memory_check(args) -> None:
    r = _in_child(args.model, False, args.steps)
    dims = ModelDims(**r["dims"])
    est = memory.estimate(r["params"], r["adapter_params"], dims, bits=32, batch=8, seq=128, act_bytes=4)
    total = est.total / 1e6
    print(f"{args.model}: {r['params'] / 1e6:.2f} M parameters, {r['adapter_params']:,} trainable, batch 8 x 128, fp32")
    print(f"estimate {est.as_mb()} MB")
    print(f"measured peak RSS in training {r['peak_mb']:.1f} MB (loading {r['load_peak_mb']:.1f} MB); error (estimate - measured) / measured = "
          f"{100 * (total - r['peak_mb']) / r['peak_mb']:+.1f}%")


def tiers(args) -> None:
    """Tier 1 federates LoRA on SmolLM2; tiers 2 and 3 get it distilled onto the tiny model (LoRA and
    a soft prompt). Each tier's held-out perplexity against its own base, and, to isolate what the
    federation contributed, the same distillation from SmolLM2 without the federated adapter."""
    from fleettune.shared.pipeline.distill import Distillation
    from fleettune.shared.pipeline.distill import distill, student_adapter
    from fleettune.shared.pipeline.evaluation import Evaluator

    lr = args.lr
    run = federated("smollm2", AdapterConfig(rank=8, alpha=16), lr, Recipe(rounds=args.rounds),
                    FleetSpec.spread(4, args.chars or 16_000), min_updates=4)
    print(f"tier 1  SmolLM2 + federated LoRA ({args.rounds} rounds, 4 devices): held-out perplexity "
          f"{run['final']['heldout_mean']:.2f} vs its base {run['base']['heldout_mean']:.2f}")
    teacher, domains = run["model"], run["config"].evaluation.domains
    tiny_tok = models.load_tokenizer("tiny")
    evaluation = EvaluationConfig(base_model="tiny", eval_chars=EVAL_CHARS, forgetting_threshold=100.0)
    for tier, kind, learning_rate in (("2", "lora", 5e-3), ("3", "prompt_tuning", 3e-2)):
        config = Distillation(kind=kind, learning_rate=learning_rate, steps=args.steps, prompts=args.prompts)
        results = {}
        for label, weights in (("federated v" + str(args.rounds), run["weights"]), ("base SmolLM2", None)):
            if weights is None:
                with teacher.disable_adapter():
                    done = distill(teacher, run["tokenizer"], models.load_model("tiny"), tiny_tok, config, domains)
            else:
                trainer.load_adapter_weights(teacher, weights)
                done = distill(teacher, run["tokenizer"], models.load_model("tiny"), tiny_tok, config, domains)
            evaluator = Evaluator(evaluation, student_adapter(config))
            results[label] = evaluator.perplexities(done.weights, general=False)["heldout_mean"]
            base = evaluator.base["heldout_mean"]
        print(f"tier {tier}  tiny + distilled {kind}: held-out perplexity {results['federated v' + str(args.rounds)]:.2f} "
              f"vs its base {base:.2f}; distilled from SmolLM2 without the federated adapter: "
              f"{results['base SmolLM2']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["fed-vs-central", "prompt", "qlora", "memory", "dp", "hetero", "tiers",
                                         "compression", "protocol", "tune", "child"])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--steps", type=int, default=30, help="qlora: training steps; tiers: distillation steps")
    parser.add_argument("--prompts", type=int, default=32, help="tiers: teacher continuations to distil on")
    parser.add_argument("--quantize", action="store_true")
    parser.add_argument("--algorithm", default="fedavg", help="an aggregation preset (AggregationConfig.preset)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--central-lr", type=float, default=None,
                        help="the centralized baseline's learning rate (default: the devices')")
    parser.add_argument("--max-steps", type=int, default=0, help="steps per device per round (0: one epoch)")
    parser.add_argument("--server-lr", type=float, default=None)
    parser.add_argument("--clients-per-round", type=int, default=0, help="devices the server picks per round")
    parser.add_argument("--local-optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--eval-chars", type=int, default=12_000, help="held-out characters per domain")
    parser.add_argument("--mu", type=float, default=0.0, help="FedProx proximal mu")
    parser.add_argument("--population", type=int, default=300, help="dp: devices enrolled")
    parser.add_argument("--rate", type=float, default=0.2, help="dp: Poisson sampling rate per round")
    parser.add_argument("--chars", type=int, default=None, help="text per device (fed-vs-central: 24,000; dp: 3,000)")
    parser.add_argument("--encodings", default="float32,float16,int8,int4,topk:0.05,topk:0.02",
                        help="compression: update encodings to compare (topk:DENSITY)")
    parser.add_argument("--seeds", type=int, default=3, help="protocol: seeds")
    parser.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                        help="the devices' learning rate across rounds")
    parser.add_argument("--personalization", action="store_true",
                        help="protocol: each device on its own domain: local-only, global, personalized")
    parser.add_argument("--lr-grid", default="0.003,0.01,0.03", help="tune: the devices' learning rates")
    parser.add_argument("--central-lr-grid", default="0.001,0.003,0.01", help="tune: the centralized run's")
    parser.add_argument("--side", default="both", choices=["both", "fed", "central"],
                        help="tune: one side only (the two sides can run as two processes); protocol: fed skips the "
                             "centralized baseline (the federation's test and general figures, no ratio)")
    parser.add_argument("--guard", type=float, default=100.0,
                        help="the forgetting guard's threshold, general perplexity / base (100: off)")
    parser.add_argument("--guard-action", choices=["lower_lr", "halt", "interpolate"], default="lower_lr",
                        help="what the guard does past its threshold (interpolate: each version scaled toward the base)")
    parser.add_argument("--central-schedule", default="cosine", choices=["cosine", "constant"])
    parser.add_argument("--central-batch", type=int, default=8)
    parser.add_argument("--iid", action="store_true",
                        help="tune: deal the fleet's sequences to the devices at random (an IID control)")
    parser.add_argument("--keep-optimizer", action="store_true",
                        help="tune: each device keeps its local Adam moments from round to round")
    parser.add_argument("--exact-momentum", type=float, default=0.0, metavar="BETA",
                        help="tune, exact aggregation: Nesterov server momentum in the product space (DiLoCo's "
                             "outer step)")
    parser.add_argument("--threads", type=int, default=2,
                        help="protocol, tune: torch threads (1 lets two runs share the 2 cores)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="an AggregationConfig field, e.g. --set lora=ffa")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what in ("protocol", "tune"):
        torch.set_num_threads(args.threads)  # 2 by default: alone on the 2 cores, so its wall time means something
        for name, value in PROTOCOL_DEFAULTS.items():
            if f"--{name.replace('_', '-')}" not in sys.argv:
                setattr(args, name, value)
    global EVAL_CHARS  # noqa: PLW0603 (one knob read deep in _config)
    EVAL_CHARS = args.eval_chars
    if args.what == "child":
        print(json.dumps(_child_train(args.model, args.quantize, args.steps)))
        return
    if args.lr is None:
        args.lr = 3e-2 if args.what == "prompt" else 5e-3
    {"fed-vs-central": fed_vs_central, "prompt": prompt, "qlora": qlora, "memory": memory_check,
     "dp": dp_cost, "hetero": hetero, "tiers": tiers, "compression": compression,
     "protocol": protocol, "tune": tune}[args.what](args)


if __name__ == "__main__":
    main()
