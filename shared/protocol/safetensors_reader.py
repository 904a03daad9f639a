"""A strict safetensors parser for bytes that came from an untrusted device.

The reference library trusts its input far more than we may: every malformed container here maps
to one named RejectReason. Python ints do not overflow, but we still bound every dimension and stop
multiplying as soon as a size passes the buffer, so a hostile shape costs nothing.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Mapping

import torch

from fleettune.shared.errors import RejectReason, Rejected

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
# float64 only in files the server writes itself (partial sums): devices send the three above
SERVER_DTYPES: dict[str, tuple[torch.dtype, int]] = {**DTYPES, "F64": (torch.float64, 8)}
MAX_RANK = 8


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise Rejected(RejectReason.HEADER_INVALID, f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _nbytes(shape: object, itemsize: int, limit: int, name: str) -> int:
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise Rejected(RejectReason.HEADER_INVALID, f"{name}: shape must be a list of <= {MAX_RANK} dims")
    size = itemsize
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim < 2**31:
            raise Rejected(RejectReason.HEADER_INVALID, f"{name}: bad dimension {dim!r}")
        size *= dim
        if size > limit:  # stop before a hostile product grows
            raise Rejected(RejectReason.INVALID_OFFSETS, f"{name}: tensor larger than the data")
    return size


def parse(
    buf: bytes, expected: Mapping[str, tuple[int, ...]], max_header_bytes: int,
    dtypes: Mapping[str, tuple[torch.dtype, int]] = DTYPES,
) -> dict[str, torch.Tensor]:
    """Return name -> tensor views into `buf`, or raise Rejected naming what is wrong."""
    if len(buf) < 8:
        raise Rejected(RejectReason.TRUNCATED, f"{len(buf)} bytes, no header length")
    (header_len,) = struct.unpack("<Q", buf[:8])
    if header_len > max_header_bytes:
        raise Rejected(RejectReason.HEADER_TOO_LARGE, f"header {header_len} bytes > {max_header_bytes}")
    if 8 + header_len > len(buf):
        raise Rejected(RejectReason.TRUNCATED, f"header length {header_len} runs past the end")
    try:
        header = json.loads(buf[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except Rejected:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Rejected(RejectReason.HEADER_INVALID, f"header is not JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise Rejected(RejectReason.HEADER_INVALID, "header is not a JSON object")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise Rejected(RejectReason.HEADER_INVALID, "__metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_len = len(buf) - data_start
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise Rejected(RejectReason.HEADER_INVALID, f"{name[:80]}: entry needs dtype, shape, data_offsets")
        if info["dtype"] not in dtypes:
            raise Rejected(RejectReason.BAD_DTYPE, f"{name[:80]}: dtype {str(info['dtype'])[:16]}")
        dtype, itemsize = dtypes[info["dtype"]]
        offsets = info["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise Rejected(RejectReason.INVALID_OFFSETS, f"{name[:80]}: bad data_offsets")
        nbytes = _nbytes(info["shape"], itemsize, max(data_len, offsets[1] - offsets[0]), name[:80])
        if nbytes != offsets[1] - offsets[0]:
            raise Rejected(RejectReason.INVALID_OFFSETS, f"{name[:80]}: offsets do not match shape")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(info["shape"]), itemsize))

    # Tensors must tile the data region exactly: no overlap, no gap, nothing hidden at the end.
    entries.sort()
    cursor = 0
    for begin, end, name, *_ in entries:
        if begin != cursor:
            raise Rejected(RejectReason.INVALID_OFFSETS, f"{name[:80]}: starts at {begin}, expected {cursor}")
        cursor = end
    if cursor > data_len:
        raise Rejected(RejectReason.TRUNCATED, f"data ends at {data_len}, tensors need {cursor}")
    if cursor < data_len:
        raise Rejected(RejectReason.INVALID_OFFSETS, f"{data_len - cursor} unclaimed trailing bytes")

    names = {e[2] for e in entries}
    if extra := names - expected.keys():
        raise Rejected(RejectReason.UNEXPECTED_KEYS, f"{len(extra)} unexpected, e.g. {sorted(extra)[0][:120]}")
    if missing := expected.keys() - names:
        raise Rejected(RejectReason.MISSING_KEYS, f"{len(missing)} missing, e.g. {sorted(missing)[0][:120]}")

    tensors = {}
    with warnings.catch_warnings():
        # Views into immutable bytes: we never write to them, so torch's warning is noise.
        warnings.simplefilter("ignore", UserWarning)
        for begin, end, name, dtype, shape, itemsize in entries:
            if shape != tuple(expected[name]):
                raise Rejected(RejectReason.BAD_SHAPE, f"{name[:120]}: {list(shape)} != {list(expected[name])}")
            count = (end - begin) // itemsize
            flat = (torch.frombuffer(buf, dtype=dtype, count=count, offset=data_start + begin)
                    if count else torch.empty(0, dtype=dtype))
            tensors[name] = flat.view(shape)
    return tensors

