"""TFLite / LiteRT through litert-torch, run by the LiteRT interpreter.

The graph has a fixed context of CONTEXT tokens (LiteRT's converter takes static shapes): a device
right-pads its sequence and reads the logits of its real positions, which causal attention leaves
exactly as they would be unpadded. The runner imports only LiteRT and numpy, as a device would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CONTEXT = 64


def convert(model, example, lora: list, out: Path) -> Path:
    import litert_torch
    import torch

    from fleettune.shared.export.adapter_inputs import Positional

    padded = torch.zeros(1, CONTEXT, dtype=torch.int32)
    litert_torch.convert(Positional(model).eval(), (padded, *lora)).export(str(out))
    return out


def runner(path: Path):
    """run(input_ids, lora) -> logits, on one LiteRT interpreter (right-padding to the context)."""
    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_path=str(path), num_threads=1).get_signature_runner()

    def run(input_ids: np.ndarray, lora: list[np.ndarray]) -> np.ndarray:
        length = input_ids.shape[1]
        if length > CONTEXT:
            raise ValueError(f"{length} tokens > the graph's context of {CONTEXT}")
        padded = np.zeros((1, CONTEXT), dtype=np.int32)
        padded[0, :length] = input_ids[0]
        # litert-torch names the positional inputs args_0 .. args_n
        out = signature(**{f"args_{i}": t for i, t in enumerate([padded, *lora])})
        return next(iter(out.values()))[:, :length]
    return run


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import torch
    return {"torch": torch.__version__, "litert-torch": version("litert-torch"),
            "ai-edge-litert": version("ai-edge-litert")}
