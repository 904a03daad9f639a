"""The evaluation protocol behind the quality figures (issue 22), used by bench/quality.py.

- Held-out documents are split in two by a hash of their names (corpora.heldout_text's `part`):
  every choice (learning rates, schedule, which round or checkpoint to keep) is made on the
  validation half; only the test half is reported.
- The centralized baseline trains on everyone's data pooled and processes the same tokens as the
  whole federation (device steps × batch × sequence length). It gets the same tuning budget as
  the federated recipe: as many configurations, scored on validation, and early stopping at as
  many checkpoints as the federation has rounds.
- Every configuration runs on several seeds (the fleet's data draw, the adapter's initialisation,
  the batch order); ratios are given as the mean and a 95 % Student-t interval over seeds.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import torch

from fleettune.shared import corpora
from fleettune.shared.device import models, trainer
from fleettune.shared.protocol.adapter_spec import AdapterConfig

SEQ_LEN = 128
VAL_CHARS, TEST_CHARS = 60_000, 170_000  # per domain; the test half gives >= 55k tokens of each


class Scorer:
    """Tokenised validation and test halves of the held-out text; scores any adapter weights."""

    def __init__(self, source: str, adapter: AdapterConfig, val_chars: int = VAL_CHARS,
                 test_chars: int = TEST_CHARS, domains: tuple[str, ...] = corpora.DOMAINS) -> None:
        tokenizer = models.load_tokenizer(source)
        self.model = trainer.peft_model(models.load_model(source), adapter)

        def encode(domain: str, chars: int, part: corpora.HeldoutPart) -> torch.Tensor:
            return trainer.blocks(tokenizer(corpora.heldout_text(domain, chars, part))["input_ids"], SEQ_LEN)

        self.sets = {"validation": {d: encode(d, val_chars, "validation") for d in domains},
                     "test": {d: encode(d, test_chars, "test") for d in domains} if test_chars else {}}
        self.general = encode("general", val_chars, "all")

    def tokens(self, part: str) -> dict[str, int]:
        return {d: data.numel() for d, data in self.sets[part].items()}

    def domains(self, weights, part: str) -> dict[str, float]:
        self._load(weights)
        return {d: trainer.perplexity(self.model, data) for d, data in self.sets[part].items()}

    def score(self, weights, part: str) -> float:
        """Geometric mean of the domains' perplexities (they differ by an order of magnitude)."""
        values = self.domains(weights, part).values()
        return math.exp(sum(math.log(v) for v in values) / len(values))

    def domain(self, weights, domain: str, part: str) -> float:
        self._load(weights)
        return trainer.perplexity(self.model, self.sets[part][domain])

    def general_ppl(self, weights) -> float:
        self._load(weights)
        return trainer.perplexity(self.model, self.general)

    def _load(self, weights) -> None:
        if weights is None:
            trainer.load_adapter_weights(self.model, {k: torch.zeros_like(v) if "lora_B" in k else v
                                                      for k, v in trainer.adapter_weights(self.model).items()})
        else:
            trainer.load_adapter_weights(self.model, weights)


@dataclasses.dataclass(frozen=True)
class Central:
    """One centralized configuration: AdamW on the pooled data."""

    lr: float = 3e-3
    schedule: str = "cosine"  # or "constant"
    batch_size: int = 8
    beta2: float = 0.999
    warmup: float = 0.05  # share of the steps with a linear warm-up

    def label(self) -> str:
        return f"lr {self.lr:g}, {self.schedule}, batch {self.batch_size}, β2 {self.beta2:g}"


@dataclasses.dataclass
class Trajectory:
    """Validation perplexity at each checkpoint, and the kept (best on validation) checkpoint."""

    val: list[float]
    best: int  # index into val
    weights: dict  # the kept checkpoint's adapter
    seconds: float


def best_of(val: list[float]) -> int:
    return min(range(len(val)), key=val.__getitem__)


