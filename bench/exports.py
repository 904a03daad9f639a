"""What each on-device format costs and saves: conversion, bytes per version update, and on the
device side load time, peak RSS and generation speed, against PyTorch + PEFT.

    python bench/exports.py [--model tiny|smollm2] [--formats onnx executorch litert coreml] [--new-tokens 32] [--int8]

A version's adapter (rank 8 on q/k/v/o, random small weights: speed and bytes do not depend on
their values) is published to a local store and exported to each format with the function the
`fleettune.export` task runs. Each runtime then runs in a process of its own, so that its peak RSS
(VmHWM) is its own: load the base artifact and the adapter, then greedy-generate `--new-tokens`
tokens after a 16-token prompt. The exported graphs have no KV cache (each step runs the whole
sequence), so PyTorch + PEFT is timed both ways: without its cache (the same work) and with it.
Core ML executes only on Apple platforms: its row has bytes and conversion, not speed. The ratios
printed are against PyTorch + PEFT measured in the same run, on the same cores (1 thread each).
`--int8` adds the ONNX base in int8 two ways, dynamic (quantize_dynamic: weights per channel and
activations on the fly) and weight-only (MatMulNBits, blocks of 32), and prints each one's held-out
perplexity against the float32 graph's on the same version's adapter; the weight-only one is timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind"


def _publish(model: str, store_dir: Path):
    import torch

    from fleettune.shared.device import models
    from fleettune.shared.federation import FederationConfig
    from fleettune.shared.protocol import versions
    from fleettune.shared.protocol.adapter_spec import ModelDims
    from fleettune.shared.storage import LocalObjectStore

    dims = ModelDims.from_hf_config(models.load_model(model).config)
    config = FederationConfig(name="bench", model=dims, base_model=model)
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) * 0.02 for k, s in config.spec.tensors.items()}
    store = LocalObjectStore(store_dir)
    versions.publish(store, "bench", 1, weights, config.spec, {})
    return store, config


def _device(job: dict, new_tokens: int) -> dict:
    """One runtime in this process, importing what a device would: load, then generate greedily."""
    import importlib

    from safetensors.numpy import load

    fmt, ids = job["format"], np.array([job["ids"]], dtype=np.int64)
    started = time.perf_counter()
    if fmt.startswith("torch"):
        import torch

        from fleettune.shared.device import models, trainer
        from fleettune.shared.protocol.adapter_spec import AdapterConfig

        torch.set_num_threads(1)
        peft = trainer.peft_model(models.load_model(job["model"]), AdapterConfig())
        trainer.load_adapter_weights(peft, {k: torch.from_numpy(v) for k, v in load(Path(job["adapter"]).read_bytes()).items()})
        loaded = time.perf_counter()
        with torch.no_grad():
            out = peft.generate(input_ids=torch.from_numpy(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, use_cache=fmt == "torch-cache", pad_token_id=job["pad"])
        produced = out.shape[1] - ids.shape[1]
    else:  # the converter module's runner: onnxruntime / LiteRT with numpy alone, ExecuTorch with torch
        tensors = load(Path(job["adapter"]).read_bytes())
        lora = [tensors[n] for n in job["inputs"][1:]]
        run = importlib.import_module(f"fleettune.shared.export.{job['module']}").runner(Path(job["base"]))
        loaded = time.perf_counter()
        seq = ids
        for _ in range(new_tokens):
            logits = run(seq, lora)
            seq = np.concatenate([seq, logits[:, -1:].argmax(-1).astype(np.int64)], axis=1)
        produced = new_tokens
    done = time.perf_counter()
    return {"load_s": loaded - started, "tokens_per_s": produced / (done - loaded), "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak
    across fork and exec into it, so a child started by a big parent would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _perplexity(run, lora: list, token_ids: list[int], window: int = 64) -> float:
    """Held-out perplexity of a runtime's logits over non-overlapping windows of `window` tokens."""
    total, count = 0.0, 0
    for start in range(0, len(token_ids) - window, window):
        ids = np.array([token_ids[start:start + window]], dtype=np.int64)
        logits = run(ids, lora)[0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= logp[np.arange(window - 1), ids[0, 1:]].sum()
        count += window - 1
    return float(np.exp(total / count))


def _onnx_int8(store, record: dict, tmp: Path, job: dict, adapter_path: Path, device) -> dict:
    """The ONNX base with its MatMul weights in int8 (per channel, dynamic activations: onnxruntime's
    quantize_dynamic); the LoRA inputs stay float32. Its cost: held-out perplexity against float32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from safetensors.numpy import load

    from fleettune.shared import corpora
    from fleettune.shared.device import models
    from fleettune.shared.export import to_onnx

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    fp32 = tmp / "fp32.onnx"
    fp32.write_bytes(store.get(record["base"]["key"]))
    dynamic = tmp / "int8-dynamic.onnx"
    quantize_dynamic(fp32, dynamic, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8)
    int8 = tmp / "int8.onnx"  # weight-only: int8 blocks of 32 with their scales, activations in float
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=8, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(int8))
    tokenizer = models.load_tokenizer(job["model"])
    text = "\n".join(corpora.heldout_text(d, 6_000) for d in ("literature", "legal", "code"))
    token_ids = tokenizer(text)["input_ids"]
    tensors = load(adapter_path.read_bytes())
    lora = [tensors[n] for n in record["base"]["inputs"][1:]]
    ppl32 = _perplexity(to_onnx.runner(fp32), lora, token_ids)
    for name, path in (("dynamic int8 (weights and activations)", dynamic), ("weight-only int8", int8)):
        ppl8 = _perplexity(to_onnx.runner(path), lora, token_ids)
        print(f"onnx {name}: held-out perplexity {ppl8:.3f} vs {ppl32:.3f} float32 ({100 * (ppl8 / ppl32 - 1):+.2f} %), "
              f"base {path.stat().st_size} vs {fp32.stat().st_size} bytes")
    return {"format": "onnx-int8", "convert_s": None, "base_bytes": int8.stat().st_size,
            "adapter_bytes": record["adapter"]["size"], "parity": None,
            **device("onnx", str(int8), record["base"]["inputs"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--formats", nargs="+", default=["onnx", "executorch", "litert", "coreml"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--int8", action="store_true", help="also ONNX with int8 weights, and its perplexity cost")
    parser.add_argument("--device", help=argparse.SUPPRESS)  # a JSON job: one runtime in a process of its own
    args = parser.parse_args()
    if args.device:
        import os

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        print(json.dumps(_device(json.loads(args.device), args.new_tokens)))
        return

    import torch

    from fleettune.shared.device import models
    from fleettune.shared.export.exporter import CONVERTERS, export_version
    from fleettune.shared.settings import Settings

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store, config = _publish(args.model, Path(tmp) / "store")
        adapter_path = Path(tmp) / "adapter.safetensors"
        adapter_path.write_bytes(store.get("federations/bench/versions/000001/adapter_model.safetensors"))

        tokenizer = models.load_tokenizer(args.model)
        job = {"model": args.model, "adapter": str(adapter_path), "pad": tokenizer.pad_token_id,
               "ids": tokenizer(PROMPT)["input_ids"][:16]}

        def device(fmt: str, base: str = "", inputs: list | None = None) -> dict:
            one = dict(job, format=fmt, base=base, inputs=inputs or [], module=CONVERTERS.get(fmt))
            done = subprocess.run([sys.executable, __file__, "--new-tokens", str(args.new_tokens), "--device",
                                   json.dumps(one)], capture_output=True, text=True, check=True)
            return json.loads(done.stdout.strip().splitlines()[-1])

        reference = {"torch-cache": device("torch-cache"), "torch": device("torch")}
        for name, figures in reference.items():
            rows.append({"format": name, "convert_s": None, "base_bytes": None, "adapter_bytes": adapter_path.stat().st_size,
                         "parity": None, **figures})
        for fmt in args.formats:
            started = time.perf_counter()
            record = export_version(store, Settings(), config, 1, fmt)
            convert_s = time.perf_counter() - started
            row = {"format": fmt, "convert_s": convert_s, "base_bytes": record["base"]["size"],
                   "adapter_bytes": record["adapter"]["size"], "parity": record["parity"]["max_abs_logit_diff"]}
            if record["parity"]["max_abs_logit_diff"] is not None:
                base_file = Path(tmp) / record["base"]["key"].rsplit("/", 1)[-1]
                base_file.write_bytes(store.get(record["base"]["key"]))
                row.update(device(fmt, str(base_file), record["base"]["inputs"]))
            rows.append(row)
            if fmt == "onnx" and args.int8:
                rows.append(_onnx_int8(store, record, Path(tmp), job, adapter_path, device))
    torch_row = reference["torch"]
    print(f"model {args.model}; {args.new_tokens} new tokens after a 16-token prompt; 1 thread per runtime")
    print(f"{'format':12} {'convert s':>9} {'base bytes':>12} {'adapter B':>10} {'full/adapter':>12} "
          f"{'max|dlogit|':>11} {'load s':>7} {'peak RSS MB':>11} {'tok/s':>7} {'tok/s vs torch':>14}")
    for r in rows:
        def cell(value, spec: str, width: int, suffix: str = "") -> str:
            return ("-" if value is None else format(value, spec) + suffix).rjust(width)
        ratio = r["base_bytes"] / r["adapter_bytes"] if r["base_bytes"] else None
        speed = r.get("tokens_per_s")
        print(f"{r['format']:12} {cell(r['convert_s'], '.1f', 9)} {cell(r['base_bytes'], 'd', 12)} "
              f"{r['adapter_bytes']:>10d} {cell(ratio, '.0f', 12, 'x')} {cell(r['parity'], '.1e', 11)} "
              f"{cell(r.get('load_s'), '.2f', 7)} {cell(r.get('peak_rss_mb'), '.0f', 11)} {cell(speed, '.1f', 7)} "
              f"{cell(speed / torch_row['tokens_per_s'] if speed else None, '.2f', 14, 'x')}")

if __name__ == "__main__":
    main()
