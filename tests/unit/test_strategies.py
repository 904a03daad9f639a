"""Aggregation rules against hand-written float64 numpy references (no code shared with shared/)."""

from __future__ import annotations

import statistics

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from fleettune.shared.errors import ConfigError
from fleettune.shared.strategies import partial, privacy, robust, server_optimizers
from fleettune.shared.strategies.combine import RoundAggregator
from fleettune.shared.strategies.config import AggregationConfig
from fleettune.shared.strategies.exact_lora import LowRankSum
from tests import reference

OUT, IN, R = 12, 10, 2
B_KEY, A_KEY = "m.lora_B.weight", "m.lora_A.weight"
SHAPES = {A_KEY: (R, IN), B_KEY: (OUT, R)}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _updates(n: int, seed: int = 0, scale: float = 0.1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) * scale for k, s in SHAPES.items()} for _ in range(n)]


def _base(seed: int = 99) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {A_KEY: rng.standard_normal((R, IN)) * 0.3, B_KEY: rng.standard_normal((OUT, R)) * 0.1}


def _run(agg: AggregationConfig, base, updates, weights, scales=None, lr=1.0, state=None, rank=R, shapes=SHAPES):
    combiner = RoundAggregator(agg, {k: _t(v) for k, v in base.items()}, shapes, rank)
    for i, u in enumerate(updates):
        combiner.add({k: _t(v) for k, v in u.items()}, weights[i], (scales or [1.0] * len(updates))[i])
    return combiner.finish(lr, state or {}, clip_bound=1.0)


def _product(w) -> np.ndarray:
    return np.asarray(w[B_KEY], np.float64) @ np.asarray(w[A_KEY], np.float64)


# --- exact (FlexLoRA) --------------------------------------------------------------------------

def test_exact_equals_the_dense_weighted_mean_of_products_when_the_rank_suffices():
    base, ups, w = _base(), _updates(3), [1.0, 2.0, 5.0]
    published_rank = 3 * R  # the mean of 3 rank-2 products has rank <= 6
    shapes = {A_KEY: (published_rank, IN), B_KEY: (OUT, published_rank)}
    # updates of rank-2 factors, embedded as the first 2 of 6 ranks (the rest zero)
    pad = [{A_KEY: np.vstack([u[A_KEY] + base[A_KEY], np.zeros((published_rank - R, IN))]),
            B_KEY: np.hstack([u[B_KEY] + base[B_KEY], np.zeros((OUT, published_rank - R))])} for u in ups]
    zero = {A_KEY: np.zeros((published_rank, IN)), B_KEY: np.zeros((OUT, published_rank))}
    out = _run(AggregationConfig(lora="exact"), zero, pad, w, rank=published_rank, shapes=shapes)
    dense = sum(wi * (u[B_KEY] @ u[A_KEY]) for wi, u in zip(w, pad)) / sum(w)
    np.testing.assert_allclose(_product(out.weights), dense, atol=1e-6)
    assert out.fields["truncation_energy_dropped"] < 1e-12


def test_exact_truncation_is_the_best_low_rank_approximation_and_reports_the_dropped_energy():
    base, ups, w = _base(), _updates(4, seed=1, scale=0.5), [3.0, 1.0, 1.0, 2.0]
    out = _run(AggregationConfig(lora="exact"), base, ups, w)
    dense = sum(wi * ((base[B_KEY] + u[B_KEY]) @ (base[A_KEY] + u[A_KEY])) for wi, u in zip(w, ups)) / sum(w)
    U, S, Vt = np.linalg.svd(dense)
    best = (U[:, :R] * S[:R]) @ Vt[:R]  # Eckart-Young
    np.testing.assert_allclose(_product(out.weights), best, atol=1e-6)
    np.testing.assert_allclose(out.fields["truncation_energy_dropped"], (S[R:] ** 2).sum() / (S ** 2).sum(), rtol=1e-6)
    a = np.asarray(out.weights[A_KEY], np.float64)
    np.testing.assert_allclose(a @ a.T, np.eye(R), atol=1e-6)  # A keeps orthonormal rows


