"""Server-side sequence-level distillation: a tier-1 version's knowledge onto a smaller tier's base.

Tier-2 devices run another base model, so tier 1's adapter cannot be copied onto it: the shapes,
and often the tokenizers, differ. Sequence-level knowledge distillation (Kim & Rush, 2016) needs
only text: the teacher (tier 1's base with the published adapter) continues prompts, and the
student (tier 2's base with a fresh adapter) is trained on the teacher's continuations, with the
loss on the continuation only. The text crosses tokenizers as text.

The prompts are prefixes of public text the server holds (the corpora's train split of the
federation's domains, never the held-out split that evaluation uses). No device data is involved:
what the student learns from devices, it learns through the teacher's published adapter.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Literal

import torch

from fleettune.shared import corpora
from fleettune.shared.protocol.adapter_spec import AdapterConfig


@dataclasses.dataclass(frozen=True)
class Distilled:
    weights: dict[str, torch.Tensor]
    adapter: AdapterConfig
    first_loss: float  # the student's loss on the teacher's text, before and after
    last_loss: float
    sequences: int


@dataclasses.dataclass(frozen=True)
class Distillation:
    """Server-side sequence-level distillation from the published version onto a tier's base."""

    kind: Literal["lora", "prompt_tuning"] = "lora"
    rank: int = 8
    num_virtual_tokens: int = 16
    prompts: int = 32  # server-held public text prefixes the teacher continues
    prompt_tokens: int = 24
    new_tokens: int = 48
    steps: int = 60
    learning_rate: float = 5e-3
    temperature: float = 0.8



def student_adapter(config: Distillation) -> AdapterConfig:
    if config.kind == "prompt_tuning":
        return AdapterConfig(kind="prompt_tuning", num_virtual_tokens=config.num_virtual_tokens)
    return AdapterConfig(kind="lora", rank=config.rank, alpha=2 * config.rank,
                         target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


def prompts(domains: tuple[str, ...], count: int, seed: int) -> list[str]:
    """Line-aligned snippets of server-held public text, spread over the domains."""
    rng = random.Random(seed)
    lines = []
    for domain in domains:
        text = corpora.train_text(domain, 40_000, seed=seed)
        lines.extend(line.strip() for line in text.splitlines() if len(line.strip()) >= 40)
    rng.shuffle(lines)
    return lines[:count]


@torch.no_grad()
def teacher_text(teacher, tokenizer, texts: list[str], config: Distillation, seed: int) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs sampled from the teacher."""
    torch.manual_seed(seed)
    out = []
    teacher.eval()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :config.prompt_tokens]
        generated = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=config.temperature, top_k=50, max_new_tokens=config.new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
        out.append((tokenizer.decode(ids[0], skip_special_tokens=True),
                    tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)))
    return out


def _examples(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded input ids, and labels that score only the continuation."""
    rows = []
    for prompt, continuation in pairs:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if c:
            rows.append((p + c, [-100] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return ids, labels


def train_student(student, tokenizer, pairs: list[tuple[str, str]], config: Distillation, seed: int,
                  batch_size: int = 8) -> tuple[float, float]:
    """Train the student's adapter in place on the teacher's continuations; (first, last) epoch loss."""
    ids, labels = _examples(tokenizer, pairs)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate)
    gen = torch.Generator().manual_seed(seed)
    student.train()
    losses: list[float] = []
    for step in range(config.steps):
        pick = torch.randint(0, len(ids), (min(batch_size, len(ids)),), generator=gen)
        mask = (ids[pick] != tokenizer.pad_token_id) | (labels[pick] != -100)
        loss = student(input_ids=ids[pick], attention_mask=mask.long(), labels=labels[pick]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    student.eval()
    window = max(1, len(losses) // 5)
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def distill(teacher, teacher_tokenizer, student_base, student_tokenizer, config: Distillation,
            domains: tuple[str, ...], seed: int = 0) -> Distilled:
    """Distil the teacher (a base with the published adapter loaded) onto a fresh student adapter."""
    from fleettune.shared.device import trainer

    pairs = teacher_text(teacher, teacher_tokenizer, prompts(domains, config.prompts, seed), config, seed)
    adapter = student_adapter(config)
    student = trainer.peft_model(student_base, adapter)
    first, last = train_student(student, student_tokenizer, pairs, config, seed)
    weights = trainer.adapter_weights(student)
    trainer.release(student)
    return Distilled(weights, adapter, first, last, len(pairs))


def teacher_with(base, adapter: AdapterConfig, weights: Mapping[str, torch.Tensor]):
    """The tier-1 model a version describes: its base with the version's adapter loaded."""
    from fleettune.shared.device import trainer

    model = trainer.peft_model(base, adapter)
    trainer.load_adapter_weights(model, weights)
    return model.eval()


def distill_version(state, store, settings, fed: str, version: int, tier: str, base_model: str,
                    config: Distillation) -> dict:
    """Distil published `version` onto `base_model` for `tier` and publish it beside the version;
    returns its manifest."""
    from fleettune.shared.protocol import versions
    from fleettune.shared.protocol.adapter_spec import ModelDims, build_spec
    from fleettune.shared.device import models

    distillation, config = config, state.federations.config(fed)
    teacher_source = config.evaluation.base_model if config.evaluation else config.base_model
    weights = versions.load_weights(store, fed, version, config.spec, settings.max_update_bytes,
                                    settings.max_header_bytes)
    teacher = teacher_with(models.load_model(teacher_source, quantize_4bit=config.adapter.quantized_base),
                           config.adapter, weights)
    student_base = models.load_model(base_model)
    domains = config.evaluation.domains if config.evaluation else corpora.DOMAINS
    seed = config.seed * 100_003 + version
    done = distill(teacher, models.load_tokenizer(teacher_source), student_base,
                   models.load_tokenizer(base_model), distillation, domains, seed)
    spec = build_spec(ModelDims.from_hf_config(student_base.config), done.adapter, base_model)
    return versions.publish_variant(store, fed, version, tier, done.weights, spec, {
        "base_model": base_model, "teacher_base_model": teacher_source, "method": "sequence-level distillation",
        "sequences": done.sequences, "steps": distillation.steps,
        "student_loss_first": done.first_loss, "student_loss_last": done.last_loss})
