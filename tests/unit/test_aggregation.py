import math

import numpy as np
import pytest
import torch

from fleettune.shared.strategies.fedavg import StreamingFedAvg, apply_update, clip_scale, fedavg, update_norm

SHAPES = {"a": (3, 4), "b": (5,)}


def _update(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}


def test_fedavg_weights_by_samples():
    u1 = {k: torch.full(s, 1.0) for k, s in SHAPES.items()}
    u2 = {k: torch.full(s, 4.0) for k, s in SHAPES.items()}
    mean = fedavg([(u1, 1.0), (u2, 2.0)], SHAPES)
    for t in mean.values():
        assert torch.allclose(t, torch.full_like(t, 3.0))


def test_streaming_fedavg_matches_a_float64_numpy_mean():
    updates = [(_update(i), float(w)) for i, w in enumerate([3, 10, 1, 7])]
    avg = StreamingFedAvg(SHAPES)
    for u, w in updates:
        avg.add(u, w)
    total = sum(w for _, w in updates)
    for k in SHAPES:
        ref = sum(w * u[k].double().numpy() for u, w in updates) / total
        assert np.max(np.abs(avg.mean()[k].numpy() - ref)) < 1e-6
    assert avg.count == 4 and avg.total_weight == total


def test_half_precision_updates_are_accumulated_in_float32():
    for dtype in (torch.float16, torch.bfloat16):
        u = _update(1, dtype)
        mean = fedavg([(u, 2.0)], SHAPES)
        for k in SHAPES:
            assert mean[k].dtype == torch.float32
            assert torch.equal(mean[k], u[k].float())


def test_streaming_fedavg_refuses_bad_weights_layouts_and_empty_rounds():
    avg = StreamingFedAvg(SHAPES)
    with pytest.raises(ValueError, match="zero updates"):
        avg.mean()
    for weight in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="weight"):
            avg.add(_update(0), weight)
    with pytest.raises(ValueError, match="layout"):
        avg.add({"a": torch.zeros(3, 4)}, 1.0)


def test_update_norm_is_the_l2_norm_over_all_tensors():
    u = _update(5)
    expected = math.sqrt(sum(float((t.double() ** 2).sum()) for t in u.values()))
    assert update_norm(u) == pytest.approx(expected, rel=1e-6)


def test_update_norm_of_huge_finite_values_is_finite():
    u = {"a": torch.full((4,), 1e30), "b": torch.zeros(5)}
    assert update_norm(u) == pytest.approx(2e30, rel=1e-6)  # float32 squares overflow; float64 does not


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_update_norm_reports_non_finite_values(bad):
    u = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    u["b"][2] = bad
    assert not math.isfinite(update_norm(u))


def test_clip_scale_limits_the_norm_and_leaves_small_updates_alone():
    assert clip_scale(4.0, 1.0) == 0.25
    assert clip_scale(0.5, 1.0) == 1.0
    assert clip_scale(1.0, 1.0) == 1.0
    assert clip_scale(123.0, None) == 1.0


def test_clip_scale_of_a_zero_update_is_one():
    assert clip_scale(0.0, 1.0) == 1.0


@pytest.mark.parametrize("norm", [math.nan, math.inf])
def test_clip_scale_refuses_non_finite_norms(norm):
    with pytest.raises(ValueError, match="not finite"):
        clip_scale(norm, 1.0)


def test_apply_update_scales_by_the_server_learning_rate():
    g = {k: torch.ones(s) for k, s in SHAPES.items()}
    d = {k: torch.full(s, 2.0) for k, s in SHAPES.items()}
    out = apply_update(g, d, 0.5)
    assert all(torch.equal(t, torch.full_like(t, 2.0)) for t in out.values())
    with pytest.raises(ValueError):
        apply_update(g, d, 0.0)
