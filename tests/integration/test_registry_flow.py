"""Register, then train, as the product spec writes it: a base model uploaded to the registry gets its
dimensions from its own file, a training session on that model id starts, and devices fetch that base
by presigned URL from the registry (not from packaged assets) and complete a round on it."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import load_file, save

from fleettune import DeviceClient, Federation, FleettuneAPIError, ModelRegistry, TrainingSession
from fleettune.shared.protocol.adapter_spec import ModelDims
from fleettune.shared.device import models, trainer
from fleettune.shared.device.client import Device
from fleettune.shared.federation import FederationConfig, LocalTraining

pytestmark = pytest.mark.services
TINY = models.TINY
PHONE = {"ram_mb": 8192, "storage_mb": 4096}
_names = itertools.count(1)


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_names)}-{int(time.time() * 1000) % 10**7}"


def _safetensors_with_config(path: Path, tokenizer: bool = True, config: dict | None = None) -> Path:
    """The packaged tiny Llama as one safetensors file, its config (and tokenizer) in the metadata."""
    metadata = {"config": json.dumps(config or json.loads((TINY / "config.json").read_text()))}
    if tokenizer:
        metadata["tokenizer"] = (TINY / "tokenizer.json").read_text()
        metadata["tokenizer_config"] = (TINY / "tokenizer_config.json").read_text()
    path.write_bytes(save(load_file(TINY / "model.safetensors"), metadata=metadata))
    return path


def _archive(path: Path, skip: tuple[str, ...] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(TINY.iterdir()):
            if file.name not in skip:
                tar.add(file, arcname=f"tiny-llama/{file.name}")
    return path


def test_the_specs_register_then_train_flow_as_written(pipeline, tmp_path):
    model_file = _safetensors_with_config(tmp_path / "domain-llm-v1.safetensors")
    fed = _name("notes")
    os.environ["FLEETTUNE_URL"] = pipeline.api_url  # the host swapped in; the SDK reads it as the spec's code runs
    try:
        # the spec's Python, verbatim but for the key
        registry = ModelRegistry(api_key=pipeline.admin_key)
        registry.upload_version_from_path(model_id="domain-llm-v1", file_path=str(model_file), version="1.0.0",
                                          formats=["onnx", "coreml", "tflite"])
    finally:
        del os.environ["FLEETTUNE_URL"]
    model = registry.get("domain-llm-v1")
    assert model["current_version"] == "1.0.0" and model["dims"] == {
        "hidden": 128, "layers": 4, "heads": 4, "kv_heads": 4, "intermediate": 384, "vocab": 4096}

    # the spec's curl calls, verbatim but for the host, the key and the federation's name
    env = dict(os.environ, FLEETTUNE_URL=pipeline.api_url, KEY=pipeline.admin_key, FED=fed)
    script = """
curl -sf -X PUT $FLEETTUNE_URL/api/v1/federations/$FED/adapter -H "Authorization: Bearer $KEY" \\
  -H 'Content-Type: application/json' -d '{"type": "lora", "rank": 8, "alpha": 16,
  "target_modules": ["q_proj","v_proj","k_proj","o_proj"], "dropout": 0.05}'
curl -sf -X PUT $FLEETTUNE_URL/api/v1/federations/$FED/strategy -H "Authorization: Bearer $KEY" \\
  -H 'Content-Type: application/json' -d '{"algorithm": "fedavg", "learning_rate": 1e-4, "local_epochs": 3,
  "max_grad_norm": 1.0, "weight_decay": 0.01, "round_config": {"timeout_seconds": 900, "min_samples_per_client": 50},
  "device_filter": {"min_ram_mb": 6144, "min_storage_mb": 2048}}'
curl -sf -X POST $FLEETTUNE_URL/api/v1/training-sessions -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
  -d '{"model_id": "domain-llm-v1", "federation": "'$FED'", "strategy": "fedavg",
  "strategy_params": {"learning_rate": 1e-4, "local_epochs": 3, "max_grad_norm": 1.0},
  "round_config": {"min_clients": 10, "max_rounds": 100, "timeout_seconds": 900}}'
