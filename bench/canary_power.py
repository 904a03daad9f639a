"""How often a canary rollout stalls: the device gate's power on a small fleet, over random rollout ids.

    python bench/canary_power.py [--devices 150] [--percents 10 20] [--bad-lrs 1e-2 3e-2] [--draws 2000]

Trains the integration test's versions on the tiny model (v1: 40 steps on legal text; v2: then 40
steps on shuffled tokens at each --bad-lr), measures every device's loss on its own held-out text
(256 tokens each), then draws rollout ids. For each it takes the canary arm (shared/control/canary.py
bucketing) and compares the arms once every device has reported, the most evidence a fixed fleet
can give. A rollout of v2 that does not breach then, or of v1 (from v0) that is not within margins at
each step, stays active for good. Prints the share of draws that stall, and the smallest arm drawn.
"""

from __future__ import annotations

import argparse
import uuid

import torch

from fleettune.shared import corpora
from fleettune.shared.control import canary
from fleettune.shared.device import models, trainer
from fleettune.shared.federation import LocalTraining
from fleettune.shared.protocol.adapter_spec import AdapterConfig

GATES = dict(min_reports=5, max_perplexity_ratio=100, max_forgetting_ratio=100)  # the test's


def per_device_losses(model, text: torch.Tensor, devices: int) -> list[float]:
    with torch.no_grad():
        return [model(input_ids=b, labels=b).loss.item() for b in text[:4 * devices].split(4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=150)
    ap.add_argument("--percents", type=float, nargs="+", default=[10, 20])
    ap.add_argument("--bad-lrs", type=float, nargs="+", default=[1e-2, 3e-2])
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tokenizer, base = models.load_tokenizer("tiny"), models.load_model("tiny")
    model = trainer.peft_model(base, AdapterConfig(rank=8, alpha=16))
    text = trainer.blocks(tokenizer(corpora.train_text("legal", 60_000))["input_ids"], 64)
    heldout = trainer.blocks(tokenizer(corpora.heldout_text("legal", 120_000))["input_ids"], 64)
    garbage = text.flatten()[torch.randperm(text.numel(), generator=torch.Generator().manual_seed(0))].view_as(text)

    def train(data, lr, start):
        trainer.load_adapter_weights(model, start)
        trainer.train(model, data, LocalTraining(learning_rate=lr, batch_size=8, max_steps=40, seq_len=64), seed=0)
        return {k: v.clone() for k, v in trainer.adapter_weights(model).items()}

    v0 = {k: v.clone() for k, v in trainer.adapter_weights(model).items()}  # B = 0: the base model's loss
    v1 = train(text, 1e-3, v0)
    losses = {}
    for name, weights in [("v0", v0), ("v1", v1)] + [(f"v2@{lr:g}", train(garbage, lr, v1)) for lr in args.bad_lrs]:
        trainer.load_adapter_weights(model, weights)
        losses[name] = per_device_losses(model, heldout, args.devices)
    ids = [f"user-{i}" for i in range(args.devices)]

    def stalls(candidate, control, percents, need) -> int:
        gates = canary.Gates(**GATES)
        out = 0
        for _ in range(args.draws):
            rid = uuid.uuid4().hex
            for pct in percents:
                arm = {i for i, d in enumerate(ids) if canary.in_canary(rid, d, pct)}
                comps = canary.compare_arms([{"eval_loss": losses[candidate][i]} for i in arm],
                                            [{"eval_loss": losses[control][i]} for i in range(len(ids)) if i not in arm],
                                            gates)
                if not comps or not getattr(comps[0], need):
                    out += 1
                    break
        return out

    for name, values in losses.items():
        mean = sum(values) / len(values)
        sd = (sum((x - mean) ** 2 for x in values) / (len(values) - 1)) ** 0.5
        print(f"{name}: mean per-device loss {mean:.4f} (sd {sd:.4f})")
    for pct in args.percents:
        steps = [p for p in (pct, pct + 30, pct + 60) if p < 100]
        print(f"start {pct:g} %, {args.devices} devices, {args.draws} rollout ids:")
        print(f"  good (v1 over v0, steps {steps}): stalled {stalls('v1', 'v0', steps, 'within')}")
        for lr in args.bad_lrs:
            name = f"v2@{lr:g}"
            gap = sum(losses[name]) / args.devices - sum(losses["v1"]) / args.devices
            print(f"  bad ({name} over v1, {gap:+.2f} nats): never breached {stalls(name, 'v1', [pct], 'breached')}")


if __name__ == "__main__":
    main()
