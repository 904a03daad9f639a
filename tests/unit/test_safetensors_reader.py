import numpy as np
import pytest
import torch
from safetensors.torch import save

from fleettune.shared.errors import Rejected, RejectReason
from fleettune.shared.protocol.compression import read_update
from fleettune.shared.protocol.safetensors_reader import parse
from tests import attacks

SPEC = {"x.lora_A.weight": (2, 4), "y.lora_A.weight": (2, 4), "x.lora_B.weight": (4, 2)}
CAP = 4096


def _arrays():
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SPEC.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_parses_what_the_safetensors_library_writes(dtype):
    tensors = {k: torch.randn(s).to(dtype) for k, s in SPEC.items()}
    out = parse(save(tensors, metadata={"format": "pt"}), SPEC, CAP)
    assert out.keys() == tensors.keys()
    for k in SPEC:
        assert out[k].dtype == dtype and torch.equal(out[k], tensors[k])


@pytest.mark.parametrize("attack,reason", list(attacks.CONTAINER_ATTACKS.items()),
                         ids=[fn.__name__ for fn in attacks.CONTAINER_ATTACKS])
def test_each_attack_gets_its_reason(attack, reason):
    """Through the reader ingest uses: the strict parser, and the decoder of compressed updates."""
    blob = attack(_arrays())
    if reason is RejectReason.NON_FINITE:  # a container problem-free file: finiteness is checked later
        out, _ = read_update(blob, SPEC, CAP)
        assert not all(torch.isfinite(t).all() for t in out.values())
        return
    with pytest.raises(Rejected) as err:
        read_update(blob, SPEC, CAP)
    assert err.value.reason is reason


@pytest.mark.parametrize("blob,reason", [
    (b"", RejectReason.TRUNCATED),
    (b"\x01\x00\x00", RejectReason.TRUNCATED),
    (attacks.container(b"[1, 2]", b""), RejectReason.HEADER_INVALID),
    (attacks.container(b"\xff\xfe{}", b""), RejectReason.HEADER_INVALID),
    (attacks.container({"__metadata__": {"a": 1}}, b""), RejectReason.HEADER_INVALID),
    (attacks.container({"t": {"dtype": "F32", "shape": [2**31], "data_offsets": [0, 4]}}, b"\0" * 4),
     RejectReason.HEADER_INVALID),
    (attacks.container({"t": {"dtype": "F32", "shape": [2**30, 2**30, 2**30, 2**30], "data_offsets": [0, 4]}},
                       b"\0" * 4), RejectReason.INVALID_OFFSETS),
    (attacks.container({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
     RejectReason.INVALID_OFFSETS),
    (attacks.container({"t": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4),
     RejectReason.INVALID_OFFSETS),
    (attacks.container({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}, b"\0" * 4),
     RejectReason.HEADER_INVALID),
])
def test_malformed_containers(blob, reason):
    with pytest.raises(Rejected) as err:
        parse(blob, {"t": (1,)}, CAP)
    assert err.value.reason is reason


def test_trailing_unclaimed_bytes_are_refused():
    blob = attacks.valid(_arrays()) + b"hidden"
    with pytest.raises(Rejected) as err:
        parse(blob, SPEC, CAP)
    assert err.value.reason is RejectReason.INVALID_OFFSETS


def test_a_gap_between_tensors_is_refused():
    header, data = attacks.header_of(_arrays())
    last = list(header)[-1]
    header[last]["data_offsets"] = [o + 4 for o in header[last]["data_offsets"]]
    with pytest.raises(Rejected) as err:
        parse(attacks.container(header, data + b"\0" * 4), SPEC, CAP)
    assert err.value.reason is RejectReason.INVALID_OFFSETS
