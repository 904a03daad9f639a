"""Exports to on-device runtimes, in process: the LoRA-as-inputs graph, ONNX parity, the base stored
once per layout, named failures, and where each export stands (fakeredis for the small state)."""

from __future__ import annotations

import dataclasses
import json

import fakeredis
import numpy as np
import pytest
import torch

from fleettune.shared import keys
from fleettune.shared.device import models, trainer
from fleettune.shared.errors import ConfigError
from fleettune.shared.export import exporter, parity
from fleettune.shared.export.adapter_inputs import AdapterInputs
from fleettune.shared.export.tracking import Exports
from fleettune.shared.federation import FederationConfig
from fleettune.shared.protocol import runtimes, versions
from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig
from fleettune.shared.settings import Settings
from fleettune.shared.storage import LocalObjectStore


def _config(**changes) -> FederationConfig:
    return FederationConfig(name="fx", model=LAYOUTS["tiny-llama"], base_model="tiny-llama", **changes)


def _weights(config: FederationConfig, scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in config.spec.tensors.items()}


def test_runtime_names_map_to_formats_and_a_config_takes_only_known_ones():
    assert runtimes.wanted(["tflite", "onnx", "safetensors", "coreml", "onnxruntime", "gguf", "whatever"]) == \
        ("coreml", "litert", "onnx")
    assert runtimes.RUNTIMES["onnxruntime"] == "onnx" and runtimes.RUNTIMES["tflite"] == "litert"
    assert runtimes.canonical("torch") is None
    with pytest.raises(KeyError):
        runtimes.canonical("tensorrt")
    assert _config(exports=("litert", "onnx")).exports == ("litert", "onnx")
    with pytest.raises(ConfigError, match="exports"):
        _config(exports=("tflite",))  # aliases are resolved before a config holds them
    stored = _config(exports=("onnx",))
    assert FederationConfig.from_json(stored.to_json()) == stored


def test_the_adapter_as_inputs_gives_peft_s_logits_and_feeds_the_published_file_in_order():
    torch.set_num_threads(2)
    config = _config()
    weights = _weights(config, 0.05)
    model = trainer.peft_model(models.load_model("tiny"), config.adapter)
    trainer.load_adapter_weights(model, weights)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        wrapper = AdapterInputs(model)
        assert sorted(wrapper.names) == sorted(config.spec.tensors)  # the safetensors keys, nothing renamed
        got = wrapper(ids, wrapper.ordered(weights))
        assert torch.equal(got, expected)
        # other tensors fed in give other logits: the graph reads its inputs, not weights it kept
        other = wrapper(ids, wrapper.ordered({k: v * 2 for k, v in weights.items()}))
        assert not torch.allclose(other, expected)
    with pytest.raises(ValueError, match="lacks"):
        wrapper.ordered({})


