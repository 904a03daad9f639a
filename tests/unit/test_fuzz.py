"""Property-based fuzzing of the two parsers of device bytes, and the reader against the library.

FLEETTUNE_FUZZ_READER_EXAMPLES sets the example count per property (10^4 by default, split over
the properties); `python bench/fuzz.py` runs 10^6 inputs.
"""

from __future__ import annotations

import os

import hypothesis.strategies as st
import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from safetensors import SafetensorError
from safetensors.torch import load as library_load

from fleettune.shared.errors import RejectReason
from fleettune.shared.protocol.fuzz_targets import SPEC, coded_outcome, container, envelope_outcome, reader_outcome

EXAMPLES = int(os.environ.get("FLEETTUNE_FUZZ_READER_EXAMPLES", "10000")) // 6
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
REASONS = {r.value for r in RejectReason} | {"ok"}

dims = st.lists(st.integers(min_value=-2, max_value=8), min_size=0, max_size=3)
entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "F64", "x"]),
    "shape": st.one_of(dims, st.just([2, 3]), st.just([3, 2]), st.integers()),
    "data_offsets": st.one_of(st.lists(st.integers(min_value=-4, max_value=64), min_size=0, max_size=3),
                              st.just([0, 24]), st.just([24, 48])),
})
names = st.sampled_from([*SPEC, "other", "__metadata__"])
headers = st.dictionaries(names, entry, max_size=4)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_get_a_named_reason(buf):
    assert reader_outcome(buf) in REASONS


@FUZZ
@given(headers, st.binary(max_size=64))
def test_structured_headers_get_a_named_reason(header, data):
    assert reader_outcome(container(header, data)) in REASONS


coded_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["I8", "U8", "I32", "F32", "F16", "I64"]),
    "shape": st.one_of(st.lists(st.integers(min_value=-1, max_value=16), min_size=1, max_size=2), st.just([12]),
                       st.just([1]), st.just([2]), st.just([6]), st.just([3])),
    "data_offsets": st.one_of(st.lists(st.integers(min_value=-1, max_value=64), min_size=2, max_size=2),
                              st.just([0, 12]), st.just([12, 20]), st.just([0, 2]), st.just([2, 14]), st.just([0, 6])),
})
metadata = st.dictionaries(st.sampled_from(["encoding", "density", "other"]),
                           st.one_of(st.sampled_from(["int8", "int4", "int2", "topk", "float16", "zstd", "", "0.25",
                                                      "0.5", "nan", "-1", "1e309"]),
                                     st.integers(), st.lists(st.integers(), max_size=2), st.none()), max_size=3)
coded_headers = st.tuples(st.dictionaries(st.sampled_from(["codes", "scale", "mask", "values", *SPEC]), coded_entry,
                                          max_size=3), metadata)


@FUZZ
@given(coded_headers, st.binary(min_size=0, max_size=48))
def test_compressed_updates_get_a_named_reason(header, data):
    entries, meta = header
    assert coded_outcome(container({**entries, "__metadata__": meta}, data)) in REASONS
    assert coded_outcome(data) in REASONS


@FUZZ
@given(st.binary(max_size=300))
def test_random_envelopes_get_a_named_reason(raw):
    assert envelope_outcome(raw) in REASONS


packable_ints = st.integers(min_value=-2**63, max_value=2**64 - 1)  # what msgpack can carry
envelope_values = st.one_of(st.none(), st.booleans(), packable_ints, st.floats(), st.text(max_size=70),
                            st.binary(max_size=8), st.lists(packable_ints, max_size=2))


@FUZZ
@given(st.dictionaries(st.sampled_from(["v", "federation", "round", "device", "object_key", "sha256", "num_samples",
                                        "base_version", "train_seconds", "metrics", "extra"]),
                       envelope_values, max_size=11))
def test_structured_envelopes_get_a_named_reason(body):
    assert envelope_outcome(msgpack.packb(body, use_bin_type=True)) in REASONS


ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


@st.composite
def near_valid(draw) -> bytes:
    """A well-formed file for SPEC (any float dtypes, any order, any bytes), sometimes nudged off."""
    order = draw(st.permutations(list(SPEC)))
    header, offset, data = {}, 0, b""
    for name in order:
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        size = ITEMSIZE[dtype] * SPEC[name][0] * SPEC[name][1]
        header[name] = {"dtype": dtype, "shape": list(SPEC[name]), "data_offsets": [offset, offset + size]}
        data += draw(st.binary(min_size=size, max_size=size))
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    if draw(st.integers(0, 3)) == 0:  # nudge one offset
        name = draw(st.sampled_from(order))
        header[name]["data_offsets"][draw(st.integers(0, 1))] += draw(st.sampled_from([-2, -1, 1, 2]))
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data + b"\0"
    return container(header, data)


@FUZZ
@given(st.one_of(near_valid(), st.builds(container, headers, st.binary(max_size=64))))
def test_the_reader_accepts_only_what_the_safetensors_library_also_reads(buf):
    """Differential: whatever we accept, the reference library reads to the same tensors."""
    if reader_outcome(buf) != "ok":
        return
    try:
        theirs = library_load(buf)
    except SafetensorError as exc:  # pragma: no cover - a disagreement is the finding
        raise AssertionError(f"we accepted what safetensors refuses: {exc}") from None
    from fleettune.shared.protocol.safetensors_reader import parse

    ours = parse(buf, SPEC, 4096)
    assert ours.keys() == theirs.keys() - {"__metadata__"}
    for name, tensor in ours.items():  # bit for bit (NaN payloads included)
        assert tensor.dtype == theirs[name].dtype
        assert tensor.contiguous().view(torch.uint8).tolist() == theirs[name].contiguous().view(torch.uint8).tolist()