"""
    answers = []
    for call in ["curl " + c for c in script.strip().removeprefix("curl ").split("\ncurl ")]:  # one answer each
        done = subprocess.run(["bash", "-c", call], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, call + done.stdout + done.stderr
        answers.append(json.loads(done.stdout))
    session = answers[-1]
    # answered at once: a worker publishes v0 on the registered base and opens round 1
    assert (session["status"], session["model_id"]) == ("pending", "domain-llm-v1")
    started = TrainingSession(Federation(pipeline.admin_key, fed, pipeline.api_url).client, session)
    assert started.wait(60, poll=0.05, until=("active",))["current_round"] == 1
    config = Federation(pipeline.admin_key, fed, pipeline.api_url).get()["config"]
    assert config["base_model"] == "domain-llm-v1@1.0.0" and config["model"]["hidden"] == 128

    # the SDK's train() on the registered model, and devices completing a round on it
    other = _name("notes-sdk")
    federation = Federation(pipeline.admin_key, other, pipeline.api_url)
    federation.create(model="domain-llm-v1")
    tokens = [federation.register_device(f"phone-{i}", **PHONE) for i in range(2)]
    session = federation.train(model="domain-llm-v1", algorithm="fedavg", rounds=1, min_updates=2)
    assert session.status == "active"
    for i, token in enumerate(tokens):
        client = DeviceClient(token, other, pipeline.api_url)
        plan = client.check_in(**PHONE)
        assert plan["base_model"] == "domain-llm-v1@1.0.0" and plan["base_download"]["sha256"]
        directory = models.fetch_registered(plan["base_download"], tmp_path / f"cache-{i}", client.client.download)
        base = models.load_model(str(directory))
        tokenizer = models.load_tokenizer(str(directory))
        ids = tokenizer("To be, or not to be, that is the question. " * 40)["input_ids"]
        dims = ModelDims.from_hf_config(base.config)
        device = Device(f"phone-{i}", FederationConfig(other, dims), trainer.peft_model(base, _adapter(plan)),
                        trainer.blocks(ids, 64), LocalTraining(max_steps=2, batch_size=4), ram_mb=8192,
                        storage_mb=4096)
        device.run_round(client)
    end = time.monotonic() + 120
    while (round_1 := federation.round(1))["status"] not in ("closed", "failed"):
        assert time.monotonic() < end, round_1
        time.sleep(0.2)
    assert round_1["status"] == "closed" and round_1["contributors"] == ["phone-0", "phone-1"]


def _adapter(plan: dict):
    from fleettune.shared.protocol.adapter_spec import AdapterConfig

    return AdapterConfig(**dict(plan["adapter"], target_modules=tuple(plan["adapter"]["target_modules"])))


def _onnx_file(path: Path, with_attention: bool = True) -> Path:
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2)
                                              for m in ("q", "k", "v", "o") if with_attention]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [16, 8], np.zeros(128, np.float32)) for n in names]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_models_that_cannot_be_trained_or_are_malformed_are_refused_by_name(pipeline, tmp_path):
    registry = ModelRegistry(api_key=pipeline.admin_key, base_url=pipeline.api_url)
    onnx_only = _name("onnx")
    registry.upload_version_from_path(onnx_only, _onnx_file(tmp_path / "model.onnx"), "1", ["onnx"], progress=False)
    assert registry.get(onnx_only)["current_version"] == "1"
    with pytest.raises(FleettuneAPIError) as refused:
        Federation(pipeline.admin_key, _name("f"), pipeline.api_url).train(model=onnx_only, rounds=1, min_updates=1)
    assert (refused.value.status, refused.value.code) == (422, "model_not_trainable")
    assert "ONNX" in refused.value.detail and ".tar.gz" in refused.value.detail  # what to upload instead

    config = json.loads((TINY / "config.json").read_text())
    full = _safetensors_with_config(tmp_path / "full.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(full[:-1000])
    disagreeing = _safetensors_with_config(tmp_path / "wrong.safetensors", config=dict(config, num_hidden_layers=6))
    no_attention = _onnx_file(tmp_path / "flat.onnx", with_attention=False)
    no_config = _archive(tmp_path / "no-config.tar.gz", skip=("config.json",))
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not an archive" * 100)
    for path, words in ((truncated, "truncated"), (disagreeing, "6 layers"), (no_attention, "attention projection"),
                        (no_config, "config.json"), (garbage, "tar")):
        model_id = _name("bad")
        with pytest.raises(FleettuneAPIError) as bad:
            registry.upload_version_from_path(model_id, path, "1", progress=False)
        assert (bad.value.status, bad.value.code) == (422, "invalid_model") and words in bad.value.detail, bad.value
        with pytest.raises(FleettuneAPIError) as gone:  # nothing half-registered stays behind
            registry.get(model_id)
        assert gone.value.status == 404

    too_big = httpx.post(f"{pipeline.api_url}/api/v1/models/{onnx_only}/versions",
                         headers={"Authorization": f"Bearer {pipeline.admin_key}"},
                         json={"version": "2", "filename": "big.tar.gz", "sha256": "0" * 64, "size": 10 * 1024**3})
    assert too_big.status_code == 413 and too_big.json()["code"] == "model_too_large"


def test_a_hugging_face_directory_archive_trains_and_a_missing_tokenizer_says_so(pipeline, tmp_path):
    registry = ModelRegistry(api_key=pipeline.admin_key, base_url=pipeline.api_url)
    good, untokenized = _name("archive"), _name("notok")
    version = registry.upload_version_from_path(good, _archive(tmp_path / "tiny.tar.gz"), "1", progress=False)
    assert version["facts"] == {"format": "hf-archive", "trainable": True, "why_not": None,
                                "dims": registry.get(good)["dims"]}
    session = Federation(pipeline.admin_key, _name("f"), pipeline.api_url).train(model=good, rounds=1, min_updates=1)
    assert session.status == "active"
    registry.upload_version_from_path(untokenized, _archive(tmp_path / "x.tar.gz", skip=("tokenizer.json",)), "1",
                                      progress=False)
    with pytest.raises(FleettuneAPIError) as refused:
        Federation(pipeline.admin_key, _name("f"), pipeline.api_url).train(model=untokenized, rounds=1, min_updates=1)
    assert refused.value.code == "model_not_trainable" and "tokenizer.json" in refused.value.detail
