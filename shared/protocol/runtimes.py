"""The on-device runtimes a device may declare, and the formats published versions are exported to.

A registry version's `formats` and a device's declared runtime use the names people use
("tflite", "onnxruntime"); everything else uses the canonical format name. Labels that are not
export formats ("safetensors", "torch") name what every version already is: a PEFT directory.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    runtime: str  # what a device declares at check-in to be served this format
    filename: str  # the base artifact's object name
    executable_here: bool = True  # False: the runtime does not run on Linux (Core ML)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", "onnxruntime", "model.onnx"),
    Format("executorch", "executorch", "model.pte"),
    Format("coreml", "coreml", "model.mlpackage.zip", executable_here=False),
    Format("litert", "litert", "model.tflite"),
)}
ALIASES = {"tflite": "litert", "pte": "executorch", "mlpackage": "coreml", "mlmodel": "coreml",
           "onnxruntime": "onnx"}
PLAIN = frozenset({"torch", "pytorch", "peft", "safetensors", "hf", "hf-archive", "gguf"})  # no export needed
RUNTIMES = {f.runtime: f.name for f in FORMATS.values()} | {"tflite": "litert"}  # runtime -> format
TORCH = "torch"  # the runtime every device has: PyTorch + PEFT on the version's PEFT directory
DECLARABLE = tuple(sorted([*RUNTIMES, TORCH]))


def canonical(name: str) -> str | None:
    """The export format a label names, None for a label that needs no export; KeyError if unknown."""
    name = name.lower()
    if name in PLAIN:
        return None
    name = ALIASES.get(name, name)
    if name not in FORMATS:
        raise KeyError(name)
    return name


def wanted(labels) -> tuple[str, ...]:
    """The export formats among labels (a federation's `exports`, a registry version's `formats`),
    sorted and once each; labels that name no export format are left out."""
    out = set()
    for label in labels:
        try:
            fmt = canonical(label)
        except KeyError:
            continue  # a registry label we do not export to (it stays a label)
        if fmt is not None:
            out.add(fmt)
    return tuple(sorted(out))
