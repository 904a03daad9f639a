"""What a registered base-model file holds: its dimensions, whether devices can train on it, and why not.

A registry version is read once, as a stream, while its sha256 is computed: headers are parsed,
tensor bytes are skipped and never held, so a multi-GB model costs the API a few MB. Formats:

- a Hugging Face directory as a tar archive (`.tar`, `.tar.gz`, `.tgz`): config.json, tokenizer.json
  and *.safetensors (sharded is fine) at its top or under one folder; trainable;
- one `.safetensors` file with the config in its metadata (`config`: config.json's text; optional
  `tokenizer`: tokenizer.json's text); trainable when the tokenizer is there too;
- an `.onnx` file: shapes from its initializers; never trainable (no PyTorch weights to adapt);
- anything else (Core ML, TFLite, ...): stored as an artifact, not trainable.

A file that is malformed or disagrees with itself (a config that does not match the weights, a
truncated tensor section, an ONNX graph without attention projections) raises InvalidModel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
import tarfile
from typing import Any, BinaryIO

from fleettune.shared.protocol.adapter_spec import ModelDims

MAX_HEADER = 64 * 1024 * 1024  # a safetensors header (metadata may carry a tokenizer of a few MB)
MAX_CONFIG = 1024 * 1024
TRAINABLE_HINT = ("upload the Hugging Face model directory as a .tar.gz (config.json, tokenizer.json, "
                  "*.safetensors) or one .safetensors file with config.json (and tokenizer.json) in its metadata")
_PROJ = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight$")
_EMBED = re.compile(r"(?:^|\.)embed_tokens\.weight$")
_GATE = re.compile(r"(?:^|\.)layers\.0\.mlp\.gate_proj\.weight$")


class InvalidModel(ValueError):
    """The file is not what its name says, or its parts disagree: the message says how."""


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    format: str  # "hf-archive" | "safetensors" | "onnx" | "artifact"
    dims: ModelDims | None
    trainable: bool
    why_not: str = ""  # for an untrainable model: what to upload instead

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "dims": dataclasses.asdict(self.dims) if self.dims else None,
                "trainable": self.trainable, "why_not": self.why_not or None}


class HashingReader:
    """A read-only stream that hashes and counts what passes through it (one pass for both)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n) if n is not None and n >= 0 else self.raw.read()
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def inspect(filename: str, stream: BinaryIO, size: int) -> ModelFacts:
    """The facts of a base-model file named `filename`, read from `stream` (`size` bytes)."""
    name = filename.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return _archive(stream)
    if name.endswith(".safetensors"):
        header, metadata = _safetensors_header(stream, size, filename)
        if "config" not in metadata:
            raise InvalidModel(f"{filename} has no config in its metadata: {TRAINABLE_HINT}")
        dims = _checked_dims(_json(metadata["config"], "config"), _shapes(header))
        if "tokenizer" not in metadata:
            return ModelFacts("safetensors", dims, False, f"no tokenizer in the metadata: {TRAINABLE_HINT}")
        _json(metadata["tokenizer"], "tokenizer")
        return ModelFacts("safetensors", dims, True)
    if name.endswith(".onnx"):
        return _onnx(onnx_initializers(stream))
    return ModelFacts("artifact", None, False, f"{filename} is not a format fleettune trains on: {TRAINABLE_HINT}")


