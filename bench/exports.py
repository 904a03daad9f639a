"""What each on-device format costs and saves: conversion, bytes per version update, and on the
device side load time, peak RSS and generation speed, against PyTorch + PEFT.

    python bench/exports.py [--model tiny|smollm2] [--formats onnx executorch litert coreml] [--new-tokens 32]

A version's adapter (rank 8 on q/k/v/o, random small weights: speed and bytes do not depend on
their values) is published to a local store and exported to each format with the function the
`fleettune.export` task runs. Each runtime then runs in a process of its own, so that its peak RSS
(ru_maxrss) is its own: load the base artifact and the adapter, then greedy-generate `--new-tokens`
tokens after a 16-token prompt. The exported graphs have no KV cache (each step runs the whole
sequence), so PyTorch + PEFT is timed both ways: without its cache (the same work) and with it.
Core ML executes only on Apple platforms: its row has bytes and conversion, not speed. The ratios
printed are against PyTorch + PEFT measured in the same run, on the same cores (1 thread each).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind"


def _publish(model: str, store_dir: Path):
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


def _device(fmt: str, model: str, base: str, adapter: str, inputs: list[str], new_tokens: int) -> dict:
    """One runtime in this process: load, then generate; prints its own figures."""
    torch.set_num_threads(1)
    from safetensors.numpy import load

    from fleettune.shared.device import models

    tokenizer = models.load_tokenizer(model)
    ids = np.array([tokenizer(PROMPT)["input_ids"][:16]], dtype=np.int64)
    started = time.perf_counter()
    if fmt.startswith("torch"):
        from fleettune.shared.device import trainer
        from fleettune.shared.protocol.adapter_spec import AdapterConfig

        peft = trainer.peft_model(models.load_model(model), AdapterConfig())
        trainer.load_adapter_weights(peft, {k: torch.from_numpy(v) for k, v in load(Path(adapter).read_bytes()).items()})
        cache = fmt == "torch-cache"
        loaded = time.perf_counter()
        with torch.no_grad():
            out = peft.generate(input_ids=torch.from_numpy(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, use_cache=cache, pad_token_id=tokenizer.pad_token_id)
        produced = out.shape[1] - ids.shape[1]
    else:
        from fleettune.shared.export.exporter import converter_of

        tensors = load(Path(adapter).read_bytes())
        lora = [tensors[n] for n in inputs[1:]]
        run = converter_of(fmt).runner(Path(base))
        loaded = time.perf_counter()
        seq = ids
        for _ in range(new_tokens):
            logits = run(seq, lora)
            seq = np.concatenate([seq, logits[:, -1:].argmax(-1).astype(np.int64)], axis=1)
        produced = new_tokens
    done = time.perf_counter()
    return {"load_s": loaded - started, "tokens_per_s": produced / (done - loaded),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--formats", nargs="+", default=["onnx", "executorch", "litert", "coreml"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", nargs=5, metavar=("FORMAT", "MODEL", "BASE", "ADAPTER", "INPUTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device:
        fmt, model, base, adapter, inputs = args.device
        print(json.dumps(_device(fmt, model, base, adapter, json.loads(inputs), args.new_tokens)))
        return

    from fleettune.shared.export.exporter import export_version
    from fleettune.shared.settings import Settings

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store, config = _publish(args.model, Path(tmp) / "store")
        adapter_path = Path(tmp) / "adapter.safetensors"
        adapter_path.write_bytes(store.get(f"federations/bench/versions/000001/adapter_model.safetensors"))

        def device(fmt: str, base: str = "", inputs: list | None = None) -> dict:
            done = subprocess.run([sys.executable, __file__, "--new-tokens", str(args.new_tokens), "--device", fmt,
                                   args.model, base or "-", str(adapter_path), json.dumps(inputs or [])],
                                  capture_output=True, text=True, check=True)
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
    torch_row = reference["torch"]
    print(f"model {args.model}; {args.new_tokens} new tokens after a 16-token prompt; 1 thread per runtime")
    print(f"{'format':12} {'convert s':>9} {'base bytes':>12} {'adapter B':>10} {'full/adapter':>12} "
          f"{'max|dlogit|':>11} {'load s':>7} {'peak RSS MB':>11} {'tok/s':>7} {'tok/s vs torch':>14}")
    for r in rows:
        fmt_ = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        ratio = r["base_bytes"] / r["adapter_bytes"] if r["base_bytes"] else None
        speed = r.get("tokens_per_s")
        print(f"{r['format']:12} {fmt_(r['convert_s'], '9.1f')} {fmt_(r['base_bytes'], '12d')} "
              f"{r['adapter_bytes']:>10d} {fmt_(ratio, '11.0f') + ('x' if ratio else ''):>12} {fmt_(r['parity'], '11.1e')} "
              f"{fmt_(r.get('load_s'), '7.2f')} {fmt_(r.get('peak_rss_mb'), '11.0f')} {fmt_(speed, '7.1f')} "
              f"{fmt_(speed / torch_row['tokens_per_s'] if speed else None, '13.2f') + ('x' if speed else ''):>14}")


if __name__ == "__main__":
    main()
