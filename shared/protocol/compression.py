"""Compressed update encodings: what a device may send instead of float32, and the server's way back.

An update stays one safetensors file; `__metadata__["encoding"]` names how it is coded
(docs/protocol.md, "Update encodings"):

    float32 / float16 / bfloat16   each tensor as is, under its own name (no metadata: as sent)
    int8    `codes` I8 [N] and `scale` F32 [B]: every tensor of the layout, in sorted-name order,
            flattened and concatenated (N entries); each tensor cut in blocks of BLOCK, one scale
            per block (B in all), x ≈ code · scale. Blocks, not rows: LoRA B's rows are r = 8 wide,
            where a float32 scale per row would cost half as much again as the codes.
    int4    `codes` U8 [ceil(N / 2)], two 4-bit codes c = q + 7 (q in [-7, 7]) per byte, low bits
            first, and `scale` as for int8: x ≈ q · scale
    int2    ternary (TernGrad, Wen et al. 2017): `codes` U8 [ceil(N / 4)], four 2-bit codes
            c = q + 1 (q in {-1, 0, 1}) per byte, low bits first, and `scale` as for int8
    topk    `mask` U8 [ceil(N / 8)], a bitmap of the entries sent (bit i of the concatenation is
            bit i % 8 of byte i // 8), and `values` F16 [K] in position order: per tensor its
            ceil(density · n) largest entries, K in all; `__metadata__["density"]` gives the
            density. A bitmap costs 1/8 byte an entry, less than 4-byte indices from 3 % density on.

One tensor per field rather than per adapter tensor: the JSON header of a 32-tensor adapter is
4 KB, an eighth of an int8 update's codes on the tiny model. Codes are rounded stochastically (unbiased:
E[code · scale] = x), and the device keeps what the code lost as error feedback (`Compressor`),
added to its next update, so nothing is dropped for good. Every size is fixed by the layout, the
encoding and the density, so the strict reader checks exact sizes before any value is read; what
only values can break (a scale, an index, an unused packed code) is checked in `read_update`, each with its
reason.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import numpy as np
import torch
from safetensors.numpy import save
from safetensors.torch import save as save_torch

from fleettune.shared.errors import RejectReason, Rejected
from fleettune.shared.protocol.safetensors_reader import DTYPES, parse

BLOCK = 128  # elements per int8/int4/int2 scale: a float32 scale per 128 codes adds 3 % to int8 (3.88x float32)
DENSE = ("float32", "float16", "bfloat16")
ENCODINGS = (*DENSE, "int8", "int4", "int2", "topk")  # federation.UpdateEncoding names them for configs
LEVELS = {"int8": 127, "int4": 7, "int2": 1}  # |q| <= levels
BITS = {"int4": 4, "int2": 2}  # packed codes: 8 // bits per byte
MAX_DENSITY = 0.5  # above it top-k sends more bytes than float16 does
CODED_DTYPES = {**DTYPES, "I8": (torch.int8, 1), "U8": (torch.uint8, 1)}
_DENSE_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_NUMPY = {"float32": np.float32, "float16": np.float16}


def header_metadata(buf: bytes, max_header_bytes: int) -> dict:
    """The `__metadata__` of a safetensors file, without reading its tensors. Malformed headers
    are left to `parse`, which names what is wrong; here they read as "no metadata"."""
    if len(buf) < 8:
        return {}
    (n,) = struct.unpack("<Q", buf[:8])
    if n > max_header_bytes or 8 + n > len(buf) or b"__metadata__" not in buf[8:8 + n]:
        return {}  # most updates: float32 without metadata, and the header is parsed once, by `parse`
    try:
        header = json.loads(buf[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _density(meta: Mapping[str, str]) -> float:
    try:
        density = float(meta.get("density", ""))
    except (TypeError, ValueError):  # the header's own checks come later: any JSON value can be here
        density = math.nan
    if not 0.0 < density <= MAX_DENSITY:
        raise Rejected(RejectReason.BAD_ENCODING, f"topk density must be in (0, {MAX_DENSITY}]: "
                       f"{str(meta.get('density'))[:20]!r}")
    return density


def topk_count(numel: int, density: float) -> int:
    return min(numel, math.ceil(density * numel))


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def coded_layout(layout: Mapping[str, tuple[int, ...]], encoding: str, density: float = 0.0
                 ) -> dict[str, tuple[tuple[int, ...], str]]:
    """The coded file's tensors, name -> (shape, safetensors dtype), for an update of `layout`."""
    if encoding in DENSE:
        return {name: (tuple(shape), _DENSE_DTYPE[encoding]) for name, shape in layout.items()}
    sizes = [math.prod(shape) for _, shape in sorted(layout.items())]
    total = sum(sizes)
    if encoding == "topk":
        k = sum(topk_count(n, density) for n in sizes)
        return {"mask": ((-(-total // 8),), "U8"), "values": ((k,), "F16")}
    per = 8 // BITS.get(encoding, 8)
    codes = ((total,), "I8") if encoding == "int8" else ((-(-total // per),), "U8")
    return {"codes": codes, "scale": ((sum(_blocks(n) for n in sizes),), "F32")}


def encoding_of(meta: Mapping[str, str]) -> str:
    encoding = meta.get("encoding", "")
    if encoding == "":
        return ""  # dense, in whichever float dtype each tensor has
    if encoding not in ENCODINGS:
        raise Rejected(RejectReason.BAD_ENCODING, f"unknown encoding {str(encoding)[:24]!r}; known: "
                       f"{', '.join(ENCODINGS)}")
    return encoding


def read_update(buf: bytes, layout: Mapping[str, tuple[int, ...]], max_header_bytes: int
                ) -> tuple[dict[str, torch.Tensor], str]:
    """An update file of any encoding -> (float tensors of `layout`, its encoding), or Rejected
    naming what is wrong. Dense updates come back as views into `buf`, as `parse` gives them."""
    meta = header_metadata(buf, max_header_bytes)
    encoding = encoding_of(meta)
    if encoding in ("", *DENSE):
        tensors = parse(buf, layout, max_header_bytes)
        if encoding:
            want = CODED_DTYPES[_DENSE_DTYPE[encoding]][0]
            if wrong := [k for k, t in tensors.items() if t.dtype != want]:
                raise Rejected(RejectReason.BAD_DTYPE, f"{wrong[0][:80]}: not {encoding} as the metadata says")
        return tensors, encoding or "float32"
    density = _density(meta) if encoding == "topk" else 0.0
    coded = coded_layout(layout, encoding, density)
    tensors = parse(buf, {k: shape for k, (shape, _) in coded.items()}, max_header_bytes, CODED_DTYPES)
    for name, (_, dtype) in coded.items():
        if tensors[name].dtype != CODED_DTYPES[dtype][0]:
            raise Rejected(RejectReason.BAD_DTYPE, f"{name}: {encoding} codes it as {dtype}")
    flat = _topk_flat(tensors, layout) if encoding == "topk" else _scaled_flat(tensors, layout, encoding)
    out, offset = {}, 0
    for name, shape in sorted(layout.items()):
        n = math.prod(shape)
        out[name] = flat[offset:offset + n].view(shape)
        offset += n
    return {name: out[name] for name in layout}, encoding


def _topk_flat(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[int, ...]]) -> torch.Tensor:
    total = sum(math.prod(shape) for shape in layout.values())
    bits = np.unpackbits(tensors["mask"].numpy(), bitorder="little")
    values = tensors["values"].float()
    if bits[total:].any():
        raise Rejected(RejectReason.BAD_ENCODING, f"mask bits past the update's {total} entries are set")
    chosen = torch.from_numpy(bits[:total].astype(bool))
    if int(chosen.sum()) != len(values):
        raise Rejected(RejectReason.BAD_ENCODING, f"the mask marks {int(chosen.sum())} entries, values hold {len(values)}")
    flat = torch.zeros(total, dtype=torch.float32)
    flat[chosen] = values
    return flat


def _scaled_flat(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[int, ...]], encoding: str
                 ) -> torch.Tensor:
    scale = tensors["scale"]
    if bool((scale < 0).any()):  # NaN and Inf pass here: the update's norm refuses them as non_finite
        raise Rejected(RejectReason.BAD_ENCODING, "a negative scale")
    sizes = [math.prod(shape) for _, shape in sorted(layout.items())]
    total = sum(sizes)
    if encoding == "int8":
        codes = tensors["codes"].float()
    else:
        bits, levels = BITS[encoding], LEVELS[encoding]
        packed, mask = tensors["codes"], (1 << bits) - 1
        codes = torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=1).reshape(-1)[:total]
        if bool((codes > 2 * levels).any()):
            raise Rejected(RejectReason.BAD_ENCODING, f"{encoding} codes are q + {levels} <= {2 * levels}")
        codes = codes.float() - levels
    parts, offset, block = [], 0, 0
    for n in sizes:  # each tensor padded to whole blocks, scaled, and cut back
        b = _blocks(n)
        padded = torch.zeros(b * BLOCK)
        padded[:n] = codes[offset:offset + n]
        parts.append((padded.view(b, BLOCK) * scale[block:block + b].view(b, 1)).reshape(-1)[:n])
        offset, block = offset + n, block + b
    return torch.cat(parts) if parts else torch.zeros(0)


def _stochastic(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round to an integer up or down with the probabilities that keep the mean: E[result] = x."""
    low = np.floor(x)
    return low + (rng.random(x.shape, dtype=np.float32) < (x - low))


def encode(arrays: Mapping[str, np.ndarray], encoding: str, rng: np.random.Generator, density: float = 0.05
           ) -> bytes:
    """A device's update as one safetensors file in `encoding` (the module docstring's formats)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    meta = {"encoding": encoding}
    if encoding == "bfloat16":
        return save_torch({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)).bfloat16()
                           for k, v in arrays.items()}, metadata=meta)
    if encoding in DENSE:
        return save({k: np.ascontiguousarray(v, _NUMPY[encoding]) for k, v in arrays.items()}, metadata=meta)
    flats = [np.asarray(v, np.float32).reshape(-1) for _, v in sorted(arrays.items())]
    if encoding == "topk":
        meta["density"] = repr(float(density))
        masks = []
        for flat in flats:  # per tensor: LoRA's A and B differ in scale, one global cut would starve one
            k = topk_count(flat.size, density)
            mask = np.zeros(flat.size, bool)
            if k:
                mask[np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]] = True
            masks.append(mask)
        mask = np.concatenate(masks)
        values = np.concatenate(flats)[mask].astype(np.float16)
        return save({"mask": np.packbits(mask, bitorder="little"), "values": values}, metadata=meta)
    levels = float(LEVELS[encoding])
    codes, scales = [], []
    for flat in flats:
        blocks = np.zeros(_blocks(flat.size) * BLOCK, np.float32)
        blocks[:flat.size] = flat
        blocks = blocks.reshape(-1, BLOCK)
        scale = np.abs(blocks).max(axis=1) / levels
        safe = np.where(scale > 0, scale, 1.0)[:, None]
        codes.append(np.clip(_stochastic(blocks / safe, rng), -levels, levels).reshape(-1)[:flat.size])
        scales.append(scale.astype(np.float32))
    q = np.concatenate(codes)
    if encoding == "int8":
        packed = q.astype(np.int8)
    else:
        bits = BITS[encoding]
        per = 8 // bits
        small = np.zeros(-(-q.size // per) * per, np.uint8)
        small[:q.size] = (q + levels).astype(np.uint8)
        small = small.reshape(-1, per)
        packed = np.zeros(len(small), np.uint8)
        for i in range(per):
            packed |= small[:, i] << (bits * i)
    return save({"codes": packed, "scale": np.concatenate(scales)}, metadata=meta)


class Compressor:
    """A device's encoder with error feedback: what one update's code lost is added to the next
    (Seide et al. 2014; Karimireddy et al. 2019), so compression delays information, never drops it.
    The residual stays on the device, like its data."""

    def __init__(self, encoding: str = "float32", density: float = 0.05, seed: int = 0) -> None:
        self.encoding, self.density = encoding, density
        self.rng = np.random.default_rng(seed)
        self.residual: dict[str, np.ndarray] = {}

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        if self.encoding == "float32":
            from fleettune.shared.protocol.updates import encode_update
            return encode_update(delta)
        corrected = {}
        for k, v in delta.items():  # a residual of another layout (the device changed tier) is dropped
            r = self.residual.get(k)
            corrected[k] = np.asarray(v, np.float32) + (r if r is not None and r.shape == v.shape else 0.0)
        blob = encode(corrected, self.encoding, self.rng, self.density)
        layout = {k: tuple(v.shape) for k, v in corrected.items()}
        sent, _ = read_update(blob, layout, 1 << 24)
        self.residual = {k: corrected[k] - sent[k].float().numpy() for k in corrected}
        return blob