def test_exact_is_order_invariant_and_one_client_gives_its_own_product():
    base, ups, w = _base(), _updates(5, seed=2), [1.0, 4.0, 2.0, 2.0, 3.0]
    agg = AggregationConfig(lora="exact", working_rank_factor=5)  # the stream keeps all 5 x rank 2
    a = _run(agg, base, ups, w)
    order = [3, 0, 4, 2, 1]
    b = _run(agg, base, [ups[i] for i in order], [w[i] for i in order])
    np.testing.assert_allclose(_product(a.weights), _product(b.weights), atol=1e-6)
    one = _run(agg, base, ups[:1], [7.0])
    np.testing.assert_allclose(_product(one.weights), (base[B_KEY] + ups[0][B_KEY]) @ (base[A_KEY] + ups[0][A_KEY]),
                               atol=1e-6)


def test_a_working_rank_below_the_stream_reports_what_streaming_dropped():
    base, ups, w = _base(), _updates(5, seed=2), [1.0, 4.0, 2.0, 2.0, 3.0]
    wide = _run(AggregationConfig(lora="exact", working_rank_factor=5), base, ups, w)
    narrow = _run(AggregationConfig(lora="exact", working_rank_factor=1), base, ups, w)
    assert narrow.fields["truncation_energy_dropped"] > wide.fields["truncation_energy_dropped"]


def test_streaming_compression_stays_exact_for_a_low_rank_sum_and_memory_stays_bounded():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((R, IN))  # every update shares A: the sum has rank R whatever N is
    acc, dense = LowRankSum(OUT, IN, cap=R), np.zeros((OUT, IN))
    for _ in range(50):
        B = rng.standard_normal((OUT, R))
        acc.add(torch.from_numpy(B), torch.from_numpy(A), 0.5)
        dense += 0.5 * B @ A
        assert acc.U.shape[1] <= 2 * R  # compressed whenever it passes 2 x cap
    out = acc.factorise(R)
    np.testing.assert_allclose((out.B @ out.A).numpy(), dense, atol=1e-8)
    assert out.dropped < 1e-12 * out.energy


def test_server_lr_in_exact_mode_moves_from_the_global_product():
    base, ups, w = _base(), _updates(2, seed=4), [1.0, 1.0]
    out = _run(AggregationConfig(lora="exact"), base, ups, w, lr=0.5, rank=R)
    mean = sum((base[B_KEY] + u[B_KEY]) @ (base[A_KEY] + u[A_KEY]) for u in ups) / 2
    target = 0.5 * _product(base) + 0.5 * mean
    U, S, Vt = np.linalg.svd(target)
    np.testing.assert_allclose(_product(out.weights), (U[:, :R] * S[:R]) @ Vt[:R], atol=1e-6)


# --- FFA-LoRA ----------------------------------------------------------------------------------

def test_ffa_mean_of_b_equals_the_exact_mean_of_products():
    base, ups, w = _base(), _updates(4, seed=5), [2.0, 1.0, 1.0, 3.0]
    b_only = {B_KEY: SHAPES[B_KEY]}
    out = _run(AggregationConfig(lora="ffa"), base, [{B_KEY: u[B_KEY]} for u in ups], w, shapes=b_only)
    np.testing.assert_array_equal(out.weights[A_KEY].numpy(), base[A_KEY].astype(np.float32))  # A is frozen
    exact = sum(wi * ((base[B_KEY] + u[B_KEY]) @ base[A_KEY]) for wi, u in zip(w, ups)) / sum(w)
    np.testing.assert_allclose(_product(out.weights), exact, atol=1e-6)


# --- server optimizers (Reddi et al. 2021, Algorithm 2) -----------------------------------------

@pytest.mark.parametrize("name", ["avgm", "adam", "yogi", "adagrad"])
def test_server_optimizers_match_the_paper_over_three_rounds(name):
    rng = np.random.default_rng(6)
    x0 = rng.standard_normal((4, 3))
    deltas = [rng.standard_normal((4, 3)) * 0.1 for _ in range(3)]
    weights, state = {"w": _t(x0)}, {}
    for d in deltas:
        weights, state = server_optimizers.step(name, weights, {"w": _t(d)}, state, lr=0.05)
    np.testing.assert_allclose(weights["w"].numpy(), reference.server_optimizer(name, x0, deltas, 0.05), atol=1e-5)
    assert int(state[server_optimizers.STEP_KEY].item()) == 3


