"""Core ML `.mlpackage` (an ML program, float32) through coremltools' TorchScript path.

Core ML executes only on Apple platforms, so on Linux the parity figure is `n/a`. What is checked
here instead: the package's inputs and outputs against the adapter's names and shapes, the MIL op
set the program uses (coremltools validates it against the deployment target while converting), and
that every base weight of the PyTorch model is in the program unchanged.

coremltools 9's `int` converter trails torch 2.13's TorchScript, which hands it a one-element array
(from transformers' attention code) where it expects a 0-d one; it is widened here, on use.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch

from fleettune.shared.export.adapter_inputs import AdapterInputs, Positional

MAX_TOKENS = 512
TARGET = "iOS17"
NOT_RUNNABLE = "Core ML runs only on Apple platforms; coremltools cannot execute an ML program on Linux"


class Unrunnable(RuntimeError):
    pass


def convert(model: AdapterInputs, example: torch.Tensor, lora: list[torch.Tensor], out: Path) -> Path:
    import coremltools as ct

    _patch_converters()
    model.explicit_mask = True
    traced = torch.jit.trace(Positional(model).eval(), (example, *lora), strict=False, check_trace=False)
    inputs = [ct.TensorType(name="input_ids", shape=(1, ct.RangeDim(2, MAX_TOKENS, default=example.shape[1])),
                            dtype=np.int32)]
    inputs += [ct.TensorType(name=f"lora_{i}", shape=tuple(t.shape)) for i, t in enumerate(lora)]
    package = ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name="logits")], convert_to="mlprogram",
                         minimum_deployment_target=getattr(ct.target, TARGET),
                         compute_precision=ct.precision.FLOAT32)
    folder = out.with_suffix("")  # model.mlpackage
    package.save(str(folder))
    _zip(folder, out)
    return out


def runner(path: Path):
    raise Unrunnable(NOT_RUNNABLE)


def check(path: Path, model: AdapterInputs) -> dict:
    """What Linux can check of a converted package: its interface, op set and base weights."""
    import coremltools as ct

    folder = path.with_suffix(".checked")
    with zipfile.ZipFile(path) as archive:
        archive.extractall(folder)
    package = ct.models.MLModel(str(folder / path.with_suffix("").name), skip_model_load=True)
    spec = package.get_spec()
    inputs = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
    expected = {f"lora_{i}": list(s) for i, s in enumerate(model.shapes)}
    if any(inputs.get(k) != v for k, v in expected.items()) or "input_ids" not in inputs:
        raise ValueError(f"the package's inputs {sorted(inputs)} do not match the adapter's")
    if [o.name for o in spec.description.output] != ["logits"]:
        raise ValueError("the package's output is not `logits`")
    program = _reload(package)  # a package loaded from disk carries no MIL program of its own
    ops = sorted({op.op_type for f in program.functions.values() for op in f.operations})
    consts = {}
    for f in program.functions.values():
        for op in f.operations:
            if op.op_type == "const" and op.outputs[0].val is not None and np.ndim(op.outputs[0].val) >= 1:
                val = np.asarray(op.outputs[0].val)
                consts.setdefault(val.shape, []).append(val)
    base = {n: p.detach().numpy() for n, p in model.model.named_parameters() if "lora_" not in n}
    missing = [n for n, w in base.items() if not any(np.array_equal(w, c) for c in consts.get(w.shape, ()))]
    if missing:
        raise ValueError(f"{len(missing)} base weights are not in the program unchanged, e.g. {missing[0]}")
    return {"target": TARGET, "inputs": len(inputs), "ops": ops, "base_weights_checked": len(base)}


def versions() -> dict[str, str]:
    import coremltools
    return {"torch": torch.__version__, "coremltools": coremltools.__version__}


def _zip(folder: Path, out: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                info = zipfile.ZipInfo(str(file.relative_to(folder.parent)), date_time=(1980, 1, 1, 0, 0, 0))
                archive.writestr(info, file.read_bytes())
    out.write_bytes(buffer.getvalue())


def _reload(package):
    from coremltools.converters.mil.frontend.milproto.load import load

    return load(package.get_spec(), specification_version=package.get_spec().specificationVersion,
                file_weights_dir=package.weights_dir)


_PATCHED = False


def _patch_converters() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    original_int = _TORCH_OPS_REGISTRY.get_func("int")

    @register_torch_op(torch_alias=["int"], override=True)
    def _int(context, node):  # int() of a one-element array, not only of a 0-d one
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.val is not None and np.size(x.val) == 1 and np.ndim(x.val) > 0:
            context.add(mb.const(val=np.int32(np.asarray(x.val).reshape(-1)[0]), name=node.name))
            return
        original_int(context, node)

    _PATCHED = True
