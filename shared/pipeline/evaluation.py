"""Server-side evaluation of a published adapter: held-out perplexity, catastrophic forgetting, and
the forgetting guard that acts on it (`evaluate_version`, once per version).

Perplexity is measured on text no device trains on (corpora' held-out documents). Forgetting is the
ratio of the adapted model's perplexity on general text (the KJV, outside every fine-tuning
domain) to the base model's: above 1 the adapter made the model worse at what it already knew.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import torch

from fleettune.shared import corpora
from fleettune.shared.protocol.adapter_spec import AdapterConfig
from fleettune.shared.errors import StateError
from fleettune.shared.federation import EvaluationConfig, FederationConfig
from fleettune.shared.protocol import versions
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from fleettune.shared.storage import ObjectStore


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

    def general_ratio(self, weights: Mapping[str, torch.Tensor]) -> float:
        """General-text perplexity with the adapter, over the base model's: the forgetting ratio."""
        from fleettune.shared.device import trainer

        trainer.load_adapter_weights(self.model, weights)
        return trainer.perplexity(self.model, self.general) / self.base["general"]

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
    """The forgetting guard's action for one evaluation, or None when forgetting is within bounds
    (or already kept there: interpolate acts at the close, before the version is published)."""
    ratio = result.get("forgetting_ratio")
    if ratio is None or ratio <= config.forgetting_threshold or config.forgetting_action == "interpolate":
        return None
    return config.forgetting_action


def toward_base(weights: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The LoRA adapter whose every layer's product is `scale` times this one's: W0 + scale·B·A.
    Scaling B alone is exact, and scale 0 is the base model itself."""
    return {k: v * scale if k.endswith(".lora_B.weight") else v for k, v in weights.items()}


def interpolate_toward_base(general_ratio: Callable[[Mapping[str, torch.Tensor]], float],
                            weights: Mapping[str, torch.Tensor], threshold: float,
                            steps: int = 6) -> tuple[float, float, float]:
    """The largest scale s in [0, 1] (to 1/2**steps) whose adapter `toward_base(weights, s)` keeps the
    forgetting ratio within `threshold`, as WiSE-FT interpolates a fine-tuned model toward its base.

    Returns (s, the ratio at 1, the ratio at s). Bisection assumes the ratio grows with s; where it
    does not, the answer is still a scale that was measured within the bound (s = 0 is the base,
    ratio 1), never one assumed to be."""
    full = general_ratio(weights)
    if full <= threshold:
        return 1.0, full, full
    low, low_ratio, high = 0.0, 1.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        ratio = general_ratio(toward_base(weights, mid))
        if ratio <= threshold:
            low, low_ratio = mid, ratio
        else:
            high = mid
    return low, full, low_ratio


def evaluate_version(state: FederationState, store: ObjectStore, settings: Settings, fed: str, version: int,
                     evaluator_for: Callable[[FederationConfig], Evaluator]) -> dict:
    """Evaluate a published version, record it (Redis and its manifest), and apply the forgetting guard.

    The guard acts once per version, whatever the number of deliveries: it is applied in the
    same transaction that records the evaluation, and only by the first to record it.
    """
    manifest = versions.manifest(store, fed, version)
    config = state.federations.config(fed, manifest.get("config_revision"))
    if config is None or config.evaluation is None:
        raise StateError(f"{fed} has no evaluation config")
    done = state.evaluations.evaluation(fed, version)
    if done is None:
        weights = versions.load_weights(store, fed, version, config.spec, settings.max_update_bytes,
                                        settings.max_header_bytes)
        result = evaluator_for(config).evaluate(weights, version)
        if (kept := manifest.get("guard")) and kept["scale"] < 1:  # what the interpolate guard did at the close
            result["guard"] = (f"v{version}: general perplexity ratio {kept['forgetting_ratio_unscaled']:.3f} > "
                               f"{kept['threshold']}: published scaled toward the base by {kept['scale']:g}")
        action, lr = guard(config.evaluation, result), None
        if action is not None:
            ratio, limit = result["forgetting_ratio"], config.evaluation.forgetting_threshold
            if action == "halt":
                result["guard"] = f"v{version}: general perplexity ratio {ratio:.3f} > {limit}: federation halted"
            else:
                current = state.federations.server_lr(fed, config.policy.server_lr)
                # lowered to the floor at most; a rate already below it (FedAdam's 1e-2) is held
                lr = min(current, max(current * config.evaluation.lr_factor, config.evaluation.min_server_lr))
                result["guard"] = (f"v{version}: general perplexity ratio {ratio:.3f} > {limit}: server_lr "
                                   f"{'lowered to' if lr < current else 'held at its floor'} {lr:g}")
        state.evaluations.record_evaluation(fed, version, result, (action, result["guard"]) if action else None, lr)
        done = state.evaluations.evaluation(fed, version)
    if "evaluation" not in manifest:  # also completes a delivery that died after recording
        versions.add_evaluation(store, fed, version, done)
    return done