def _json(text: str | bytes, what: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidModel(f"{what} is not a JSON object")
    return value


def _read_exact(stream: BinaryIO, n: int, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise InvalidModel(f"{what} is truncated: {len(data)} of {n} bytes")
    return data


def _safetensors_header(stream: BinaryIO, size: int, what: str) -> tuple[dict, dict]:
    """(tensor entries, metadata) of a safetensors file; its tensor section must fill the file exactly."""
    if size < 8:
        raise InvalidModel(f"{what} is truncated: {size} bytes, no header")
    (length,) = struct.unpack("<Q", _read_exact(stream, 8, what))
    if length > MAX_HEADER or 8 + length > size:
        raise InvalidModel(f"{what}: a header of {length} bytes does not fit a {size}-byte file "
                           f"(at most {MAX_HEADER})")
    header = _json(_read_exact(stream, length, what), f"{what}'s header")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, entry in header.items():
        try:
            start, stop = entry["data_offsets"]
            shape = [int(d) for d in entry["shape"]]
        except (TypeError, KeyError, ValueError):
            raise InvalidModel(f"{what}: tensor {name!r} has no valid shape and offsets") from None
        if not 0 <= start <= stop or any(d < 0 for d in shape):
            raise InvalidModel(f"{what}: tensor {name!r} has invalid offsets or shape")
        end = max(end, stop)
    if 8 + length + end != size:
        raise InvalidModel(f"{what} is truncated or padded: its tensors end at byte {8 + length + end}, "
                           f"the file has {size}")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidModel(f"{what}: metadata must map strings to strings")
    return header, metadata


def _shapes(header: dict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in entry["shape"]) for name, entry in header.items()}


def _checked_dims(config: dict, shapes: dict[str, tuple[int, ...]]) -> ModelDims:
    """Dimensions from config.json, each checked against the weights' shapes."""
    try:
        dims = ModelDims(hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]),
                         heads=int(config["num_attention_heads"]),
                         kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                         intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModel(f"config.json lacks a Llama-architecture field ({exc}); fleettune adapts q/k/v/o "
                           "projections of decoder layers") from None
    if min(dataclasses.astuple(dims)) < 1 or dims.hidden % dims.heads or dims.heads % dims.kv_heads:
        raise InvalidModel(f"config.json's dimensions are inconsistent: {dims}")
    if "head_dim" in config and int(config["head_dim"]) != dims.head_dim:
        raise InvalidModel(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads ({dims.head_dim}): "
                           "not supported")
    layers = {}
    for name, shape in shapes.items():
        if found := _PROJ.search(name):
            layers.setdefault(int(found.group(1)), {})[found.group(2) + "_proj"] = shape
    if not layers:
        raise InvalidModel("the weights have no attention projections (model.layers.N.self_attn.q_proj.weight)")
    if sorted(layers) != list(range(dims.layers)):
        raise InvalidModel(f"config.json says {dims.layers} layers, the weights have attention in "
                           f"{len(layers)} (indices {min(layers)}..{max(layers)})")
    for index, modules in layers.items():
        for module, shape in modules.items():
            if shape != dims.module_shape(module):
                raise InvalidModel(f"layer {index} {module} is {list(shape)} in the weights, config.json implies "
                                   f"{list(dims.module_shape(module))}")
    for pattern, expected, what in ((_EMBED, (dims.vocab, dims.hidden), "embed_tokens"),
                                    (_GATE, (dims.intermediate, dims.hidden), "gate_proj")):
        for name, shape in shapes.items():
            if pattern.search(name) and shape != expected:
                raise InvalidModel(f"{what} is {list(shape)} in the weights, config.json implies {list(expected)}")
    return dims


def _archive(stream: BinaryIO) -> ModelFacts:
    """A tar(.gz) of a Hugging Face directory, read member by member in one forward pass."""
    config, tokenizer, shapes, weights = None, False, {}, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                parts = member.name.strip("/").split("/")
                if member.issym() or member.islnk() or ".." in parts or member.name.startswith("/"):
                    raise InvalidModel(f"archive member {member.name!r}: links and paths outside the folder "
                                       "are refused")
                if not member.isfile() or len(parts) > 2:
                    continue
                base, fh = parts[-1], tar.extractfile(member)
                if base == "config.json":
                    if member.size > MAX_CONFIG:
                        raise InvalidModel(f"config.json is {member.size} bytes (at most {MAX_CONFIG})")
                    config = _json(_read_exact(fh, member.size, "config.json"), "config.json")
                elif base == "tokenizer.json":
                    tokenizer = True
                elif base.endswith(".safetensors"):
                    header, _ = _safetensors_header(fh, member.size, base)
                    shapes.update(_shapes(header))
                    weights += 1
    except tarfile.TarError as exc:
        raise InvalidModel(f"not a readable tar archive: {exc}") from None
    if config is None or not weights:
        raise InvalidModel(f"the archive needs config.json and *.safetensors: {TRAINABLE_HINT}")
    dims = _checked_dims(config, shapes)
    if not tokenizer:
        return ModelFacts("hf-archive", dims, False, f"no tokenizer.json in the archive: {TRAINABLE_HINT}")
    return ModelFacts("hf-archive", dims, True)


