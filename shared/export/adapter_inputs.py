"""A PEFT LoRA model whose adapter tensors are inputs of the exported graph, not weights in it.

Every runtime we export to (ONNX Runtime, ExecuTorch, Core ML, LiteRT) takes named tensor inputs, so
the base is exported once per base model and adapter shape, and each published version ships only
its adapter: the version's own `adapter_model.safetensors`, fed as inputs. A device downloads the
base once and then only kilobytes per version.

The swap is plain modules rather than `torch.func.functional_call`, which TorchScript tracing (Core
ML's converter path) refuses: each LoRA A/B linear reads its weight from a slot that the wrapper
fills from its inputs before calling the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

ACTIVE = "default"  # PEFT's adapter name for the one adapter a model carries


class _Slots:
    """The LoRA tensors of the call in progress (empty between calls)."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []


class _InputLinear(torch.nn.Module):
    """A bias-free linear whose weight is one of the graph's inputs."""

    def __init__(self, slots: _Slots, index: int, like: torch.Tensor) -> None:
        super().__init__()
        self.slots, self.index = slots, index
        self.register_buffer("_example", torch.zeros((), dtype=like.dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # PEFT reads lora_A.weight.dtype before calling it
        return self.slots.tensors[self.index] if self.slots.tensors else self._example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.slots.tensors[self.index])


class AdapterInputs(torch.nn.Module):
    """logits = model(input_ids) with the LoRA tensors given as `lora`, in `self.names`' order.

    `names` are PEFT's saved key names (those of `adapter_model.safetensors`), so a device feeds the
    version's file as it is; `shapes` are theirs. A device runs one unpadded sequence.
    """

    def __init__(self, peft_model: torch.nn.Module) -> None:
        super().__init__()
        from peft.tuners.lora import LoraLayer

        self.model = peft_model.eval()
        self.explicit_mask = False  # True: the 4-D causal mask (Core ML), else transformers builds it
        self.slots = _Slots()
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        prefix = "base_model.model."  # PEFT's saved names are module paths under this
        for module_name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or ACTIVE not in module.lora_A:
                continue
            for part in ("lora_A", "lora_B"):
                linear = getattr(module, part)[ACTIVE]
                if linear.bias is not None:
                    raise ValueError("exports take LoRA without bias terms")
                self.names.append(f"{module_name}.{part}.weight")
                self.shapes.append(tuple(linear.weight.shape))
                getattr(module, part)[ACTIVE] = _InputLinear(self.slots, len(self.names) - 1, linear.weight)
        if not self.names:
            raise ValueError("exports take LoRA adapters: this model has no LoRA layers")
        assert all(n.startswith(prefix) for n in self.names)
        self.eval()

    def forward(self, input_ids: torch.Tensor, lora: list[torch.Tensor]) -> torch.Tensor:
        self.slots.tensors = list(lora)
        try:
            mask = causal_mask(input_ids) if self.explicit_mask else torch.ones_like(input_ids)
            out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        finally:
            self.slots.tensors = []
        return out.logits

    def ordered(self, weights: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """A version's adapter tensors in input order (float32, contiguous)."""
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise ValueError(f"the adapter lacks {missing[:2]}")
        return [weights[n].to(torch.float32).contiguous() for n in self.names]


def causal_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """The additive 4-D causal mask of one unpadded sequence. transformers uses a 4-D mask as given,
    which keeps its mask builders (torch.diff, new_ones: ops Core ML's converter lacks) out of the
    graph; ExecuTorch refuses the broadcast this mask leads to, so only Core ML asks for it."""
    position = torch.arange(input_ids.shape[-1], device=input_ids.device)
    blocked = (position[None, :] > position[:, None]).to(torch.float32)
    return (blocked * torch.finfo(torch.float32).min)[None, None]


class Positional(torch.nn.Module):
    """`AdapterInputs` with the LoRA tensors as positional inputs (tracers want flat arguments)."""

    def __init__(self, inner: AdapterInputs) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, *lora: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids, list(lora))