def test_adam_with_bias_correction_matches_kingma_and_ba():
    rng = np.random.default_rng(14)
    x0 = rng.standard_normal((4, 3))
    deltas = [rng.standard_normal((4, 3)) * 0.1 for _ in range(3)]
    weights, state = {"w": _t(x0)}, {}
    for d in deltas:
        weights, state = server_optimizers.step("adam", weights, {"w": _t(d)}, state, 0.05, 0.9, 0.999, 1e-8, True)
    expected = reference.server_optimizer("adam", x0, deltas, 0.05, 0.9, 0.999, 1e-8, bias_correction=True)
    np.testing.assert_allclose(weights["w"].numpy(), expected, atol=1e-5)
    torch_adam = torch.nn.Parameter(_t(x0).clone())  # and torch's own Adam, on the negated pseudo-gradient
    opt = torch.optim.Adam([torch_adam], lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    for d in deltas:
        torch_adam.grad = -_t(d)
        opt.step()
    np.testing.assert_allclose(weights["w"].numpy(), torch_adam.detach().numpy(), atol=1e-5)


def test_sgd_with_one_client_is_the_identity_of_fedavg():
    base, ups = _base(), _updates(1, seed=7)
    out = _run(AggregationConfig(), base, ups, [9.0])
    for k in SHAPES:
        np.testing.assert_allclose(out.weights[k].numpy(), base[k] + ups[0][k], atol=1e-6)


# --- robust rules and weights --------------------------------------------------------------------

def test_median_and_trimmed_mean_match_numpy_and_are_order_invariant():
    ups = _updates(7, seed=8)
    for rule, ref in (("median", lambda s: np.median(s, axis=0)),
                      ("trimmed_mean", lambda s: np.sort(s, axis=0)[2:5].mean(axis=0))):
        agg = AggregationConfig(rule=rule, trim=2)
        zero = {k: np.zeros(s) for k, s in SHAPES.items()}
        out = _run(agg, zero, ups, [1.0] * 7)
        flipped = _run(agg, zero, ups[::-1], [1.0] * 7)
        for k in SHAPES:
            np.testing.assert_allclose(out.weights[k].numpy(), ref(np.stack([u[k] for u in ups])), atol=1e-6)
            np.testing.assert_array_equal(out.weights[k].numpy(), flipped.weights[k].numpy())


def test_trimmed_mean_needs_more_than_twice_k_updates():
    with pytest.raises(ValueError, match=r"n > 2k: n = 4 updates, k = 2"):
        robust.trimmed_mean([{"w": torch.zeros(2)}] * 4, 2)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_a_gamma_scaled_malicious_update_has_bounded_influence(rule):
    honest = _updates(6, seed=9)
    zero = {k: np.zeros(s) for k, s in SHAPES.items()}
    clean = _run(AggregationConfig(rule=rule), zero, honest, [1.0] * 6)
    honest_max = max(np.abs(u[k]).max() for u in honest for k in SHAPES)
    for gamma in (1e3, 1e6):
        evil = {k: -gamma * sum(u[k] for u in honest) for k in SHAPES}  # a scaled inversion attack
        out = _run(AggregationConfig(rule=rule), zero, honest + [evil], [1.0] * 7)
        for k in SHAPES:  # stays within the honest range, whatever gamma is
            assert np.abs(out.weights[k].numpy()).max() <= honest_max + 1e-6
            assert np.abs(out.weights[k].numpy() - clean.weights[k].numpy()).max() <= 2 * honest_max
    mean = _run(AggregationConfig(), zero, honest + [evil], [1.0] * 7)  # the plain mean does not hold
    assert np.abs(mean.weights[B_KEY].numpy()).max() > 1e3 * honest_max


def test_one_device_cannot_dominate_the_sample_weights():
    claims = [120, 300, 250, 100_000, 180]
    cap = partial.weight_cap(statistics.median(claims), AggregationConfig().max_weight_ratio, uniform=False)
    weights = [partial.weight(n, cap, uniform=False) for n in claims]
    assert weights[3] == 2.0 * 250  # twice the reference (median) claim
    assert weights[3] / sum(weights) < 0.4
    assert weights[:3] == [120, 300, 250]
    assert [partial.weight(n, 200.0, uniform=False) for n in (100, 100)] == [100, 100]
    assert partial.weight_cap(250.0, 2.0, uniform=True) is None and partial.weight(10**5, None, True) == 1.0


# --- central DP -----------------------------------------------------------------------------------

@pytest.mark.parametrize("z,q,rounds", [(1.0, 1.0, 10), (1.1, 0.01, 1000), (0.8, 0.1, 50)])
def test_the_accountant_matches_the_library_for_the_same_parameters(z, q, rounds):
    accountant = RdpAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, event) if q < 1 else event, rounds)
    assert privacy.epsilon(z, q, rounds, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert privacy.epsilon(z, q, rounds + 1, 1e-5) > privacy.epsilon(z, q, rounds, 1e-5)


def test_dp_noise_has_the_calibrated_std_and_a_redo_draws_the_same():
    n, clip, z = 4, 0.5, 2.0
    zero = {k: np.zeros(s) for k, s in {"w": (200, 100)}.items()}
    ups = [{"w": np.zeros((200, 100))} for _ in range(n)]
    agg = AggregationConfig(dp_noise_multiplier=z)

    def once(seed):
        c = RoundAggregator(agg, {"w": _t(zero["w"])}, {"w": (200, 100)}, 1)
        for u in ups:
            c.add({"w": _t(u["w"])}, 123.0, 1.0)  # under DP every update weighs the same
        return c.finish(1.0, {}, clip_bound=clip, noise_seed=seed).weights["w"].numpy()

    a, b, other = once(7), once(7), once(8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)
    assert a.std() == pytest.approx(z * clip / n, rel=0.02)  # N(0, (zC)^2) on the sum, divided by n


def test_sampling_is_secret_keyed_and_near_its_rate():
    chosen = sum(privacy.sampled(b"s" * 32, 1, f"d{i}", 0.1) for i in range(20_000))
    assert 1800 < chosen < 2200
    assert privacy.sampled(b"s" * 32, 1, "d0", 1.0)


def test_incompatible_choices_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="trimmed_mean"):
        AggregationConfig(lora="exact", rule="trimmed_mean")
    with pytest.raises(ConfigError, match="sgd server optimizer only"):
        AggregationConfig(lora="exact", optimizer="adam")
    with pytest.raises(ConfigError, match="unknown algorithm"):
        AggregationConfig.preset("krum")
    assert AggregationConfig.preset("fedadam").optimizer == "adam"