def centralized(model, data: torch.Tensor, initial: dict, tokens: int, config: Central, checkpoints: int,
                judge: Callable[[dict], float], seed: int, patience: int = 0) -> Trajectory:
    """Train on `data` (pooled sequences) for `tokens` tokens, scoring validation (`judge`) at
    `checkpoints` evenly spaced points and keeping the best one; with `patience`, stop once that
    many checkpoints in a row were no better (the kept checkpoint is what it would have been
    unless validation recovered later)."""
    trainer.load_adapter_weights(model, initial)
    steps = max(1, round(tokens / (config.batch_size * data.shape[1])))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, config.beta2), weight_decay=0.0)
    warm = max(1, int(config.warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    marks = {round(steps * (i + 1) / checkpoints) for i in range(checkpoints)}
    val, kept, start = [], None, time.perf_counter()
    order, pos = torch.randperm(len(data), generator=gen), 0
    for step in range(1, steps + 1):
        model.train()
        if pos + config.batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        batch = data[order[pos:pos + config.batch_size]]
        pos += config.batch_size
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step in marks:
            weights = trainer.adapter_weights(model)
            val.append(judge(weights))
            if best_of(val) == len(val) - 1:
                kept = {k: v.clone() for k, v in weights.items()}
            elif patience and len(val) - 1 - best_of(val) >= patience:
                break
    return Trajectory(val, best_of(val), kept, time.perf_counter() - start)


def federated_trajectory(versions: list[dict], scorer: Scorer, seconds: float) -> Trajectory:
    val = [scorer.score(w, "validation") for w in versions]
    best = best_of(val)
    return Trajectory(val, best, versions[best], seconds)


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval over seeds."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def fmt(values: list[float], digits: int = 3) -> str:
    mean, lo, hi = interval(values)
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


GROUP_LRS, GROUP_ROUNDS = (1e-3, 3e-3), 10  # the group fine-tune's grid, chosen on validation


def personalization(model, fleet, global_weights: dict, initial: dict, device_steps: int, lr: float,
                    checkpoints: int, scorer: Scorer, seed: int, training) -> list[dict]:
    """Each device's perplexity on its own domain's test text four ways:
    - local-only: its own data from the initial adapter, as many steps as it took in the federation,
      cosine, the best of `checkpoints` checkpoints on its domain's validation;
    - global: the federation's adapter;
    - group: the devices of one group (here their domain, the fleet's tier)
      federate from the global adapter, up to GROUP_ROUNDS rounds of the federation's local steps,
      exact aggregation, the round and the lr (GROUP_LRS) chosen on the domain's validation, the
      global adapter itself among the candidates. One device's text overfits within a few rounds'
      steps (fine-tuning the global on it alone rarely beat the global on validation,
      docs/quality.md); the group's pooled updates do not;
    - personalized: the group's adapter mixed with the device's local-only one (weight on validation)."""
    groups: dict[str, list] = {}
    for device, domain in fleet:
        groups.setdefault(domain, []).append(device)
    personal = {}
    for g, (domain, members) in enumerate(groups.items()):
        def judge(w, d=domain):
            return scorer.domain(w, d, "validation")

        best, keep = judge(global_weights), global_weights
        for group_lr in GROUP_LRS:
            tr = simulated_fedavg(model, [d.data for d in members], global_weights,
                                  dataclasses.replace(training, learning_rate=group_lr), GROUP_ROUNDS, judge,
                                  seed * 1013 + g, exact=True)
            if min(tr.val) < best:
                best, keep = min(tr.val), tr.weights
        personal[domain] = keep
    rows = []
    for i, (device, domain) in enumerate(fleet):
        batch = device.strategy.batch_size
        tokens = device_steps * batch * device.data.shape[1]
        alone = centralized(model, device.data, initial, tokens, Central(lr, "cosine", batch), checkpoints,
                            lambda w, d=domain: scorer.domain(w, d, "validation"), seed * 1009 + i, patience=5)
        # the device mixes its group's adapter with its own (model interpolation, Mansour et al.
        # 2020), the weight chosen on validation; 1 keeps the group's, 0 its own
        mixes = {a: interpolate(personal[domain], alone.weights, a) for a in MIX_WEIGHTS}
        chosen = min(mixes, key=lambda a: scorer.domain(mixes[a], domain, "validation"))
        rows.append({"device": device.device_id, "domain": domain,
                     "local": scorer.domain(alone.weights, domain, "test"),
                     "global": scorer.domain(global_weights, domain, "test"),
                     "group": scorer.domain(personal[domain], domain, "test"),
                     "personalized": scorer.domain(mixes[chosen], domain, "test"), "mix": chosen})
    return rows


MIX_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolate(first: dict, second: dict, weight: float) -> dict:
    """weight·first + (1 - weight)·second in the model's space: each LoRA layer's B·A products
    mixed and re-factorised to the adapter's rank, as the server's exact aggregation does."""
    from fleettune.shared.strategies.exact_lora import LowRankSum, lora_pairs

    out = {k: weight * first[k] + (1 - weight) * second[k] for k in first}
    for b, a in lora_pairs(set(first)).values():
        mixed = LowRankSum(first[b].shape[0], first[a].shape[1], cap=4 * first[b].shape[1])
        mixed.add(first[b].double(), first[a].double(), weight)
        mixed.add(second[b].double(), second[a].double(), 1 - weight)
        merged = mixed.factorise(first[b].shape[1])
        out[b], out[a] = merged.B.float(), merged.A.float()
    return out


def simulated_fedavg(model, fleet_data: list[torch.Tensor], initial: dict, training, rounds: int,
                     judge: Callable[[dict], float], seed: int, exact: bool = False,
                     working_rank: int = 16, server_lr: float = 1.0, aggregation=None,
                     keep_optimizer: bool = False, momentum: float = 0.0) -> Trajectory:
    """FedAvg in one process with the devices' own trainer, for tuning only: sample-weighted mean
    of the deltas (with `exact`, of each layer's product B·A, re-factorised as the server's exact
    aggregation does, streaming at `working_rank`), times `server_lr`, no clip (the reported runs
    go through the real tasks). With SCAFFOLD (the `aggregation`'s drift control), every device
    keeps a control variate c_i (its last round's mean raw gradient) and trains with c - c_i added
    to its gradients, as the devices do.
    With an `aggregation` whose optimizer is not sgd (FedAvgM, FedAdam...), the mean delta goes
    through the server's own optimizer step (shared/strategies/server_optimizers.py).
    With `exact` and `momentum` β > 0, the server keeps Nesterov momentum in the product space
    (DiLoCo's outer step): D = mean of products - global, M = β M + D (kept at rank 4r),
    global += server_lr (β M + D), re-factorised. Not in the pipeline: tuning only.
    Scores validation after every round."""
    from fleettune.shared.strategies import server_optimizers
    from fleettune.shared.strategies.exact_lora import LowRankSum, lora_pairs

    weights = {k: v.clone().float() for k, v in initial.items()}
    val, kept, start = [], None, time.perf_counter()
    scaffold = aggregation is not None and aggregation.drift_control == "scaffold"
    opt_state: dict = {}
    local_states = [{} for _ in fleet_data]  # with keep_optimizer: each device's Adam moments across rounds
    controls = [{k: torch.zeros_like(v) for k, v in weights.items()} for _ in fleet_data] if scaffold else None
    for r in range(1, rounds + 1):
        strategy = training.for_round(r, rounds)
        total, acc, trained = 0, {k: torch.zeros_like(v) for k, v in weights.items()}, []
        mean_control = {k: sum(c[k] for c in controls) / len(controls) for k in weights} if scaffold else None
        for i, data in enumerate(fleet_data):
            trainer.load_adapter_weights(model, weights)
            correction = {k: mean_control[k] - controls[i][k] for k in weights} if scaffold else None
            result = trainer.train(model, data, strategy, seed=seed * 100_003 + r * 31 + i, correction=correction,
                                   optimizer_state=local_states[i] if keep_optimizer else None)
            if scaffold:
                controls[i] = {k: v.clone() for k, v in result.mean_gradients.items()}
            after = trainer.adapter_weights(model)
            for k in acc:
                acc[k] += result.samples * (after[k] - weights[k])
            total += result.samples
            trained.append((result.samples, after))
        before = weights
        if aggregation is not None and aggregation.optimizer != "sgd":
            weights, opt_state = server_optimizers.step(
                aggregation.optimizer, weights, {k: acc[k] / total for k in weights}, opt_state, server_lr,
                aggregation.beta1, aggregation.beta2, aggregation.tau, aggregation.bias_correction)
        else:
            weights = {k: weights[k] + server_lr * acc[k] / total for k in weights}
        for prefix, (b, a) in lora_pairs(set(weights)).items() if exact and momentum else ():
            rank = weights[b].shape[1]
            drift = LowRankSum(weights[b].shape[0], weights[a].shape[1], cap=64 * rank)
            for samples, after in trained:
                drift.add(after[b].double(), after[a].double(), samples / total)
            drift.add(before[b].double(), before[a].double(), -1.0)
            step = LowRankSum(weights[b].shape[0], weights[a].shape[1], cap=64 * rank)
            if prefix in opt_state:
                drift.add(*opt_state[prefix], momentum)  # M = β M + D
            kept = drift.factorise(4 * rank)
            opt_state[prefix] = (kept.B, kept.A)
            step.add(before[b].double(), before[a].double(), 1.0)
            step.add(kept.B, kept.A, server_lr * momentum)  # Nesterov: β M + D
            for samples, after in trained:
                step.add(after[b].double(), after[a].double(), server_lr * samples / total)
            step.add(before[b].double(), before[a].double(), -server_lr)
            merged = step.factorise(rank)
            weights[b], weights[a] = merged.B.float(), merged.A.float()
        for b, a in lora_pairs(set(weights)).values() if exact and not momentum else ():
            # the server's exact rule: base + lr (mean of products - base), as shared/strategies/combine.py
            products = LowRankSum(weights[b].shape[0], weights[a].shape[1], cap=working_rank)
            for samples, after in trained:
                products.add(after[b].double(), after[a].double(), server_lr * samples / total)
            if server_lr != 1.0:
                products.add(before[b].double(), before[a].double(), 1.0 - server_lr)
            merged = products.factorise(weights[b].shape[1])
            weights[b], weights[a] = merged.B.float(), merged.A.float()
        val.append(judge(weights))
        if best_of(val) == len(val) - 1:
            kept = {k: v.clone() for k, v in weights.items()}
    return Trajectory(val, best_of(val), kept, time.perf_counter() - start)
