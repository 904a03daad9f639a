"""Local adapter training with PEFT, and the delta a device sends."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping

import torch

from fleettune.shared.protocol.adapter_spec import AdapterConfig
from fleettune.shared.federation import LocalTraining


@dataclasses.dataclass(frozen=True)
class TrainResult:
    steps: int
    samples: int  # sequences trained on (the FedAvg weight)
    loss: float  # mean loss over the round
    seconds: float
    # SCAFFOLD: the mean raw gradient of each adapter tensor over the round's steps (by adapter key)
    mean_gradients: dict[str, torch.Tensor] | None = None


def peft_model(base: torch.nn.Module, adapter: AdapterConfig):
    """Wrap a frozen base (loaded 4-bit for QLoRA, see models.load_model) with the adapter."""
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model, \
        prepare_model_for_kbit_training

    if adapter.quantized_base:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)

    if adapter.kind == "prompt_tuning":
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=adapter.num_virtual_tokens,
                                    prompt_tuning_init=PromptTuningInit.RANDOM)
    else:
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=adapter.rank, lora_alpha=adapter.alpha,
                            lora_dropout=adapter.dropout, target_modules=list(adapter.target_modules), bias="none")
    return get_peft_model(base, config)


def release(model) -> torch.nn.Module:
    """The base model without adapter layers, for reuse (LoRA injects layers; prompt tuning does not)."""
    if model.peft_config[model.active_adapter].is_prompt_learning:
        return model.get_base_model()
    return model.unload()


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names, detached copies in float32."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_weights(model, weights: Mapping[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, dict(weights))
    # for prompt learning PEFT loads the embedding itself, then lists it as unexpected anyway
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if k != "prompt_embeddings"]
    if unexpected:
        raise ValueError(f"adapter keys the model does not have: {unexpected[:3]}")


def blocks(token_ids: list[int], seq_len: int) -> torch.Tensor:
    """Non-overlapping training sequences of seq_len tokens."""
    n = len(token_ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(token_ids)} tokens are fewer than one sequence of {seq_len}")
    return torch.tensor(token_ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def train(model, data: torch.Tensor, strategy: LocalTraining, seed: int, freeze_lora_a: bool = False,
          correction: Mapping[str, torch.Tensor] | None = None, optimizer_state: dict | None = None) -> TrainResult:
    """Train the adapter's parameters in place: AdamW (or SGD), gradient clipping, local_epochs over data.

    `freeze_lora_a`: FFA-LoRA, only the B factors train. `strategy.proximal_mu` > 0: FedProx, the
    loss gets mu/2 * ||w - w_start||^2, which keeps a device near the global adapter it started from.
    `optimizer_state`: a dict the caller keeps between rounds; the optimizer resumes from its
    moments and leaves its own there (stateful devices, measured in docs/quality.md).
    `correction`: SCAFFOLD's c - c_i by adapter key, added to every gradient; the result then
    carries the mean raw gradient, the device's next c_i (option II in gradient units, which stays
    right under a local Adam, where (x - y) / (K·η) would not).
    """
    frozen = [p for n, p in model.named_parameters() if freeze_lora_a and "lora_A" in n and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return _train(model, data, strategy, seed, correction, optimizer_state)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def adapter_key(parameter_name: str) -> str:
    """A trainable LoRA parameter's name as its key in the saved adapter (PEFT drops the adapter name)."""
    return parameter_name.replace(".default", "")


def _train(model, data: torch.Tensor, strategy: LocalTraining, seed: int,
           correction: Mapping[str, torch.Tensor] | None, optimizer_state: dict | None = None) -> TrainResult:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    shifts = [(p, correction[adapter_key(n)]) for n, p in named if adapter_key(n) in correction] if correction else []
    sums = {adapter_key(n): torch.zeros_like(p) for n, p in named if adapter_key(n) in correction} \
        if correction else None
    anchor = [p.detach().clone() for p in params] if strategy.proximal_mu > 0 else None
    if strategy.local_optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=strategy.learning_rate, weight_decay=strategy.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=strategy.learning_rate, weight_decay=strategy.weight_decay)
    if optimizer_state:  # the moments this device kept from its last round; this round's lr stays
        opt.load_state_dict({"state": optimizer_state["state"], "param_groups": opt.state_dict()["param_groups"]})
    gen = torch.Generator().manual_seed(seed)
    model.train()
    steps, samples, total_loss, start = 0, 0, 0.0, time.perf_counter()
    for _ in range(strategy.local_epochs):
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(order), strategy.batch_size):
            if strategy.max_steps and steps >= strategy.max_steps:
                break
            batch = data[order[i:i + strategy.batch_size]]
            loss = model(input_ids=batch, labels=batch).loss
            objective = loss
            if anchor is not None:
                objective = loss + strategy.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            objective.backward()
            if sums is not None:
                for n, p in named:
                    if adapter_key(n) in sums:
                        sums[adapter_key(n)].add_(p.grad)
            for p, shift in shifts:  # SCAFFOLD: g - c_i + c
                p.grad.add_(shift)
            torch.nn.utils.clip_grad_norm_(params, strategy.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps, samples, total_loss = steps + 1, samples + len(batch), total_loss + loss.item()
    model.eval()
    if optimizer_state is not None:
        optimizer_state["state"] = {i: {k: v.clone() for k, v in st.items()}
                                    for i, st in opt.state_dict()["state"].items()}
    mean_gradients = {k: v / max(steps, 1) for k, v in sums.items()} if sums is not None else None
    return TrainResult(steps, samples, total_loss / max(steps, 1), time.perf_counter() - start, mean_gradients)


@torch.no_grad()
def perplexity(model, data: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean token negative log-likelihood) over the sequences in data."""
    model.eval()
    nll, tokens = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = data[i:i + batch_size]
        n = batch.numel() - len(batch)  # the first token of each sequence is not predicted
        nll += model(input_ids=batch, labels=batch).loss.item() * n
        tokens += n
    return math.exp(nll / tokens)
