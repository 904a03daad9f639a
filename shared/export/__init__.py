"""Published versions for on-device runtimes (ONNX, ExecuTorch, Core ML, LiteRT).

`adapter_inputs` makes the LoRA tensors inputs of one graph per base model and adapter layout;
`to_<format>` converts and runs it; `parity` compares it with PyTorch + PEFT; `exporter` exports one
version to one format; `tracking` records where each export stands. See docs/exports.md.
"""
