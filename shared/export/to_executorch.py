"""ExecuTorch `.pte` lowered to XNNPACK (dynamic sequence length), run by ExecuTorch's runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fleettune.shared.export.adapter_inputs import AdapterInputs

MAX_TOKENS = 512


def convert(model: AdapterInputs, example: torch.Tensor, lora: list[torch.Tensor], out: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    seq = torch.export.Dim("seq", min=2, max=MAX_TOKENS)
    program = torch.export.export(model, (example, lora), dynamic_shapes=({1: seq}, [None] * len(lora)),
                                  strict=False)
    out.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    return out


def runner(path: Path):
    """run(input_ids, lora) -> logits, on one loaded ExecuTorch method."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")

    def run(input_ids: np.ndarray, lora: list[np.ndarray]) -> np.ndarray:
        inputs = [torch.from_numpy(input_ids.astype(np.int64))] + [torch.from_numpy(t) for t in lora]
        return method.execute(inputs)[0].numpy()
    return run


def versions() -> dict[str, str]:
    from importlib.metadata import version
    return {"torch": torch.__version__, "executorch": version("executorch")}
