"""Adapter layouts: which tensors (PEFT key names and shapes) a federation's updates must carry."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, get_args

import torch
from pydantic import ConfigDict, with_config

AdapterKind = Literal["lora", "qlora", "prompt_tuning"]  # qlora: the same LoRA on a 4-bit NF4 base
TargetModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_ATTENTION: tuple[TargetModule, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP: tuple[TargetModule, ...] = ("gate_proj", "up_proj", "down_proj")
# a stored federation config refuses keys no field takes (FederationConfig.from_json)
_STORED = ConfigDict(extra="forbid")


@with_config(_STORED)
@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The shape facts of a Llama-architecture base model that adapter shapes depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def module_shape(self, module: str) -> tuple[int, int]:
        """(out_features, in_features) of one targeted linear layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (q, self.hidden), "k_proj": (kv, self.hidden), "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, q), "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden), "down_proj": (self.hidden, self.intermediate),
        }
        if module not in shapes:
            raise ValueError(f"unknown target module {module!r}; known: {sorted(shapes)}")
        return shapes[module]

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelDims:
        """Dimensions of a loaded transformers config (Llama-architecture)."""
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size)

    def llama_config(self) -> dict[str, Any]:
        """Keyword arguments for transformers.LlamaConfig of a model with these dimensions."""
        return dict(
            hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, intermediate_size=self.intermediate,
            vocab_size=self.vocab, tie_word_embeddings=True,
        )


LAYOUTS: dict[str, ModelDims] = {
    # the tiny pretrained Llama of the tests and demo
    "tiny-llama": ModelDims(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384, vocab=4096),
    # SmolLM2-135M(-Instruct), the real pretrained model installable offline
    "smollm2-135m": ModelDims(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
    # a 1B-class model (Llama-3.2-1B shapes) for load and memory benchmarks
    "llama-1b": ModelDims(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
}


@with_config(_STORED)
@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    kind: AdapterKind = "lora"
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[TargetModule, ...] = _ATTENTION
    dropout: float = 0.0
    num_virtual_tokens: int = 16
    # heterogeneous ranks: devices of a listed tier train (and download) a LoRA of that rank; the
    # global adapter has `rank`, at least the largest. Pairs (tier, rank), sorted by tier.
    tier_ranks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in get_args(AdapterKind):
            raise ValueError(f"adapter kind must be 'lora', 'qlora' or 'prompt_tuning', got {self.kind!r}")
        if self.kind != "prompt_tuning" and (self.rank <= 0 or not self.target_modules):
            raise ValueError("a LoRA adapter needs rank > 0 and at least one target module")
        if self.kind == "prompt_tuning" and self.num_virtual_tokens <= 0:
            raise ValueError("prompt tuning needs num_virtual_tokens > 0")
        object.__setattr__(self, "tier_ranks", tuple(sorted((str(t), int(r)) for t, r in self.tier_ranks)))
        if self.tier_ranks and (self.kind == "prompt_tuning"
                                or any(not 0 < r <= self.rank for _, r in self.tier_ranks)):
            raise ValueError(f"tier ranks must be LoRA ranks in 1..rank ({self.rank}): {dict(self.tier_ranks)}")

    def rank_of(self, tier: str) -> int:
        """The LoRA rank devices of `tier` train: their tier's, or the global rank."""
        return dict(self.tier_ranks).get(tier, self.rank)

    def for_rank(self, rank: int) -> AdapterConfig:
        """This adapter at another rank (a tier's own), without tier ranks."""
        return dataclasses.replace(self, rank=rank, tier_ranks=())

    @property
    def quantized_base(self) -> bool:
        """QLoRA trains full-precision LoRA factors over a 4-bit base; the update looks like LoRA's."""
        return self.kind == "qlora"


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The exact tensor layout of one adapter, plus the PEFT config that describes it."""

    tensors: dict[str, tuple[int, ...]]
    peft_config: dict[str, Any]

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensors.values())


def build_spec(dims: ModelDims, adapter: AdapterConfig, base_model: str = "") -> AdapterSpec:
    if adapter.kind == "prompt_tuning":
        return AdapterSpec(
            tensors={"prompt_embeddings": (adapter.num_virtual_tokens, dims.hidden)},
            peft_config={
                "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model,
                "num_virtual_tokens": adapter.num_virtual_tokens, "token_dim": dims.hidden,
                "num_transformer_submodules": 1, "num_attention_heads": dims.heads,
                "num_layers": dims.layers, "prompt_tuning_init": "RANDOM", "inference_mode": True,
            },
        )
    tensors: dict[str, tuple[int, ...]] = {}
    for layer in range(dims.layers):
        for module in adapter.target_modules:
            out_f, in_f = dims.module_shape(module)
            block = "self_attn" if module in _ATTENTION else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (adapter.rank, in_f)
            tensors[f"{prefix}.lora_B.weight"] = (out_f, adapter.rank)
    return AdapterSpec(
        tensors=tensors,
        peft_config={
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
            "target_modules": sorted(adapter.target_modules), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True,
        },
    )


def initial_weights(spec: AdapterSpec, seed: int) -> dict[str, torch.Tensor]:
    """Version 0, initialised as PEFT does: A kaiming-uniform, B zero, so the adapter starts as a no-op."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in spec.tensors.items():
        if name.endswith("lora_B.weight"):
            out[name] = torch.zeros(shape)
        elif name.endswith("lora_A.weight"):
            bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) reduces to this
            out[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            out[name] = torch.randn(shape, generator=gen)
    return out
