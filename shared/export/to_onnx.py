"""ONNX through torch.onnx's exporter (torch.export, dynamic sequence length), run by ONNX Runtime.

The runner imports only ONNX Runtime and numpy, as a device would (torch only to convert)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_TOKENS = 512  # the sequence bound the graph is exported for


def convert(model, example, lora: list, out: Path) -> Path:
    """`model`: an AdapterInputs; `example`: input ids (1, n); `lora`: its tensors in input order."""
    import torch

    seq = torch.export.Dim("seq", min=2, max=MAX_TOKENS)
    torch.onnx.export(model, (example, lora), str(out), dynamo=True, external_data=False, verbose=False,
                      input_names=["input_ids", *input_names(model)], output_names=["logits"],
                      dynamic_shapes=({1: seq}, [None] * len(lora)))
    return out


def input_names(model) -> list[str]:
    return [f"lora_{i}" for i in range(len(model.names))]


def runner(path: Path):
    """run(input_ids, lora) -> logits, on one ONNX Runtime session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(input_ids: np.ndarray, lora: list[np.ndarray]) -> np.ndarray:
        return session.run(["logits"], dict(zip(names, [input_ids.astype(np.int64), *lora])))[0]
    return run


def versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