# --- heterogeneous ranks --------------------------------------------------------------------------

def _tier_updates(ranks, seed):
    rng = np.random.default_rng(seed)
    bases = {r: {A_KEY: rng.standard_normal((r, IN)) * 0.3, B_KEY: rng.standard_normal((OUT, r)) * 0.1} for r in ranks}
    ups = [{A_KEY: rng.standard_normal((r, IN)) * 0.1, B_KEY: rng.standard_normal((OUT, r)) * 0.1} for r in ranks]
    return bases, ups


def test_exact_with_ranks_16_8_4_equals_the_dense_mean_of_scaled_products():
    alpha, ranks, w = 16.0, [16, 8, 4, 4], [1.0, 2.0, 1.0, 3.0]
    bases, tier_ups = _tier_updates([16, 8, 4], seed=10)
    ups = dict(zip([16, 8, 4], tier_ups))  # one update per rank; the two rank-4 devices send the same
    shapes = {A_KEY: (16, IN), B_KEY: (OUT, 16)}
    combiner = RoundAggregator(AggregationConfig(lora="exact"), {k: _t(v) for k, v in bases[16].items()}, shapes,
                               16, alpha, {r: {k: _t(v) for k, v in bases[r].items()} for r in (8, 4)})
    for r, wi in zip(ranks, w):
        combiner.add({k: _t(v) for k, v in ups[r].items()}, wi, 1.0, r)
    out = combiner.finish(1.0, {})

    def scaled(r, u):
        return (alpha / r) * (bases[r][B_KEY] + u[B_KEY]) @ (bases[r][A_KEY] + u[A_KEY])

    dense = sum(wi * scaled(r, ups[r]) for r, wi in zip(ranks, w)) / sum(w)
    U, S, Vt = np.linalg.svd(dense)
    np.testing.assert_allclose((alpha / 16) * _product(out.weights), dense, atol=1e-5)  # rank 16 >= sum's rank
    for r in (8, 4):  # each tier: the best rank-r approximation, under its own alpha / r scale
        tier = out.tiers[r]
        assert tier[B_KEY].shape == (OUT, r) and tier[A_KEY].shape == (r, IN)
        np.testing.assert_allclose((alpha / r) * _product(tier), (U[:, :r] * S[:r]) @ Vt[:r], atol=1e-5)