def _onnx(shapes: dict[str, tuple[int, ...]]) -> ModelFacts:
    projections = [name for name in shapes if re.search(r"[qkvo]_proj", name)]
    if not projections:
        raise InvalidModel("the ONNX graph has no attention projection initializers (q_proj, k_proj, v_proj, o_proj)")
    return ModelFacts("onnx", None, False, f"an ONNX file carries no trainable PyTorch weights: {TRAINABLE_HINT}")


# --- ONNX: initializer names and shapes, read from the protobuf stream without holding tensor data ---
# ModelProto.graph = field 7; GraphProto.initializer = field 5 (TensorProto); TensorProto.dims = 1,
# TensorProto.name = 8. Everything else, raw_data included, is skipped as it streams past. A parser of
# our own because onnx.load holds the whole file (weights included) in memory, in the API process.

MAX_INITIALIZERS = 1_000_000


class _Wire:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.pos = stream, 0

    def read(self, n: int) -> bytes:
        data = _read_exact(self.stream, n, "the ONNX file")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        while n > 0:
            n -= len(self.read(min(n, 1 << 20)))

    def varint(self, first: int | None = None) -> int:
        value = shift = 0
        while True:
            byte, first = (first, None) if first is not None else (self.read(1)[0], None)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise InvalidModel("the ONNX file has a malformed varint")

    def key(self) -> tuple[int, int]:
        key = self.varint()
        return key >> 3, key & 7

    def top_key(self) -> tuple[int, int] | None:
        """The next top-level field's key, or None at a clean end of the file."""
        first = self.stream.read(1)
        if not first:
            return None
        self.pos += 1
        key = self.varint(first[0])
        return key >> 3, key & 7

    def skip_value(self, wire: int) -> None:
        if wire == 0:
            self.varint()
        elif wire == 1:
            self.skip(8)
        elif wire == 2:
            self.skip(self.varint())
        elif wire == 5:
            self.skip(4)
        else:
            raise InvalidModel(f"the ONNX file has an unknown protobuf wire type {wire}")


def onnx_initializers(stream: BinaryIO) -> dict[str, tuple[int, ...]]:
    """name -> shape of every initializer of an ONNX model."""
    wire, found = _Wire(stream), {}
    try:
        while (key := wire.top_key()) is not None:
            field, kind = key
            if field == 7 and kind == 2:
                _graph(wire, wire.varint(), found)
            else:
                wire.skip_value(kind)
    except InvalidModel as exc:
        raise InvalidModel(f"not a readable ONNX file: {exc}") from None
    if wire.pos == 0:
        raise InvalidModel("the ONNX file is empty")
    return found


def _graph(wire: _Wire, length: int, found: dict) -> None:
    end = wire.pos + length
    while wire.pos < end:
        field, kind = wire.key()
        if field == 5 and kind == 2:
            name, shape = _tensor(wire, wire.varint())
            if len(found) >= MAX_INITIALIZERS:
                raise InvalidModel(f"more than {MAX_INITIALIZERS} initializers")
            found[name] = shape
        else:
            wire.skip_value(kind)


def _tensor(wire: _Wire, length: int) -> tuple[str, tuple[int, ...]]:
    end, name, dims = wire.pos + length, "", []
    while wire.pos < end:
        field, kind = wire.key()
        if field == 1 and kind == 0:
            dims.append(wire.varint())
        elif field == 1 and kind == 2:  # packed
            stop = wire.pos + wire.varint()
            while wire.pos < stop:
                dims.append(wire.varint())
        elif field == 8 and kind == 2:
            size = wire.varint()
            if size > 4096:
                raise InvalidModel("an initializer name over 4096 bytes")
            name = wire.read(size).decode("utf-8", "replace")
        else:
            wire.skip_value(kind)
    return name, tuple(dims)