@pytest.fixture()
def published(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    config = _config(exports=("onnx",))
    weights = _weights(config, 0.05)
    versions.publish(store, "fx", 1, weights, config.spec, {})
    versions.publish(store, "fx", 2, {k: v * -1.5 for k, v in weights.items()}, config.spec, {})
    return store, config


def test_an_onnx_export_matches_peft_and_the_base_is_stored_once_for_every_version(published):
    torch.set_num_threads(2)
    store, config = published
    first = exporter.export_version(store, Settings(), config, 1, "onnx")
    second = exporter.export_version(store, Settings(), config, 2, "onnx")
    for record in (first, second):
        assert record["parity"]["max_abs_logit_diff"] <= parity.TOLERANCE
        assert record["parity"]["prompts"] == len(parity.PROMPTS)
    assert first["base"] == second["base"]  # one base artifact, reused: a version ships only its adapter
    assert first["adapter"]["sha256"] != second["adapter"]["sha256"]
    adapter_file = store.get(f"{keys.version_prefix('fx', 2)}/{versions.ADAPTER_FILE}")
    assert second["adapter"]["size"] == len(adapter_file)
    assert second["bytes"]["full_over_adapter"] == round(second["base"]["size"] / len(adapter_file), 1) > 10
    assert json.loads(store.get(keys.export_record("fx", 2, "onnx"))) == second
    assert exporter.export_version(store, Settings(), config, 2, "onnx") == second  # redone: the record stands

    # a device's view: the stored base, fed the version's own safetensors in the recorded order
    import onnxruntime as ort
    from safetensors.numpy import load

    session = ort.InferenceSession(store.get(second["base"]["key"]), providers=["CPUExecutionProvider"])
    tensors = load(adapter_file)
    ids = np.array([[1, 50, 60, 70, 80]], dtype=np.int64)
    feed = dict(zip([i.name for i in session.get_inputs()], [ids, *[tensors[n] for n in second["base"]["inputs"][1:]]]))
    model = trainer.peft_model(models.load_model("tiny"), config.adapter)
    trainer.load_adapter_weights(model, {k: torch.from_numpy(v) for k, v in tensors.items()})
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.max(np.abs(session.run(None, feed)[0] - expected)) <= parity.TOLERANCE


def test_exports_that_cannot_run_fail_with_their_reason(published, monkeypatch):
    store, config = published
    with pytest.raises(exporter.Unsupported, match="prompt_tuning adapter is not exported"):
        exporter.export_version(store, Settings(), dataclasses.replace(
            config, adapter=AdapterConfig(kind="prompt_tuning")), 1, "onnx")
    with pytest.raises(exporter.Unsupported, match="4-bit base"):
        exporter.export_version(store, Settings(), dataclasses.replace(config, adapter=AdapterConfig(kind="qlora")),
                                1, "onnx")
    with pytest.raises(exporter.ExportFailed, match="neither 'tiny'"):
        exporter.export_version(store, Settings(), dataclasses.replace(config, base_model="/no/such/model"), 1, "onnx")

    def refuses(*args):
        raise NotImplementedError("PyTorch convert function for op 'frobnicate' not implemented")
    monkeypatch.setattr(exporter.converter_of("onnx"), "convert", refuses)
    with pytest.raises(exporter.ExportFailed, match="onnx conversion: NotImplementedError: .*frobnicate"):
        exporter.export_version(store, Settings(), config, 1, "onnx")
    assert not store.exists(keys.export_record("fx", 1, "onnx"))  # nothing recorded for a failed export


def test_an_export_is_due_until_it_is_ready_or_has_failed_for_good():
    exports = Exports(fakeredis.FakeRedis())
    assert exports.mark_due("f", 3, "onnx", at=10.0)
    assert exports.mark_due("f", 3, "litert", at=10.0)
    assert not exports.mark_due("f", 3, "onnx", at=10.0)  # asked again (a redone close): nothing changes
    assert sorted(exports.due(before=11)) == [("f", 3, "litert"), ("f", 3, "onnx")]
    assert exports.due(before=9) == []
    exports.failed("f", 3, "litert", "conversion: boom", attempts=1, final=False)
    assert exports.entry("f", 3, "litert") == {"status": "pending", "attempts": 1, "reason": "conversion: boom"}
    exports.failed("f", 3, "litert", "conversion: boom", attempts=3, final=True)
    exports.ready("f", 3, "onnx", {"base": {}}, attempts=1)
    assert exports.due(before=11) == []
    assert {k: v["status"] for k, v in exports.of_version("f", 3).items()} == {"litert": "failed", "onnx": "ready"}
    assert not exports.mark_due("f", 3, "onnx", at=20.0)  # asked again: a ready export stays ready
    assert exports.entry("f", 3, "onnx")["status"] == "ready" and exports.due(before=30) == []
    assert exports.ready_at_or_below("f", "onnx", 5) == 3 and exports.ready_at_or_below("f", "onnx", 2) is None
    assert exports.ready_at_or_below("f", "litert", 5) is None
