"""Export one published version to one format: the base once per layout, then parity for the version.

The base artifact holds the base weights and the graph with the LoRA tensors as inputs
(adapter_inputs.py); it is stored once per base model, adapter layout, format and toolchain, under a
content digest, and every version of every federation with that layout reuses it. A version's export
is then its adapter file (already published) plus a record: the base artifact it runs on, the
inputs' order, and the parity measured with this version's weights.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import tempfile
import time
from pathlib import Path

import torch

from fleettune.shared import keys
from fleettune.shared.errors import ObjectNotFound
from fleettune.shared.export import parity
from fleettune.shared.export.adapter_inputs import AdapterInputs
from fleettune.shared.protocol.runtimes import FORMATS, Format
from fleettune.shared.federation import FederationConfig
from fleettune.shared.pipeline.ingest import TRANSIENT
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.safetensors_reader import parse
from fleettune.shared.storage import ObjectStore

CONVERTERS = {"onnx": "to_onnx", "executorch": "to_executorch", "coreml": "to_coreml", "litert": "to_litert"}
REVISION = 1  # bump when the exported graph changes: every base is exported again under a new digest
BASE_META = "base.json"


class ExportFailed(RuntimeError):
    """A conversion or its check failed: retried with backoff, then recorded as failed with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason[:500]


class Unsupported(ExportFailed):
    """This federation's adapter or base cannot be exported at all: failed at once, never retried."""


def converter_of(fmt: str):
    """shared/export/to_<format>.py, imported on use: each pulls in its toolchain."""
    return importlib.import_module(f"fleettune.shared.export.{CONVERTERS[fmt]}")


def base_source(config: FederationConfig) -> str:
    """The base model the adapter adapts: 'tiny', 'smollm2', a model directory or a registered id@version."""
    return config.base_model


def refusal(config: FederationConfig) -> str | None:
    """Why this federation's versions cannot be exported, or None."""
    if config.adapter.quantized_base:
        return "a QLoRA adapter is not exported: it adapts a 4-bit base, which the runtimes' graphs do not hold"
    if config.adapter.kind != "lora":
        return (f"a {config.adapter.kind} adapter is not exported: exports feed LoRA tensors to a fixed graph "
                "(a soft prompt would need a graph of its own)")
    return None


def export_version(store: ObjectStore, settings, config: FederationConfig, version: int, fmt: str,
                   local_base: str | None = None, workdir: Path | None = None) -> dict:
    """Export `version` of the federation to `fmt` and store its record; returns the record.

    `local_base`: a registered base (id@version) fetched to a local directory. A record already
    stored is returned as it is (a redelivered task); raises Unsupported or ExportFailed with the reason."""
    fed, format_ = config.name, FORMATS[fmt]
    converter = converter_of(fmt)
    try:
        return json.loads(store.get(keys.export_record(fed, version, fmt), 1024 * 1024))
    except ObjectNotFound:
        pass
    why = refusal(config)
    if why is not None:
        raise Unsupported(why)
    adapter_key = f"{keys.version_prefix(fed, version)}/{versions.ADAPTER_FILE}"
    blob = store.get(adapter_key, settings.max_update_bytes)
    try:
        measured = _convert_and_check(store, config, fmt, blob, settings, local_base, workdir)
    except (ExportFailed, *TRANSIENT):
        raise
    except Exception as exc:  # a base that does not load, a toolchain's own error: the reason, never a crash
        raise ExportFailed(f"{type(exc).__name__}: {exc}") from exc
    base, diff, checks, prompts = measured
    record = {
        "federation": fed, "version": version, "format": fmt, "runtime": format_.runtime, "base": base,
        "adapter": {"key": adapter_key, "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob),
                    "inputs": "the version's adapter_model.safetensors, its tensors fed in base.inputs order"},
        "parity": {"max_abs_logit_diff": diff, "tolerance": parity.TOLERANCE, "prompts": prompts,
                   "reference": "PyTorch + PEFT, float32",
                   **({"not_measured": converter.NOT_RUNNABLE, "checked": checks} if diff is None else {})},
        "bytes": {"base": base["size"], "adapter": len(blob), "full_over_adapter": round(base["size"] / len(blob), 1)},
        "created_at": time.time(),
    }
    store.put(keys.export_record(fed, version, fmt), json.dumps(record, indent=2, sort_keys=True).encode(),
              "application/json")
    return record


