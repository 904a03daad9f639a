"""Hostile safetensors files, one builder per attack, each paired with the reason it must get."""

from __future__ import annotations

import json
import struct

import numpy as np

from fleettune.shared.errors import RejectReason


def container(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def header_of(arrays: dict[str, np.ndarray], dtype: str = "F32") -> tuple[dict, bytes]:
    header, chunks, offset = {}, [], 0
    for name, a in arrays.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    return header, b"".join(chunks)


def valid(arrays: dict[str, np.ndarray]) -> bytes:
    return container(*header_of(arrays))


def truncated(arrays):
    return valid(arrays)[:-64]


def header_length_past_end(arrays):
    blob = valid(arrays)
    return struct.pack("<Q", len(blob) + 10) + blob[8:]


def header_length_past_cap(arrays):
    return struct.pack("<Q", 2**40) + valid(arrays)[8:]


def non_json_header(arrays):
    return container(b"{this is not json" + b" " * 32, b"\x00" * 16)


def duplicate_key_header(arrays):
    header, data = header_of(arrays)
    name, entry = next(iter(header.items()))
    text = json.dumps(header)[:-1] + ", " + json.dumps(name) + ": " + json.dumps(entry) + "}"
    return container(text.encode(), data)


def overlapping_offsets(arrays):
    header, data = header_of(arrays)
    names = list(header)
    first, second = next((a, b) for a in names for b in names
                         if a != b and header[a]["shape"] == header[b]["shape"])
    header[second]["data_offsets"] = list(header[first]["data_offsets"])  # both claim the same bytes
    return container(header, data)


def wrong_dtype(arrays):
    header, data = header_of({k: v.astype(np.float64) for k, v in arrays.items()}, dtype="F64")
    return container(header, data)


def wrong_shape(arrays):
    name = next(iter(arrays))
    return valid(dict(arrays, **{name: arrays[name].T.copy()}))


def extra_key(arrays):
    return valid(dict(arrays, **{"base_model.model.lm_head.weight": np.zeros((4, 4), np.float32)}))


def missing_key(arrays):
    return valid(dict(list(arrays.items())[1:]))


def nan_value(arrays):
    name = next(iter(arrays))
    poisoned = arrays[name].copy()
    poisoned.flat[3] = np.nan
    return valid(dict(arrays, **{name: poisoned}))


def inf_value(arrays):
    name = next(iter(arrays))
    poisoned = arrays[name].copy()
    poisoned.flat[0] = -np.inf
    return valid(dict(arrays, **{name: poisoned}))


def _coded(arrays, encoding: str, edit) -> bytes:
    """A compressed update of `arrays` with its tensors edited by `edit(tensors)`."""
    from safetensors.numpy import load, save

    from fleettune.shared.protocol.compression import encode, header_metadata

    blob = encode(arrays, encoding, np.random.default_rng(0), 0.1)
    tensors = load(blob)
    edit(tensors)
    return save(tensors, metadata=header_metadata(blob, 1 << 20))


def coded_unknown_encoding(arrays):
    return _coded(arrays, "int8", lambda t: None).replace(b'"int8"', b'"zstd"')


def coded_negative_scale(arrays):
    return _coded(arrays, "int8", lambda t: t["scale"].__setitem__(0, -1.0))


def coded_mask_marks_one_more(arrays):
    def mark(t):
        mask = t["mask"]
        zero = int(np.flatnonzero(np.unpackbits(mask, bitorder="little") == 0)[0])
        mask[zero // 8] |= np.uint8(1 << (zero % 8))
    return _coded(arrays, "topk", mark)


CONTAINER_ATTACKS = {
    coded_unknown_encoding: RejectReason.BAD_ENCODING,
    coded_negative_scale: RejectReason.BAD_ENCODING,
    coded_mask_marks_one_more: RejectReason.BAD_ENCODING,
    truncated: RejectReason.TRUNCATED,
    header_length_past_end: RejectReason.TRUNCATED,
    header_length_past_cap: RejectReason.HEADER_TOO_LARGE,
    non_json_header: RejectReason.HEADER_INVALID,
    duplicate_key_header: RejectReason.HEADER_INVALID,
    overlapping_offsets: RejectReason.INVALID_OFFSETS,
    wrong_dtype: RejectReason.BAD_DTYPE,
    wrong_shape: RejectReason.BAD_SHAPE,
    extra_key: RejectReason.UNEXPECTED_KEYS,
    missing_key: RejectReason.MISSING_KEYS,
    nan_value: RejectReason.NON_FINITE,
    inf_value: RejectReason.NON_FINITE,
}
