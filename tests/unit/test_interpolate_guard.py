"""The interpolate forgetting guard: each version is published scaled toward the base until general
text is within the bound. The search is checked on a known curve, the close on the real tiny model."""

import hashlib

import fakeredis
import numpy as np
import pytest
import torch

from fleettune.shared import keys
from fleettune.shared.errors import ConfigError, StateError
from fleettune.shared.federation import EvaluationConfig, FederationConfig, RoundPolicy
from fleettune.shared.pipeline.evaluation import (Evaluator, evaluate_version, interpolate_toward_base,
                                                  toward_base)
from fleettune.shared.pipeline.ingest import Ingestor
from fleettune.shared.pipeline.rounds import RoundCoordinator
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.protocol.updates import encode_update
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from fleettune.shared.storage import LocalObjectStore
from tests.reference import random_deltas


def test_toward_base_scales_every_lora_product_and_nothing_else():
    a, b = torch.randn(4, 16), torch.randn(16, 4)
    weights = {"m.lora_A.weight": a, "m.lora_B.weight": b}
    scaled = toward_base(weights, 0.25)
    assert torch.equal(scaled["m.lora_A.weight"], a)
    assert torch.allclose(scaled["m.lora_B.weight"] @ scaled["m.lora_A.weight"], 0.25 * (b @ a))
    assert not toward_base(weights, 0.0)["m.lora_B.weight"].any()


def test_search_finds_the_largest_scale_within_the_bound():
    weights = {"m.lora_A.weight": torch.ones(2, 2), "m.lora_B.weight": torch.ones(2, 2)}
    seen = []

    def ratio(w):  # general perplexity ratio rising with the scale: 1 + 0.5·s, so s <= 0.1 keeps 1.05
        seen.append(float(w["m.lora_B.weight"][0, 0]))
        return 1 + 0.5 * seen[-1]

    scale, before, after = interpolate_toward_base(ratio, weights, 1.05, steps=6)
    assert scale == 6 / 64 and before == 1.5 and after == pytest.approx(1 + 0.5 * 6 / 64) and after <= 1.05
    assert len(seen) == 7  # the unscaled adapter, then six halvings
    assert interpolate_toward_base(lambda w: 1.01, weights, 1.05) == (1.0, 1.01, 1.01)  # within: untouched


def test_search_never_returns_a_scale_it_did_not_measure_within_the_bound():
    weights = {"m.lora_B.weight": torch.ones(1)}
    # not monotone: only the base itself (scale 0) is within the bound
    scale, _, after = interpolate_toward_base(lambda w: 1.0 if not w["m.lora_B.weight"].any() else 2.0, weights, 1.05)
    assert scale == 0.0 and after == 1.0


def test_prompt_tuning_cannot_ask_for_interpolation():
    with pytest.raises(ConfigError, match="interpolate"):
        FederationConfig("f", LAYOUTS["tiny-llama"], adapter=AdapterConfig(kind="prompt_tuning"),
                         evaluation=EvaluationConfig(forgetting_action="interpolate"))


def _round_with_a_large_update(tmp_path, evaluator_for):
    state, store = FederationState(fakeredis.FakeRedis()), LocalObjectStore(tmp_path)
    # no clip: the update below must be large enough to move the model
    config = FederationConfig("f", LAYOUTS["tiny-llama"],
                              policy=RoundPolicy(min_updates=1, server_lr=1.0, max_update_norm=None),
                              evaluation=EvaluationConfig(forgetting_threshold=1.05, forgetting_action="interpolate",
                                                          eval_chars=4_000))
    coordinator = RoundCoordinator(state, store, Settings(), evaluator_for=evaluator_for)
    coordinator.start(config, ["a"])
    # random factors of this size move the tiny model far from general English
    blob = encode_update(random_deltas(config.spec.tensors, np.random.default_rng(0), 0.1))
    store.put(keys.update_object("f", 1, "a"), blob)
    Ingestor(state, store, Settings()).ingest(
        Envelope("f", 1, "a", keys.update_object("f", 1, "a"), hashlib.sha256(blob).hexdigest(), 5, 0).encode())
    return state, store, config, coordinator


def test_a_close_publishes_the_version_within_the_bound_on_the_real_model(tmp_path):
    evaluators = {}

    def evaluator_for(config):
        return evaluators.setdefault(config.evaluation, Evaluator(config.evaluation, config.adapter))

    state, store, config, coordinator = _round_with_a_large_update(tmp_path, evaluator_for)
    assert coordinator.close("f", 1).version == 1
    kept = versions.manifest(store, "f", 1)["guard"]
    assert kept["action"] == "interpolate" and kept["forgetting_ratio_unscaled"] > 1.05 and 0 < kept["scale"] < 1
    published = versions.load_weights(store, "f", 1, config.spec, 1 << 30, 1 << 20)
    evaluator = evaluator_for(config)
    assert evaluator.general_ratio(published) == pytest.approx(kept["forgetting_ratio"]) and kept["forgetting_ratio"] <= 1.05
    # the version's own evaluation (the eval task) agrees, says what was done, and takes no other action
    result = evaluate_version(state, store, Settings(), "f", 1, evaluator_for)
    assert result["forgetting_ratio"] <= 1.05 and "scaled toward the base" in result["guard"]
    assert state.federations.status("f")["status"] == "active" and state.federations.server_lr("f", 1.0) == 1.0


def test_a_close_without_an_evaluator_refuses_to_publish_unguarded(tmp_path):
    state, store, config, coordinator = _round_with_a_large_update(tmp_path, None)
    with pytest.raises(StateError, match="needs an evaluator"):
        coordinator.close("f", 1)
