"""Compressed updates: the codes, their bytes, error feedback, hostile files, and the pipeline reading them."""

import hashlib
import json
import struct
from pathlib import Path
from typing import get_args

import fakeredis
import numpy as np
import pytest
from safetensors.numpy import load, save

from fleettune.shared import keys
from fleettune.shared.errors import RejectReason, Rejected
from fleettune.shared.federation import FederationConfig, LocalTraining, RoundPolicy, UpdateEncoding
from fleettune.shared.pipeline.ingest import Ingestor
from fleettune.shared.pipeline.rounds import RoundCoordinator
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import LAYOUTS
from fleettune.shared.protocol.compression import BLOCK, ENCODINGS, Compressor, encode, read_update
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from fleettune.shared.storage import LocalObjectStore
from tests.reference import next_global, random_deltas


@pytest.fixture(scope="module")
def update():
    config = FederationConfig("fed", LAYOUTS["tiny-llama"])
    return config.update_tensors, random_deltas(config.update_tensors, np.random.default_rng(0), 0.01)


@pytest.mark.parametrize("encoding, min_ratio, max_rel_error", [
    ("float16", 1.9, 1e-3), ("bfloat16", 1.9, 1e-2), ("int8", 3.8, 0.02), ("int4", 7.0, 0.3), ("int2", 12.0, 1.5),
    ("topk", 8.0, 1.0),
])
def test_each_encoding_saves_its_bytes_and_decodes_near_the_update(update, encoding, min_ratio, max_rel_error):
    layout, delta = update
    dense = len(encode(delta, "float32", np.random.default_rng(0)))
    blob = encode(delta, encoding, np.random.default_rng(0), density=0.05)
    decoded, name = read_update(blob, layout, 1 << 20)
    assert name == encoding and dense / len(blob) >= min_ratio
    for k, x in delta.items():
        err = np.linalg.norm(decoded[k].float().numpy() - x) / np.linalg.norm(x)
        assert err <= max_rel_error, (k, err)


@pytest.mark.parametrize("encoding", ["int8", "int4", "int2"])
def test_stochastic_rounding_is_unbiased(encoding):
    x = {"w": np.random.default_rng(1).normal(0, 1, (4, BLOCK)).astype(np.float32)}
    rng = np.random.default_rng(2)
    mean = sum(read_update(encode(x, encoding, rng), {"w": (4, BLOCK)}, 1 << 20)[0]["w"].numpy()
               for _ in range(400)) / 400
    step = np.abs(x["w"]).max(axis=1, keepdims=True) / {"int8": 127, "int4": 7, "int2": 1}[encoding]
    # the mean of 400 unbiased roundings is within a few standard errors (step / 2 / sqrt(400)) of x
    assert np.abs(mean - x["w"]).max() <= 5 * step.max() / 2 / 20


def test_error_feedback_sends_what_the_code_dropped_later():
    """Top-k at 5 % sends a twentieth of each update; with error feedback the sum of what it sent
    over many updates tracks the sum of the updates, off only by the residual it still holds."""
    rng = np.random.default_rng(3)
    layout = {"w": (16, 64)}
    device = Compressor("topk", 0.05)
    total, sent, sent_plain = np.zeros(layout["w"]), np.zeros(layout["w"]), np.zeros(layout["w"])
    for _ in range(60):
        delta = {"w": rng.normal(0.01, 0.01, layout["w"]).astype(np.float32)}  # a steady direction plus noise
        total += delta["w"]
        sent += read_update(device.encode(delta), layout, 1 << 20)[0]["w"].numpy()
        sent_plain += read_update(encode(delta, "topk", rng, 0.05), layout, 1 << 20)[0]["w"].numpy()
    assert np.allclose(total - sent, device.residual["w"], atol=1e-3)
    gap, gap_plain = np.linalg.norm(total - sent), np.linalg.norm(total - sent_plain)
    assert gap < 0.25 * gap_plain, (gap, gap_plain)


