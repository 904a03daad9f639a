"""Exports to on-device runtimes through real workers, Redis, S3 and `fleettune api`.

A version comes out of the round pipeline; the workers export it to ONNX, ExecuTorch, Core ML and
LiteRT (the `fleettune.export` task, on its own queue). Devices that declare a runtime are served
that format's base once and then only the adapter; an operator lists and downloads the artifacts
with the SDK and the CLI. Exports that cannot be made fail with their reason, after retries where
retrying can help, and never hold up the rounds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load

from fleettune import DeviceClient, Federation, FleettuneAPIError
from fleettune.shared import keys
from fleettune.shared.device import models, trainer
from fleettune.shared.export import parity
from fleettune.shared.export.tracking import Exports
from fleettune.shared.protocol.adapter_spec import AdapterConfig

pytestmark = pytest.mark.services
FORMATS = ("coreml", "executorch", "litert", "onnx")


def _wait_exports(pipeline, fed: str, version: int, formats, timeout: float = 900,
                  until=("ready", "failed")) -> dict:
    exports, end = Exports(pipeline.runtime.redis), time.monotonic() + timeout
    while True:
        got = exports.of_version(fed, version)
        if all(got.get(f, {}).get("status") in until for f in formats):
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"exports of {fed} v{version}: {got}")
        time.sleep(0.5)


def _publish_one(pipeline, config, scale: float = 0.05) -> None:
    rng = np.random.default_rng(7)
    delta = {k: rng.normal(0, scale, s).astype(np.float32) for k, s in config.update_tensors.items()}
    pipeline.submit(config, 1, "d1", delta)
    assert pipeline.wait_round(config, 1, timeout=120).status == "closed"


@pytest.fixture(scope="module")
def exported(pipeline):
    config = pipeline.create(devices=["d1"], min_updates=1, max_rounds=3, max_update_norm=None, exports=FORMATS)
    _publish_one(pipeline, config)
    _wait_exports(pipeline, config.name, 0, FORMATS)  # the serving version (v0 until a rollout moves it)
    return config, _wait_exports(pipeline, config.name, 1, FORMATS)


def _peft_logits(config, adapter: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    torch.set_num_threads(2)
    model = trainer.peft_model(models.load_model("tiny"), config.adapter)
    trainer.load_adapter_weights(model, {k: torch.from_numpy(v) for k, v in adapter.items()})
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def test_a_published_version_is_exported_to_every_format_with_parity(exported):
    config, got = exported
    assert {f: e["status"] for f, e in got.items()} == dict.fromkeys(FORMATS, "ready"), got
    records = {f: e["record"] for f, e in got.items()}
    for fmt in ("executorch", "litert", "onnx"):
        assert records[fmt]["parity"]["max_abs_logit_diff"] <= parity.TOLERANCE
    coreml = records["coreml"]["parity"]
    assert coreml["max_abs_logit_diff"] is None and "Apple" in coreml["not_measured"]
    assert coreml["checked"]["base_weights_checked"] > 0 and "linear" in coreml["checked"]["ops"]
    # one adapter (the version's own file) for every format; a base per format
    assert len({r["adapter"]["sha256"] for r in records.values()}) == 1
    assert len({r["base"]["sha256"] for r in records.values()}) == len(FORMATS)
    assert all(r["bytes"]["full_over_adapter"] > 10 for r in records.values())


def test_a_device_is_served_its_runtime_s_base_once_then_only_the_adapter(pipeline, exported, tmp_path):
    config, got = exported
    operator = Federation(pipeline.admin_key, config.name, pipeline.api_url)
    device = DeviceClient(operator.register_device("phone-onnx"), config.name, pipeline.api_url)
    before = device.serving(runtime="onnxruntime")
    assert before["version"] == 0 and before["runtime"]["version"] == 0  # no rollout yet: v0, exported too
    # as a completed rollout leaves it (tests/integration/test_canary.py walks that path)
    pipeline.runtime.redis.hset(keys.fed_state(config.name), "serving", 1)
    runtime = device.serving(runtime="onnxruntime")["runtime"]
    assert (runtime["status"], runtime["version"], runtime["format"]) == ("ready", 1, "onnx")
    assert runtime["base_sha256"] == before["runtime"]["base_sha256"]  # a new version: the same base
    assert runtime["base"]["sha256"] == runtime["base_sha256"] == got["onnx"]["record"]["base"]["sha256"]
    base_path, adapter_path = device.fetch_runtime({"runtime": runtime}, tmp_path)

    import onnxruntime as ort

    session = ort.InferenceSession(str(base_path), providers=["CPUExecutionProvider"])
    adapter = load(adapter_path.read_bytes())
    ids = np.array([[1, 400, 17, 230, 99, 5, 61]], dtype=np.int64)
    feed = dict(zip([i.name for i in session.get_inputs()], [ids, *[adapter[n] for n in runtime["inputs"][1:]]]))
    assert np.max(np.abs(session.run(None, feed)[0] - _peft_logits(config, adapter, ids))) <= parity.TOLERANCE

    again = device.serving(runtime="onnxruntime", runtime_base=runtime["base_sha256"])["runtime"]
    assert again["base"] is None and again["adapter"]["sha256"] == runtime["adapter"]["sha256"]
    assert device.fetch_runtime({"runtime": again}, tmp_path) == (base_path, adapter_path)  # from the cache
    litert = device.serving(runtime="tflite")["runtime"]
    assert (litert["format"], litert["context"], litert["status"]) == ("litert", 64, "ready")
    assert device.serving()["adapter"]["kind"] == "federation"  # torch: the PEFT directory, no runtime part
    assert device.serving().get("runtime") is None


def test_a_runtime_the_federation_does_not_export_is_a_clear_4xx(pipeline, exported):
    plain = pipeline.create(devices=["d1"], min_updates=1, max_rounds=1)
    operator = Federation(pipeline.admin_key, plain.name, pipeline.api_url)
    device = DeviceClient(operator.register_device("phone-plain"), plain.name, pipeline.api_url)
    with pytest.raises(FleettuneAPIError) as refused:
        device.check_in(runtime="executorch")
    assert (refused.value.status, refused.value.code) == (409, "format_not_exported")
    with pytest.raises(FleettuneAPIError) as invalid:
        device.check_in(runtime="tensorrt")
    assert invalid.value.status == 422 and "runtime" in str(invalid.value.body)


def test_operators_list_request_and_download_artifacts(pipeline, exported, tmp_path):
    config, got = exported
    operator = Federation(pipeline.admin_key, config.name, pipeline.api_url)
    listed = {a["format"]: a for a in operator.artifacts(1)}
    assert {f: a["status"] for f, a in listed.items()} == dict.fromkeys(FORMATS, "ready")
    assert listed["coreml"]["max_abs_logit_diff"] is None and listed["coreml"]["checks"]["base_weights_checked"] > 0
    files = operator.download_artifact(listed["executorch"], tmp_path / "sdk")
    assert files["base"].stat().st_size == listed["executorch"]["base"]["size"]
    assert operator.export(1, ["tflite"])["formats"] == ["litert"]  # ready already: stays ready
    with pytest.raises(FleettuneAPIError) as missing:
        operator.artifacts(99)
    assert missing.value.status == 404

    cli = subprocess.run([str(Path(sys.executable).parent / "fleettune"), "federations", "artifacts", config.name, "1",
                          "--download", str(tmp_path / "cli")], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, FLEETTUNE_URL=pipeline.api_url, FLEETTUNE_API_KEY=pipeline.admin_key))
    assert cli.returncode == 0, cli.stderr[-2000:]
    for fmt in FORMATS:
        assert f"{fmt} base: " in cli.stdout and (tmp_path / "cli" / fmt).is_dir()
    assert "100%" in cli.stderr  # the progress bars


def test_exports_that_cannot_be_made_fail_with_their_reason_and_never_hold_up_rounds(pipeline):
    missing_base = pipeline.create(devices=["d1"], min_updates=1, max_rounds=2, max_update_norm=None,
                                   exports=("onnx",), base_model="/nonexistent/base-model")
    soft_prompt = pipeline.create(devices=["d1"], min_updates=1, max_rounds=2, max_update_norm=None,
                                  exports=("onnx",), adapter=AdapterConfig(kind="prompt_tuning"))
    for config in (missing_base, soft_prompt):
        _publish_one(pipeline, config, scale=0.01)
        assert pipeline.runtime.state.rounds.round_info(config.name, 2).status == "open"  # the rounds go on
    unsupported = _wait_exports(pipeline, soft_prompt.name, 1, ["onnx"], timeout=300)["onnx"]
    assert unsupported["status"] == "failed" and unsupported["attempts"] == 1  # nothing a retry could change
    assert "prompt_tuning adapter is not exported" in unsupported["reason"]
    failed = _wait_exports(pipeline, missing_base.name, 1, ["onnx"], timeout=300, until=("failed",))["onnx"]
    assert failed["attempts"] == pipeline.settings.export_attempts  # retried with backoff, then given up
    assert "neither 'tiny'" in failed["reason"]
    left = Exports(pipeline.runtime.redis).due(before=time.time() + 10**6, limit=10**6)
    assert not [d for d in left if d[0] in (missing_base.name, soft_prompt.name)]  # nothing left to re-drive