def test_naive_zero_padding_averages_padded_factors_and_slices_each_tier():
    ranks, w = [16, 8, 4], [1.0, 1.0, 2.0]
    bases, ups = _tier_updates(ranks, seed=11)
    shapes = {A_KEY: (16, IN), B_KEY: (OUT, 16)}
    combiner = RoundAggregator(AggregationConfig(), {k: _t(v) for k, v in bases[16].items()}, shapes, 16, 16.0,
                               {r: {k: _t(v) for k, v in bases[r].items()} for r in (8, 4)})
    for r, u, wi in zip(ranks, ups, w):
        combiner.add({k: _t(v) for k, v in u.items()}, wi, 1.0, r)
    out = combiner.finish(1.0, {})
    for k in SHAPES:
        padded = [np.zeros(shapes[k]) for _ in ups]
        for p, u in zip(padded, ups):
            p[tuple(slice(0, n) for n in u[k].shape)] = u[k]
        expected = bases[16][k] + sum(wi * p for wi, p in zip(w, padded)) / sum(w)
        np.testing.assert_allclose(out.weights[k].numpy(), expected, atol=1e-6)
        for r in (8, 4):
            np.testing.assert_array_equal(out.tiers[r][k].numpy(),
                                          out.weights[k].numpy()[tuple(slice(0, n) for n in bases[r][k].shape)])


# --- SCAFFOLD --------------------------------------------------------------------------------------

def test_scaffold_moves_the_server_control_variate_by_the_mean_device_change():
    base, ups, w = _base(), _updates(3, seed=12), [1.0, 2.0, 1.0]
    changes = _updates(3, seed=13)  # each device's Δc_i, sent beside its delta
    scales = [1.0, 0.5, 1.0]
    shapes = {**SHAPES, **{f"scaffold.{k}": v for k, v in SHAPES.items()}}
    c = {k: np.full(s, 0.3) for k, s in SHAPES.items()}
    combiner = RoundAggregator(AggregationConfig.preset("scaffold"), {k: _t(v) for k, v in base.items()}, shapes, R)
    for u, dc, wi, sc in zip(ups, changes, w, scales):
        combiner.add({**{k: _t(v) for k, v in u.items()}, **{f"scaffold.{k}": _t(v) for k, v in dc.items()}}, wi, sc)
    out = combiner.finish(1.0, {}, control={k: _t(v) for k, v in c.items()}, participation=0.25)
    for k in SHAPES:
        mean_change = sum(wi * sc * dc[k] for dc, wi, sc in zip(changes, w, scales)) / sum(w)
        np.testing.assert_allclose(out.control[k].numpy(), c[k] + 0.25 * mean_change, atol=1e-6)
        mean = sum(wi * sc * u[k] for u, wi, sc in zip(ups, w, scales)) / sum(w)
        np.testing.assert_allclose(out.weights[k].numpy(), base[k] + mean, atol=1e-6)  # the model step is FedAvg's
    assert set(out.weights) == set(SHAPES)  # control tensors never reach the adapter
    with pytest.raises(ConfigError, match="scaffold"):
        AggregationConfig(drift_control="scaffold", lora="exact")
