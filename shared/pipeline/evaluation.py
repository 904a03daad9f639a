"""Server-side evaluation of a published adapter: held-out perplexity and catastrophic forgetting.

Perplexity is measured on text no device trains on (corpora' held-out documents). Forgetting is the
ratio of the adapted model's perplexity on general text (the KJV, outside every fine-tuning
domain) to the base model's: above 1 the adapter made the model worse at what it already knew.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

from fleettune.shared import corpora
from fleettune.shared.protocol.adapter_spec import AdapterConfig
from fleettune.shared.federation import EvaluationConfig


class Evaluator:
    """Loads the base model and tokenised held-out sets once; evaluates any adapter weights."""

    def __init__(self, config: EvaluationConfig, adapter: AdapterConfig) -> None:
        from fleettune.shared.device import models, trainer

        self.config = config
        tokenizer = models.load_tokenizer(config.base_model)
        # evaluate on the base the devices train on: 4-bit for QLoRA
        base = models.load_model(config.base_model, quantize_4bit=adapter.quantized_base)
        self.model = trainer.peft_model(base, adapter)
        self._initial = trainer.adapter_weights(self.model)

        def encode(text: str) -> torch.Tensor:
            return trainer.blocks(tokenizer(text)["input_ids"], config.seq_len)

        self.heldout = {d: encode(corpora.heldout_text(d, config.eval_chars)) for d in config.domains}
        self.general = encode(corpora.heldout_text("general", config.eval_chars))

    def perplexities(self, weights: Mapping[str, torch.Tensor] | None, general: bool) -> dict:
        """Per-domain held-out perplexity (and general perplexity) with the adapter; None = base model."""
        from fleettune.shared.device import trainer

        if weights is None:
            with self.model.disable_adapter():
                return self._measure(general)
        trainer.load_adapter_weights(self.model, weights)
        return self._measure(general)

    def _measure(self, general: bool) -> dict:
        from fleettune.shared.device.trainer import perplexity

        out = {"heldout": {d: perplexity(self.model, data) for d, data in self.heldout.items()}}
        # geometric mean: domains' perplexities differ by orders of magnitude, and an arithmetic
        # mean would be the worst domain's alone
        out["heldout_mean"] = math.exp(sum(math.log(p) for p in out["heldout"].values()) / len(out["heldout"]))
        if general:
            out["general"] = perplexity(self.model, self.general)
        return out

    @functools.cached_property
    def base(self) -> dict:
        return self.perplexities(None, general=True)

    def evaluate(self, weights: Mapping[str, torch.Tensor], version: int) -> dict:
        general = version % self.config.general_every == 0
        result = self.perplexities(weights, general)
        result["base_heldout_mean"] = self.base["heldout_mean"]
        if general:
            result["base_general"] = self.base["general"]
            result["forgetting_ratio"] = result["general"] / self.base["general"]
        return result


def guard(config: EvaluationConfig, result: Mapping) -> str | None:
    """The forgetting guard's action for one evaluation, or None when forgetting is within bounds."""
    ratio = result.get("forgetting_ratio")
    if ratio is None or ratio <= config.forgetting_threshold:
        return None
    return config.forgetting_action