def _rewrite(blob: bytes, edit) -> bytes:
    """The same file with its header edited by `edit(header)` and the data unchanged."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + blob[8 + n:]


def _coded(encoding, **arrays):
    meta = {"encoding": encoding, **({"density": "0.25"} if encoding == "topk" else {})}
    return save(arrays, metadata=meta)


LAYOUT_W = {"w": (2, 4)}  # 8 entries: one int8 block; top-k at density 0.25 sends 2


def _topk(mask_bits, values=2, density="0.25", mask_dtype=np.uint8):
    return save({"mask": np.packbits(np.array(mask_bits, bool), bitorder="little").astype(mask_dtype),
                 "values": np.ones(values, np.float16)}, metadata={"encoding": "topk", "density": density})


def _int8(codes=np.ones(8, np.int8), scale=(1.0,)):
    return save({"codes": codes, "scale": np.array(scale, np.float32)}, metadata={"encoding": "int8"})


@pytest.mark.parametrize("blob, reason", [
    (save({"w": np.zeros((2, 4), np.float32)}, metadata={"encoding": "zstd"}), RejectReason.BAD_ENCODING),
    (_topk([1, 1, 0, 0, 0, 0, 0, 0], density="0.9"), RejectReason.BAD_ENCODING),
    (_topk([1, 1, 0, 0, 0, 0, 0, 0], density="nan"), RejectReason.BAD_ENCODING),
    (_topk([1, 1, 1, 0, 0, 0, 0, 0]), RejectReason.BAD_ENCODING),  # marks 3, sends 2 values
    (_topk([1, 0, 0, 0, 0, 0, 0, 0]), RejectReason.BAD_ENCODING),  # marks 1
    (_topk([1, 1, 0, 0, 0, 0, 0, 0], values=3), RejectReason.BAD_SHAPE),  # K must be ceil(0.25 x 8) = 2
    (_topk([1, 1, 0, 0, 0, 0, 0, 0] + [0] * 8), RejectReason.BAD_SHAPE),  # 8 entries: a 1-byte mask
    (_topk([1, 1, 0, 0, 0, 0, 0, 0], mask_dtype=np.int8), RejectReason.BAD_DTYPE),
    (_int8(scale=(-1.0,)), RejectReason.BAD_ENCODING),
    (_int8(scale=(1.0, 1.0)), RejectReason.BAD_SHAPE),
    (_int8(codes=np.ones(8, np.uint8)), RejectReason.BAD_DTYPE),
    (_int8(codes=np.ones(9, np.int8)), RejectReason.BAD_SHAPE),
    (save({"w": np.ones((2, 4), np.float32)}, metadata={"encoding": "int8"}), RejectReason.UNEXPECTED_KEYS),
    (save({"codes": np.full(4, 0xFF, np.uint8), "scale": np.ones(1, np.float32)}, metadata={"encoding": "int4"}),
     RejectReason.BAD_ENCODING),  # code 15 (q = 8) is outside the symmetric range
    (save({"codes": np.full(2, 0xFF, np.uint8), "scale": np.ones(1, np.float32)}, metadata={"encoding": "int2"}),
     RejectReason.BAD_ENCODING),  # code 3 (q = 2) is not ternary
    (save({"codes": np.full(3, 0x55, np.uint8), "scale": np.ones(1, np.float32)}, metadata={"encoding": "int2"}),
     RejectReason.BAD_SHAPE),  # 8 entries pack into 2 bytes
    (save({"w": np.zeros((2, 4), np.float32)}, metadata={"encoding": "float16"}), RejectReason.BAD_DTYPE),
    (_rewrite(_int8(), lambda h: h["codes"].update(dtype="I64")), RejectReason.BAD_DTYPE),
])
def test_hostile_coded_files_are_refused_by_name(blob, reason):
    with pytest.raises(Rejected) as refused:
        read_update(blob, LAYOUT_W, 1 << 20)
    assert refused.value.reason is reason


def test_a_non_finite_scale_is_refused_at_ingest_as_non_finite(tmp_path):
    world = _world(tmp_path)
    config = world[3]
    arrays = random_deltas(config.update_tensors, np.random.default_rng(4), 0.01)
    blob = encode(arrays, "int8", np.random.default_rng(0))
    poisoned = load(blob)
    poisoned["scale"][0] = np.inf
    result = _send(world, "a", save(poisoned, metadata={"encoding": "int8"}))
    assert result.outcome == "rejected" and result.reason is RejectReason.NON_FINITE


def _world(tmp_path):
    state = FederationState(fakeredis.FakeRedis())
    store, settings = LocalObjectStore(tmp_path / "objects"), Settings()
    config = FederationConfig("fed", LAYOUTS["tiny-llama"], policy=RoundPolicy(min_updates=2, max_rounds=2,
                                                                                max_update_norm=100.0))
    RoundCoordinator(state, store, settings).start(config, ["a", "b", "c"])
    return state, store, settings, config


def _send(world, device, blob, num_samples=10):
    state, store, settings, _ = world
    key = keys.update_object("fed", 1, device)
    store.put(key, blob)
    env = Envelope("fed", 1, device, key, hashlib.sha256(blob).hexdigest(), num_samples, 0)
    return Ingestor(state, store, settings).ingest(env.encode())


def test_a_round_of_mixed_encodings_aggregates_what_each_device_sent(tmp_path):
    """int8, top-k and float32 updates in one round: the version is the weighted mean of the decoded
    updates (float64 reference within 1e-6), so every rule downstream sees plain float tensors."""
    world = _world(tmp_path)
    state, store, settings, config = world
    rng = np.random.default_rng(5)
    sent = {}
    for device, encoding in zip("abc", ["int8", "topk", "float32"]):
        blob = encode(random_deltas(config.update_tensors, rng, 0.01), encoding, rng, density=0.1)
        result = _send(world, device, blob)
        assert result.outcome == "accepted" and result.encoding == encoding
        sent[device] = {k: v.float().numpy() for k, v in read_update(blob, config.update_tensors, 1 << 20)[0].items()}
    assert RoundCoordinator(state, store, settings).close("fed", 1).version == 1
    got = load(store.get(f"{keys.version_prefix('fed', 1)}/{versions.ADAPTER_FILE}"))
    prev = load(store.get(f"{keys.version_prefix('fed', 0)}/{versions.ADAPTER_FILE}"))
    want = next_global(prev, list(sent.values()), [10, 10, 10], 100.0, 10**5, 1.0)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) <= 1e-6


def test_the_training_config_names_the_encoding():
    assert ENCODINGS == get_args(UpdateEncoding)  # the protocol's list and the config's are one
    assert LocalTraining(update_encoding="int8").update_encoding == "int8"
    with pytest.raises(ValueError):
        LocalTraining(update_encoding="zip")
    with pytest.raises(ValueError):
        LocalTraining(update_encoding="topk", update_density=0.9)


def test_a_topk_mask_with_bits_past_the_update_is_refused():
    blob = _topk([1, 1, 0, 0, 0, 0, 0, 1], values=3, density="0.5")  # 6 entries: bits 6 and 7 are padding
    with pytest.raises(Rejected) as refused:
        read_update(blob, {"w": (6,)}, 1 << 20)
    assert refused.value.reason is RejectReason.BAD_ENCODING and "past" in refused.value.detail


GOLDEN = Path(__file__).resolve().parents[1] / "golden"
GOLDEN_LAYOUT = {"a.lora_B.weight": (3, 2), "a.lora_A.weight": (2, 3)}  # coded in sorted-name order: A, then B


@pytest.mark.parametrize("encoding, a, b", [
    ("int8", [0.5, -1, 1.5, -2, 2.5, -3], [1.75, -2, 2.25, -2.5, 2.75, -3]),      # codes x (0.5, 0.25)
    ("int4", [-3.5, -0.5, 0, 0.5, 1, 3.5], [0.75, -0.75, 1.5, -1.5, 0, 1.25]),     # nibbles q + 7
    ("int2", [-0.5, 0, 0.5, 0.5, 0, -0.5], [0.25, 0.25, -0.25, 0, 0, 0.25]),       # 2-bit q + 1
    ("topk", [0, 1.5, 0, 0, -2, 0], [0.25, 0, 0, 0, 0, -0.5]),                     # mask bits 1, 4, 6, 11
])
def test_golden_coded_updates_decode_to_the_documented_values(encoding, a, b):
    """Hand-built files of docs/protocol.md's layouts (tests/golden): a reader change that breaks
    devices already in the field fails here."""
    decoded, name = read_update((GOLDEN / f"update_{encoding}.safetensors").read_bytes(), GOLDEN_LAYOUT, 1 << 20)
    assert name == encoding
    assert decoded["a.lora_A.weight"].tolist() == np.array(a, np.float32).reshape(2, 3).tolist()
    assert decoded["a.lora_B.weight"].tolist() == np.array(b, np.float32).reshape(3, 2).tolist()