def _convert_and_check(store: ObjectStore, config: FederationConfig, fmt: str, blob: bytes, settings,
                       local_base: str | None, workdir: Path | None) -> tuple[dict, float | None, dict | None, int]:
    """(the base artifact, max |logit diff| or None, what was checked instead, prompts): converts the
    base if no version did before, then runs it with this version's adapter against PyTorch + PEFT."""
    from fleettune.shared.device import models, trainer

    format_ = FORMATS[fmt]
    weights = parse(blob, config.spec.tensors, settings.max_header_bytes)
    source = base_source(config)
    tokenizer = models.load_tokenizer(local_base or source)
    model = trainer.peft_model(models.load_model(local_base or source), config.adapter)
    trainer.load_adapter_weights(model, weights)
    prompts = parity.prompt_ids(tokenizer)
    expected = parity.reference(model.eval(), prompts)
    wrapper = AdapterInputs(model)
    lora = wrapper.ordered(weights)
    converter = converter_of(fmt)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        base, path = _base_artifact(store, config, format_, converter, wrapper, source, torch.from_numpy(prompts[0]),
                                    lora, Path(tmp))
        try:
            if format_.executable_here:
                diff, checks = parity.max_difference(converter.runner(path), prompts, expected,
                                                     [t.numpy() for t in lora]), None
            else:
                diff, checks = None, converter.check(path, wrapper)
        except Exception as exc:  # any toolchain's error: the artifact is not fit to serve
            raise ExportFailed(f"checking the {fmt} artifact: {type(exc).__name__}: {exc}") from exc
    if diff is not None and not diff <= parity.TOLERANCE:
        raise ExportFailed(f"max |logit diff| {diff:.3g} against PyTorch + PEFT exceeds {parity.TOLERANCE:g}")
    return base, diff, checks, len(prompts)


def layout_digest(source: str, adapter, wrapper: AdapterInputs, format_: Format, toolchain: dict) -> str:
    """Names one base artifact: the same base, adapter layout (alpha is LoRA's scale, in the graph),
    format and toolchain give the same graph."""
    identity = {"revision": REVISION, "source": source, "format": format_.name, "toolchain": toolchain,
                "rank": adapter.rank, "alpha": adapter.alpha, "targets": sorted(adapter.target_modules),
                "inputs": list(zip(wrapper.names, wrapper.shapes))}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _base_artifact(store: ObjectStore, config: FederationConfig, format_: Format, converter, wrapper: AdapterInputs,
                   source: str, example: torch.Tensor, lora: list[torch.Tensor], tmp: Path) -> tuple[dict, Path]:
    """(the base artifact's description, a local copy), converting it if no version did before."""
    toolchain = converter.versions()
    prefix = keys.export_base_prefix(layout_digest(source, config.adapter, wrapper, format_, toolchain), format_.name)
    path = tmp / format_.filename
    try:
        meta = json.loads(store.get(f"{prefix}/{BASE_META}", 1024 * 1024))
        data = store.get(meta["key"])
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ExportFailed(f"the stored {format_.name} base {meta['key']} does not match its sha256")
        path.write_bytes(data)
        return meta, path
    except ObjectNotFound:
        pass
    started = time.perf_counter()
    try:
        converter.convert(wrapper, example, lora, path)
    except Exception as exc:  # an op the runtime lacks, a model too large: the converter's own words
        raise ExportFailed(f"{format_.name} conversion: {type(exc).__name__}: {exc}") from exc
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    meta = {"key": f"{prefix}/{sha256[:16]}-{format_.filename}", "sha256": sha256, "size": len(data),
            "format": format_.name, "base_model": source, "toolchain": toolchain,
            "inputs": ["input_ids", *wrapper.names], "input_shapes": [None, *[list(s) for s in wrapper.shapes]],
            "max_tokens": getattr(converter, "MAX_TOKENS", None), "context": getattr(converter, "CONTEXT", None),
            "convert_s": round(time.perf_counter() - started, 2)}
    store.put(meta["key"], data)  # content-addressed: two workers converting at once never clash
    try:
        meta = json.loads(store.get(f"{prefix}/{BASE_META}", 1024 * 1024))  # another worker's came first
        path.write_bytes(store.get(meta["key"]))
    except ObjectNotFound:
        store.put(f"{prefix}/{BASE_META}", json.dumps(meta, indent=2, sort_keys=True).encode(), "application/json")
    return meta, path
