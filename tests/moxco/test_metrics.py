"""Audit metrics against closed forms on quadratics and against finite differences on smooth functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moxco import metrics, tensors

SHAPES = [(3,), (2, 2), (4, 1)]  # a parameter list with several tensors: 3 + 4 + 4 = 11 numbers
DIM = sum(int(np.prod(s)) for s in SHAPES)


def split(flat: torch.Tensor) -> list[torch.Tensor]:
    out, i = [], 0
    for s in SHAPES:
        n = int(np.prod(s))
        out.append(flat[i : i + n].reshape(s).clone())
        i += n
    return out


def flat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


@pytest.fixture
def quadratic():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64)
    a = m @ m.T / DIM + 0.1 * torch.eye(DIM, dtype=torch.float64)
    b = torch.randn(DIM, generator=gen, dtype=torch.float64)

    def f(x):
        return 0.5 * x @ a @ x + b @ x

    def grad(x):
        return a @ x + b

    return a, b, f, grad, gen


def test_inst_gap_on_quadratic_is_minus_half_dAd(quadratic):
    a, b, f, grad, gen = quadratic
    for _ in range(5):
        x_prev = torch.randn(DIM, generator=gen, dtype=torch.float64)
        x = x_prev + 0.3 * torch.randn(DIM, generator=gen, dtype=torch.float64)
        d = x - x_prev
        value = metrics.inst_gap(f(x), f(x_prev), split(grad(x)), split(x), split(x_prev))
        assert float(value) == pytest.approx(float(-0.5 * d @ a @ d), rel=1e-10, abs=1e-12)
        assert float(value) <= 0.0  # convex: the gap is never positive


def test_inst_smooth_on_quadratic_is_rayleigh_ratio_and_bounded_by_L(quadratic):
    a, b, f, grad, gen = quadratic
    lipschitz = float(torch.linalg.eigvalsh(a).max())
    for _ in range(5):
        x_prev = torch.randn(DIM, generator=gen, dtype=torch.float64)
        x = x_prev + torch.randn(DIM, generator=gen, dtype=torch.float64)
        d = x - x_prev
        value = float(metrics.inst_smooth(split(grad(x)), split(grad(x_prev)), split(x), split(x_prev)))
        assert value == pytest.approx(float((a @ d).norm() / d.norm()), rel=1e-10)
        assert value <= lipschitz * (1 + 1e-12)
    # along the top eigenvector the bound is attained
    evals, evecs = torch.linalg.eigh(a)
    x_prev = torch.zeros(DIM, dtype=torch.float64)
    x = evecs[:, -1] * 0.7
    value = float(metrics.inst_smooth(split(grad(x)), split(grad(x_prev)), split(x), split(x_prev)))
    assert value == pytest.approx(float(evals[-1]), rel=1e-10)


def test_inst_smooth_zero_step_is_nan_and_gradient_jump_is_inf():
    x = [torch.ones(3, dtype=torch.float64)]
    assert math.isnan(float(metrics.inst_smooth(x, x, x, x)))
    assert float(metrics.inst_smooth([torch.zeros(3, dtype=torch.float64)], x, x, x)) == math.inf


def test_update_corr_and_rs_on_quadratic(quadratic):
    a, b, f, grad, gen = quadratic
    x = torch.randn(DIM, generator=gen, dtype=torch.float64)
    proposed = -0.1 * grad(x)  # Δ_t of gradient descent
    scale = 0.37  # a random-scaling draw s_t
    x_next = x + scale * proposed
    g_next = grad(x_next)
    corr = float(metrics.update_corr(split(g_next), split(x_next), split(x)))
    corr_rs = float(metrics.update_corr_rs(split(g_next), split(proposed)))
    assert corr == pytest.approx(float(g_next @ (x_next - x)), rel=1e-12)
    assert corr_rs == pytest.approx(float(g_next @ proposed), rel=1e-12)
    assert corr == pytest.approx(scale * corr_rs, rel=1e-12)
    # without random scaling the two are the same number
    x_next = x + proposed
    g_next = grad(x_next)
    assert float(metrics.update_corr(split(g_next), split(x_next), split(x))) == pytest.approx(
        float(metrics.update_corr_rs(split(g_next), split(proposed))), rel=1e-12
    )


def test_update_corr_rs_is_unbiased_for_progress_under_random_scaling(quadratic):
    """Audit eq. 12: E_s[F(x + sΔ) − F(x)] = E_s⟨∇F(x + sΔ), Δ⟩ for s ~ Exp(1)."""
    a, b, f, grad, gen = quadratic
    x = torch.randn(DIM, generator=gen, dtype=torch.float64)
    delta = -0.05 * grad(x)
    s = torch.empty(200_000, dtype=torch.float64).exponential_(1.0, generator=gen)
    # on a quadratic both sides are polynomials in s: evaluate exactly per draw, then average
    g_dot_delta, dad = float(grad(x) @ delta), float(delta @ a @ delta)
    progress = (s * g_dot_delta + 0.5 * s**2 * dad).mean()
    corr_rs = torch.stack(
        [metrics.update_corr_rs(split(grad(x + si * delta)), split(delta)) for si in s[:2000]]
    ).mean()
    exact_expectation = g_dot_delta + dad  # E[s] = 1, E[s²] = 2
    assert float(progress) == pytest.approx(exact_expectation, rel=2e-2)
    assert float(corr_rs) == pytest.approx(exact_expectation, rel=5e-2)


def test_loss_diff_grad_norm_distance():
    assert float(metrics.loss_diff(torch.tensor(2.5), 1.0)) == 1.5
    g = [torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]
    assert float(metrics.grad_norm_sq(g)) == pytest.approx(169.0)
    x0 = [torch.zeros(2), torch.zeros(1, 1)]
    assert float(metrics.distance(g, x0)) == pytest.approx(13.0)


def smooth_function(x: torch.Tensor) -> torch.Tensor:
    """A non-convex smooth test function with a dense, known-by-autograd Hessian."""
    w = torch.linspace(-1.0, 1.0, DIM * DIM, dtype=torch.float64).reshape(DIM, DIM)
    return torch.sin(w @ x).sum() + torch.log1p((x**2).sum()) + 0.1 * (x**4).sum()


def test_inst_gap_and_smooth_against_finite_differences():
    gen = torch.Generator().manual_seed(3)
    x_prev = torch.randn(DIM, generator=gen, dtype=torch.float64)
    direction = torch.randn(DIM, generator=gen, dtype=torch.float64)
    direction /= direction.norm()

    def value_and_grad(x):
        x = x.clone().requires_grad_(True)
        y = smooth_function(x)
        (g,) = torch.autograd.grad(y, x)
        return y.detach(), g

    # Hessian by central finite differences of autograd gradients (independent of autograd's
    # second-order path)
    h = 1e-5
    fd_hessian = torch.stack(
        [(value_and_grad(x_prev + h * e)[1] - value_and_grad(x_prev - h * e)[1]) / (2 * h) for e in torch.eye(DIM, dtype=torch.float64)]
    )
    fd_hessian = 0.5 * (fd_hessian + fd_hessian.T)
    curvature = float(direction @ fd_hessian @ direction)
    stretch = float((fd_hessian @ direction).norm())
    for step in (1e-2, 1e-3):
        x = x_prev + step * direction
        f_x, g_x = value_and_grad(x)
        f_prev, g_prev = value_and_grad(x_prev)
        gap = float(metrics.inst_gap(f_x, f_prev, split(g_x), split(x), split(x_prev)))
        # Taylor around x: f(x_prev) = f(x) − ⟨g, d⟩ + ½dᵀHd + O(‖d‖³) ⇒ gap = −½dᵀHd + O(‖d‖³)
        assert gap / step**2 == pytest.approx(-0.5 * curvature, abs=5 * step)
        smooth = float(metrics.inst_smooth(split(g_x), split(g_prev), split(x), split(x_prev)))
        assert smooth == pytest.approx(stretch, abs=5 * step)


def test_reduce_sums_partials_like_an_unsharded_model(quadratic):
    """Two 'ranks' each holding a shard give the unsharded value once partials are summed."""
    a, b, f, grad, gen = quadratic
    x_prev = torch.randn(DIM, generator=gen, dtype=torch.float64)
    x = x_prev + 0.2 * torch.randn(DIM, generator=gen, dtype=torch.float64)
    g, g_prev = split(grad(x)), split(grad(x_prev))
    xs, xs_prev = split(x), split(x_prev)
    full_gap = float(metrics.inst_gap(f(x), f(x_prev), g, xs, xs_prev))
    full_smooth = float(metrics.inst_smooth(g, g_prev, xs, xs_prev))

    def other_rank(fn):
        return lambda partials: partials + fn()

    gap_rank0 = metrics.inst_gap(
        f(x), f(x_prev), g[:1], xs[:1], xs_prev[:1],
        reduce=other_rank(lambda: torch.stack([tensors.dot_diff(g[1:], xs[1:], xs_prev[1:])])),
    )
    smooth_rank0 = metrics.inst_smooth(
        g[:1], g_prev[:1], xs[:1], xs_prev[:1],
        reduce=other_rank(lambda: torch.stack([tensors.dist_sq(g[1:], g_prev[1:]), tensors.dist_sq(xs[1:], xs_prev[1:])])),
    )
    assert float(gap_rank0) == pytest.approx(full_gap, rel=1e-12)
    assert float(smooth_rank0) == pytest.approx(full_smooth, rel=1e-12)

    # an in-place reducer (the torch.distributed.all_reduce shape) is supported too
    def in_place(partials):
        partials.add_(torch.stack([tensors.dot(g[1:], g[1:])]))

    assert float(metrics.grad_norm_sq(g[:1], reduce=in_place)) == pytest.approx(float(grad(x) @ grad(x)), rel=1e-12)


def test_replay_sums_give_the_replay_metrics_in_one_collective(quadratic):
    """ReplaySums carries f(x), f(y), ‖∇f(x) − ∇f(y)‖², ⟨∇f(x), x − y⟩, ‖x − y‖² in one vector; its
    values() are loss_diff, inst_gap, inst_smooth (or the _ref pair) by their closed forms on
    ½xᵀAx + bᵀx, from products passed in or computed here, sharded through one reduce call."""
    a, b, f, grad, gen = quadratic
    x_prev = torch.randn(DIM, generator=gen, dtype=torch.float64)
    x = x_prev + 0.2 * torch.randn(DIM, generator=gen, dtype=torch.float64)
    d = x - x_prev
    want = {"loss_diff": float(f(x) - f(x_prev)), "inst_gap": float(-0.5 * d @ a @ d),
            "inst_smooth": float((a @ d).norm() / d.norm())}
    g, h, xs, xs_prev = split(grad(x)), split(grad(x_prev)), split(x), split(x_prev)
    diff_sq = tensors.dist_sq(g, [t.clone() for t in h], overwrite_ys=True)
    computed = metrics.replay_sums(f(x), f(x_prev), diff_sq, g, xs, xs_prev).values()
    assert computed == pytest.approx(want, rel=1e-10)
    given = metrics.replay_sums(f(x), f(x_prev), diff_sq, grad_dot_step=grad(x) @ d, step_sq=d @ d).values()
    assert given == pytest.approx(want, rel=1e-10)
    reference = metrics.replay_sums(f(x), f(x_prev), diff_sq, g, xs, xs_prev, reference=True).values()
    assert reference == pytest.approx({"inst_gap_ref": want["inst_gap"], "inst_smooth_ref": want["inst_smooth"]},
                                      rel=1e-10)
    assert metrics.replay_sums(f(x), f(x_prev)).values() == pytest.approx({"loss_diff": want["loss_diff"]})
    # a gradient scale s: the lists hold .grad = g / s, and ⟨g, x − y⟩ is rescaled by s
    s = torch.tensor(4.0, dtype=torch.float64)
    scaled = [t / 4.0 for t in g]
    diff_scaled = tensors.dist_sq(scaled, [t.clone() for t in h], overwrite_ys=True, x_scale=s)
    assert metrics.replay_sums(f(x), f(x_prev), diff_scaled, scaled, xs, xs_prev, grad_scale=s).values() == \
        pytest.approx(want, rel=1e-10)
    calls = []

    def other_rank(partials):  # rank 1 holds the remaining shards: its partials in the same order
        calls.append(partials.clone())
        return partials + torch.stack([tensors.dist_sq(g[1:], h[1:]), tensors.dot_diff(g[1:], xs[1:], xs_prev[1:]),
                                       tensors.dist_sq(xs[1:], xs_prev[1:])])

    sharded = metrics.replay_sums(f(x), f(x_prev), tensors.dist_sq(g[:1], h[:1]), g[:1], xs[:1], xs_prev[:1],
                                  reduce=other_rank).values()
    assert len(calls) == 1 and sharded == pytest.approx(want, rel=1e-10)


def test_low_precision_parameters_are_reduced_in_float32():
    # bf16 values square exactly in float32; float32 dots keep the relative error under 1e-6, where
    # bf16 accumulation would be off by ~1e-3
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4096, generator=gen).to(torch.bfloat16) for _ in range(3)]
    exact = sum(float((x.double() ** 2).sum()) for x in xs)
    assert float(metrics.grad_norm_sq(xs)) == pytest.approx(exact, rel=1e-6)


def test_large_float32_tensors_keep_float64_level_accuracy():
    # 4·10⁶ elements: a float32 accumulator (BLAS vdot, vector_norm) is off by 1e-5 to 1e-4 here
    gen = torch.Generator().manual_seed(2)
    g, x, y = (torch.randn(4_000_000, generator=gen) + 0.1 for _ in range(3))
    g64, x64, y64 = g.double(), x.double(), y.double()
    assert float(tensors.norm_sq([g])) == pytest.approx(float(g64 @ g64), rel=1e-6)
    assert float(tensors.dot([g], [x])) == pytest.approx(float(g64 @ x64), rel=1e-6)
    assert float(tensors.dot_diff([g], [x], [y])) == pytest.approx(float(g64 @ (x64 - y64)), rel=1e-6)
    assert float(tensors.dist_sq([x], [y])) == pytest.approx(float((x64 - y64) @ (x64 - y64)), rel=1e-6)


def test_aggregates_match_their_definitions_and_reset_at_epochs():
    rng = np.random.default_rng(0)
    gaps, smooths = rng.normal(size=300), rng.exponential(size=300)
    agg = metrics.GapSmoothAggregates(beta=0.99)
    ema_gap = ema_smooth = 0.0
    for i, (gap, smooth) in enumerate(zip(gaps, smooths), start=1):
        out = agg.update(gap, smooth)
        ema_gap = 0.99 * ema_gap + 0.01 * gap
        ema_smooth = 0.99 * ema_smooth + 0.01 * smooth
        assert out["avg_gap"] == pytest.approx(gaps[:i].mean(), rel=1e-12, abs=1e-15)
        assert out["exp_gap"] == pytest.approx(ema_gap, rel=1e-12, abs=1e-15)
        assert out["max_smooth"] == smooths[:i].max()
        assert out["exp_smooth"] == pytest.approx(ema_smooth, rel=1e-12)
    agg.reset_epoch()
    out = agg.update(5.0, 2.0)
    assert out == {"avg_gap": 5.0, "exp_gap": pytest.approx(0.05), "max_smooth": 2.0, "exp_smooth": pytest.approx(0.02)}


def test_aggregates_skip_nan_but_keep_infinity_and_round_trip():
    agg = metrics.GapSmoothAggregates()
    agg.update(1.0, 1.0)
    out = agg.update(math.nan, math.nan)
    assert out["avg_gap"] == 1.0 and out["max_smooth"] == 1.0
    assert agg.avg_gap.skipped == 1 and agg.max_smooth.skipped == 1
    out = agg.update(3.0, math.inf)
    assert out["avg_gap"] == 2.0 and out["max_smooth"] == math.inf
    clone = metrics.GapSmoothAggregates()
    clone.load_state_dict(agg.state_dict())
    assert clone.update(4.0, 0.5) == agg.update(4.0, 0.5)
    assert math.isnan(metrics.RunningMean().value)


def test_convexity_ratio_is_two_on_a_quadratic_around_its_minimiser(quadratic):
    """For F = ½xᵀAx + bᵀx and x* = −A⁻¹b: ⟨∇F(x), x − x*⟩ = 2 (F(x) − F(x*)) exactly."""
    a, b, f, grad, gen = quadratic
    x_star = -torch.linalg.solve(a, b)
    ratio = metrics.ConvexityRatio()
    for _ in range(20):
        x = x_star + torch.randn(DIM, generator=gen, dtype=torch.float64)
        value = ratio.update(f(x), f(x_star), split(grad(x)), split(x), split(x_star))
    assert value == pytest.approx(2.0, rel=1e-9)
    assert metrics.interpret_convexity_ratio(value) == "convex-like"


def test_convexity_ratio_is_negative_on_a_double_well_path():
    """F(x) = (x² − 1)² with x* = 1: points on the hump between the wells have ⟨F'(x), x − x*⟩ > 0
    while F(x) − F(x*) > 0 ... and points past the hump on the far well make the sum negative."""

    def F(x):
        return (x**2 - 1) ** 2

    def dF(x):
        return 4 * x * (x**2 - 1)

    x_star = torch.tensor([1.0], dtype=torch.float64)
    ratio = metrics.ConvexityRatio()
    for x in torch.linspace(-1.2, -0.3, 10, dtype=torch.float64):
        x = x.reshape(1)
        value = ratio.update(F(x), F(x_star), [dF(x)], [x], [x_star])
    # direct evaluation of eq. 6 on the same path
    xs = torch.linspace(-1.2, -0.3, 10, dtype=torch.float64)
    expected = float((dF(xs) * (xs - 1)).sum() / (F(xs) - 0).sum())
    assert value == pytest.approx(expected, rel=1e-12)
    assert value < 0
    assert metrics.interpret_convexity_ratio(value) == "strongly non-convex"
    assert "degradation" in metrics.interpret_convexity_ratio(0.5)


def test_tensor_list_validation_messages():
    with pytest.raises(ValueError, match="length"):
        tensors.dot([torch.zeros(2)], [])
    with pytest.raises(ValueError, match="shape"):
        tensors.dot([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(TypeError, match="tensors"):
        tensors.as_list([1.0])
    with pytest.raises(ValueError, match="zero vector"):
        tensors.normalized([torch.zeros(3)])
    with pytest.raises(ValueError, match="beta"):
        metrics.ExponentialAverage(1.0)


def test_fused_update_corr_and_step_length_equal_the_separate_formulas():
    gen = torch.Generator().manual_seed(3)
    g, x, y = ([torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)] for _ in range(3))
    corr, step_sq = metrics.free_sums(g, x, y, None).update_products()
    assert float(corr) == pytest.approx(float(metrics.update_corr(g, x, y)), rel=1e-12)
    assert float(step_sq) == pytest.approx(float(metrics.distance(x, y)) ** 2, rel=1e-12)
    # inst_gap / inst_smooth given the precomputed products equal their full evaluation
    g_ref = [t + 0.1 for t in g]
    assert float(metrics.inst_gap(1.5, 1.0, g, x, y, grad_dot_step=corr)) == pytest.approx(
        float(metrics.inst_gap(1.5, 1.0, g, x, y)), rel=1e-12)
    assert float(metrics.inst_smooth(g, g_ref, x, y, step_sq=step_sq)) == pytest.approx(
        float(metrics.inst_smooth(g, g_ref, x, y)), rel=1e-12)


def test_step_sums_match_float64_ground_truth_in_both_regimes(kernels):
    # small tensors reduced whole; one above CHUNKED_ABOVE (and not a multiple of CHUNK) in chunks
    gen = torch.Generator().manual_seed(4)
    shapes = [(3, 5), (tensors.CHUNKED_ABOVE + 12_345,), (257,), (1000, 300)]
    g, x, x0 = ([torch.randn(s, generator=gen) + 0.05 for s in shapes] for _ in range(3))
    prev = [t - 1e-3 * torch.randn(t.shape, generator=gen) for t in x]
    d64 = lambda a, b: [u.double() - v.double() for u, v in zip(a, b)]
    exact_dot = sum(float((gi.double() * di).sum()) for gi, di in zip(g, d64(x, prev)))
    exact_step = sum(float((di * di).sum()) for di in d64(x, prev))
    exact_origin = sum(float((di * di).sum()) for di in d64(x, x0))
    both = tensors.step_sums(g, x, prev, x0)
    assert both.dtype == torch.float64 and both.shape == (3,)
    # squared norms are float32 dots over DOT_CHUNK pieces summed in float64 (one dot over the
    # 1.3·10⁶-element tensor would be off by ~7e-6)
    assert [float(v) for v in both] == [pytest.approx(exact_dot, rel=1e-6), pytest.approx(exact_step, rel=1e-6),
                                        pytest.approx(exact_origin, rel=1e-6)]
    assert [float(v) for v in tensors.step_sums(g, x, prev, None)] == [pytest.approx(float(both[0]), rel=1e-12),
                                                                      pytest.approx(float(both[1]), rel=1e-12)]
    assert [float(v) for v in tensors.step_sums(g, x, None, x0)] == [pytest.approx(float(both[2]), rel=1e-12)]
    assert tensors.step_sums(g, x, None, None).shape == (0,)
    # the chunked squared norms agree with the whole-tensor ones and with float64
    exact_norms = [float((t.double() ** 2).sum()) for t in g]
    assert [float(v) for v in tensors.norms_sq(g)] == [pytest.approx(e, rel=1e-6) for e in exact_norms]
    # mixed dtypes take the widening path with the same results
    mixed = tensors.step_sums([t.double() for t in g], x, prev, x0)
    assert [float(v) for v in mixed] == [pytest.approx(float(v), rel=1e-6) for v in both]


@pytest.mark.parametrize("advance", [False, True])
def test_step_sums_lead_with_the_gradient_norm_when_asked(kernels, advance):
    """``grad_norm_sq=True`` puts ``‖g‖²`` first, from the same pass, for every combination of
    ``prev`` and ``origin``; the other sums are unchanged."""
    gen = torch.Generator().manual_seed(12)
    shapes = [(31, 7), (5,), (40_000,)]
    g, x, x0 = ([torch.randn(s, generator=gen) for s in shapes] for _ in range(3))
    prev_values = [t - 1e-2 * torch.randn(t.shape, generator=gen) for t in x]
    grad_sq = sum(float((t.double() ** 2).sum()) for t in g)
    for prev, origin in ((prev_values, x0), (prev_values, None), (None, x0), (None, None)):
        copy = None if prev is None else tensors.FlatCopy(prev)
        plain = tensors.step_sums(g, x, None if prev is None else [t.clone() for t in prev], origin)
        both = tensors.step_sums(g, x, copy, origin, advance=advance and copy is not None, grad_norm_sq=True)
        assert both.shape == (1 + plain.numel(),) and float(both[0]) == pytest.approx(grad_sq, rel=1e-6)
        assert [float(v) for v in both[1:]] == [pytest.approx(float(v), rel=1e-6) for v in plain]
        if copy is not None:
            assert all(torch.equal(a, b) for a, b in zip(copy, x if advance else prev))


def test_free_sums_give_the_step_metrics_and_the_previous_update_norm(kernels):
    gen = torch.Generator().manual_seed(5)
    g, x, prev, x0 = ([torch.randn(4, 3, generator=gen), torch.randn(6, generator=gen)] for _ in range(4))
    free = metrics.free_sums(g, x, prev, x0, scale=0.25)
    now, before = free.values()
    # ground truth in float64, from the float32 difference both paths form
    d = [(a - b).double() for a, b in zip(x, prev)]
    corr = sum(float((t.double() * u).sum()) for t, u in zip(g, d))
    norm_sq = lambda ts: sum(float((t.double() ** 2).sum()) for t in ts)
    assert now == {"grad_norm_sq": pytest.approx(norm_sq(g), rel=1e-6),
                   "update_corr": pytest.approx(corr, rel=1e-6),
                   "update_corr_rs": pytest.approx(corr / 0.25, rel=1e-6),  # audit eq. 13: x_t − x_{t−1} = s Δ
                   "update_cos": pytest.approx(corr / math.sqrt(norm_sq(g) * norm_sq(d)), rel=1e-6),
                   "distance": pytest.approx(math.sqrt(norm_sq([a - b for a, b in zip(x, x0)])), rel=1e-6)}
    assert before == {"update_norm": pytest.approx(math.sqrt(norm_sq(d)), rel=1e-6)}
    dot_step, step_sq = free.update_products()
    assert float(dot_step) == pytest.approx(corr, rel=1e-6)
    assert float(step_sq) == pytest.approx(norm_sq(d), rel=1e-6)
    # the first step: no previous iterate, no update metrics; without x_0 no distance
    first, none_before = metrics.free_sums(g, x, None, None, grad_norms_sq=tensors.norms_sq(g)).values()
    assert first == {"grad_norm_sq": pytest.approx(norm_sq(g), rel=1e-6)} and none_before == {}
    with pytest.raises(ValueError, match="first step"):
        metrics.free_sums(g, x, None, None).update_products()
    # NaN (a diverged run) passes through as NaN, never as an absent value
    nan_now, nan_before = metrics.free_sums([t * math.nan for t in g], x, prev, x0).values()
    assert math.isnan(nan_now["grad_norm_sq"]) and math.isnan(nan_now["update_corr"])
    assert nan_before["update_norm"] == pytest.approx(math.sqrt(norm_sq(d)), rel=1e-6)
    # the cosine is scale-free: a gradient step x_t = x_{t−1} − η g_t gives −1 whatever η and ‖g‖; no step: NaN
    for eta, size in ((1e-3, 1.0), (10.0, 1e4)):
        big = [t * size for t in g]
        cos = metrics.free_sums(big, [p - eta * t for p, t in zip(prev, big)], prev, None).values()[0]["update_cos"]
        assert cos == pytest.approx(-1.0, abs=1e-6)
    assert math.isnan(metrics.free_sums(g, prev, [t.clone() for t in prev], None).values()[0]["update_cos"])
    # one collective for all of them when sharded: the reducer sees the whole vector once
    calls = []
    metrics.free_sums(g, x, prev, x0, reduce=lambda v: calls.append(v.shape) or v)
    assert calls == [(4,)]


def test_a_gradient_scale_gives_the_metrics_of_the_scaled_gradient_without_forming_it(kernels):
    """``grad_scale = s`` (clipping or AMP rescaled .grad in place; the agent passes s = g_t / .grad)
    gives every gradient metric of ``g = s · grad``, checked against the metrics of the materialised
    ``s · grad`` in float64; the consumable replay gradient is divided in place, the caller's
    gradient is never written."""
    gen = torch.Generator().manual_seed(8)
    grad, x, prev, x0, h, ref = ([torch.randn(5, 3, generator=gen, dtype=torch.float64),
                                  torch.randn(4, generator=gen, dtype=torch.float64)] for _ in range(6))
    s = torch.tensor(0.37, dtype=torch.float64)
    g = [s * t for t in grad]
    grad_before = [t.clone() for t in grad]
    now, before = metrics.free_sums(grad, x, prev, x0, grad_scale=s).values()
    want_now, want_before = metrics.free_sums(g, x, prev, x0).values()
    assert now == pytest.approx(want_now, rel=1e-12) and before == pytest.approx(want_before, rel=1e-12)
    assert metrics.free_sums(grad, x, prev, x0, grad_norms_sq=tensors.norms_sq(g), grad_scale=s).values()[0] == \
        pytest.approx(want_now, rel=1e-12)  # norms recorded before the rescaling are of g already
    assert float(metrics.inst_gap(1.5, 0.25, grad, x, ref, grad_scale=s)) == \
        pytest.approx(float(metrics.inst_gap(1.5, 0.25, g, x, ref)), rel=1e-12)
    want = float(metrics.inst_smooth(g, h, x, prev))
    assert float(metrics.inst_smooth(grad, h, x, prev, grad_scale=s)) == pytest.approx(want, rel=1e-12)
    consumed = [t.clone() for t in h]
    assert float(metrics.inst_smooth(grad, consumed, x, prev, grad_scale=s, consume_grad_ref=True)) == \
        pytest.approx(want, rel=1e-12)
    # the eager path uses the replay's gradient as its scratch space; the fused one reads it only
    assert torch.equal(consumed[0], h[0]) == (kernels == "fused")
    # an expanded gradient (a summed parameter's, from autograd) cannot be divided in place
    expanded = [h[0].clone(), torch.full((1,), 0.5, dtype=torch.float64).expand(4)]
    want_expanded = float(metrics.inst_smooth(g, [t.clone() for t in expanded], x, prev))
    assert float(metrics.inst_smooth(grad, expanded, x, prev, grad_scale=s, consume_grad_ref=True)) == \
        pytest.approx(want_expanded, rel=1e-12)
    ratio, plain = metrics.ConvexityRatio(), metrics.ConvexityRatio()
    assert ratio.update(2.0, 0.5, grad, x, ref, grad_scale=s) == pytest.approx(plain.update(2.0, 0.5, g, x, ref), rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(grad, grad_before))


def test_dist_sq_overwriting_its_second_argument_gives_the_same_value(kernels):
    """overwrite_ys forms y − x in the caller's temporaries: the same sum as with a new tensor
    (float32, mixed bf16), a fallback for tensors that cannot be written in place (an expanded
    gradient, as autograd returns for a summed parameter), and the xs untouched."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(300, 7, generator=gen), torch.randn(5, generator=gen), torch.randn(64, generator=gen)]
    ys = [torch.randn(300, 7, generator=gen), torch.ones(1).expand(5),
          torch.randn(64, generator=gen).to(torch.bfloat16)]
    expected = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(xs, ys))
    plain = tensors.dist_sq(xs, ys)
    xs_before, ys_before = [x.clone() for x in xs], [y.clone() for y in ys]
    overwritten = tensors.dist_sq(xs, ys, overwrite_ys=True)
    assert float(overwritten) == pytest.approx(expected, rel=1e-6) and float(plain) == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(xs, xs_before))
    # eager: written in place, no new tensor of its size (the fused pass only reads ys; the mixed
    # bf16 list is never fused)
    assert not torch.equal(ys[0], ys_before[0])
    assert torch.equal(ys[1], ys_before[1]) and torch.equal(ys[2], ys_before[2])  # expanded; widened copy


def test_dist_sq_in_place_keeps_float64_level_accuracy_on_heavy_tailed_differences(kernels):
    """The replay's ‖h − g‖² (every y writable: the multi-tensor in-place path, with and without a
    gradient scale) on differences whose magnitudes span decades, as a real gradient difference's
    do: within 3e-7 of float64 (float32 dots of 6.5·10⁴-element chunks are off by 1e-6 here, and by
    up to 5e-6 on the MLP of bench/agent_overhead.py)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(512, 784), (512,), (1024, 1024), (10,)]
    xs = [torch.randn(s, generator=gen) * torch.exp(3 * torch.randn(s, generator=gen)) for s in shapes]
    ys = [x + 1e-2 * torch.randn(x.shape, generator=gen) * torch.exp(3 * torch.randn(x.shape, generator=gen))
          for x in xs]
    s = torch.tensor(0.75, dtype=torch.float64)
    for scale in (None, s):
        xs64 = [x.double() * (1.0 if scale is None else 0.75) for x in xs]
        expected = sum(float(((x - y.double()) ** 2).sum()) for x, y in zip(xs64, ys))
        got = tensors.dist_sq(xs, [y.clone() for y in ys], overwrite_ys=True, x_scale=scale)
        assert got.dtype == torch.float64
        assert float(got) == pytest.approx(expected, rel=3e-7)


def test_flat_copy_is_a_list_of_views_of_one_zero_padded_buffer():
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(3, 5, generator=gen), torch.randn(7, generator=gen), torch.randn(0), torch.randn(40, generator=gen)]
    xs.append(torch.randn(6, 4, generator=gen).t())  # non-contiguous source
    copy = tensors.FlatCopy(xs)
    assert isinstance(copy, list) and len(copy) == len(xs)
    assert all(c.shape == x.shape and torch.equal(c, x) for c, x in zip(copy, xs))
    assert all(c.untyped_storage().data_ptr() == copy.flat.untyped_storage().data_ptr() for c in copy)
    offsets = [c.storage_offset() for c in copy]
    assert all(o % tensors.FLAT_ALIGN == 0 for o in offsets)
    covered = torch.zeros(copy.flat.numel(), dtype=torch.bool)
    for c, o in zip(copy, offsets):
        covered[o:o + c.numel()] = True
    assert float(copy.flat[~covered].abs().sum()) == 0.0 and int((~covered).sum()) > 0  # padding, zero
    xs[0].add_(1.0)
    assert not torch.equal(copy[0], xs[0])  # a copy, not an alias
    assert float(tensors.dist_sq(copy, xs)) == pytest.approx(15.0)  # every function takes it as a list
    # what cannot share one buffer gets one copy per tensor
    assert tensors.FlatCopy.fits(xs) and not tensors.FlatCopy.fits([torch.zeros(2), torch.zeros(2).double()])
    assert not tensors.FlatCopy.fits([torch.zeros(2, dtype=torch.bfloat16)]) and not tensors.FlatCopy.fits([])
    mixed = tensors.copy_params([torch.zeros(2), torch.ones(3).double()])
    assert not isinstance(mixed, tensors.FlatCopy) and [t.dtype for t in mixed] == [torch.float32, torch.float64]
    with pytest.raises(ValueError, match="one device"):
        tensors.FlatCopy([torch.zeros(2), torch.zeros(2).double()])


@pytest.mark.parametrize("with_origin", [True, False])
def test_advancing_step_sums_in_the_copys_own_buffer(with_origin, kernels):
    """step_sums(..., advance=True) on FlatCopy buffers: the sums of step_sums (float64 ground
    truth), then prev holds x bit for bit, the padding still zero, the origin and x untouched;
    lists of separate copies (the fallback) advance the same way."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(3, 5), (tensors.DOT_CHUNK * 3 + 17,), (257,), (1000, 3)]
    g, x, x0 = ([torch.randn(s, generator=gen) + 0.05 for s in shapes] for _ in range(3))
    prev_values = [t - 1e-3 * torch.randn(t.shape, generator=gen) for t in x]
    d64 = [a.double() - b.double() for a, b in zip(x, prev_values)]
    exact = [sum(float((gi.double() * di).sum()) for gi, di in zip(g, d64)), sum(float((di * di).sum()) for di in d64)]
    if with_origin:
        exact.append(sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(x, x0)))
    origin = tensors.FlatCopy(x0) if with_origin else None
    prev = tensors.FlatCopy(prev_values)
    x_before = [t.clone() for t in x]
    sums = tensors.step_sums(g, x, prev, origin, advance=True)
    assert [float(v) for v in sums] == [pytest.approx(e, rel=1e-6) for e in exact]
    assert [float(v) for v in sums] == [pytest.approx(float(v), rel=1e-6)
                                        for v in tensors.step_sums(g, x, prev_values, x0 if with_origin else None)]
    assert all(torch.equal(p, t) for p, t in zip(prev, x)) and all(torch.equal(a, b) for a, b in zip(x, x_before))
    used = sum(t.numel() for t in x)
    assert float(prev.flat.abs().sum()) == pytest.approx(sum(float(t.abs().sum()) for t in x), rel=1e-6)
    assert prev.flat.numel() > used  # the padding is there, and zero (the sum above)
    if with_origin:
        assert all(torch.equal(o, t) for o, t in zip(origin, x0))
    separate = [t.clone() for t in prev_values]
    again = tensors.step_sums(g, x, separate, x0 if with_origin else None, advance=True)
    assert [float(v) for v in again] == [pytest.approx(e, rel=1e-6) for e in exact]
    assert all(torch.equal(p, t) for p, t in zip(separate, x))
    # a CPU tensor above CHUNKED_ABOVE: the chunked walk, then the copy, on the same FlatCopy
    big = [torch.randn(tensors.CHUNKED_ABOVE + 5, generator=gen) for _ in range(3)]
    big_prev = tensors.FlatCopy([big[1] - 1e-3])
    big_origin = tensors.FlatCopy([big[2]]) if with_origin else None
    chunked = tensors.step_sums([big[0]], [big[1]], big_prev, big_origin, advance=True)
    expected = tensors.step_sums([big[0]], [big[1]], [big[1] - 1e-3], [big[2]] if with_origin else None)
    assert torch.equal(chunked, expected) and torch.equal(big_prev[0], big[1])


@pytest.mark.parametrize("kernels", ["eager"], indirect=True)  # the fused pass writes prev as it reads it
def test_advancing_step_sums_leave_prev_at_x_when_they_fail(kernels, monkeypatch):
    gen = torch.Generator().manual_seed(8)
    x = [torch.randn(4, 3, generator=gen), torch.randn(9, generator=gen)]
    prev = tensors.FlatCopy([t + 1.0 for t in x])
    monkeypatch.setattr(tensors, "_sq_sum", lambda flat: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        tensors.step_sums(x, x, prev, None, advance=True)  # fails after prev was overwritten with x − prev
    assert all(torch.equal(p, t) for p, t in zip(prev, x))


def test_random_like_draws_on_the_generators_device(monkeypatch):
    """The sharpness tracker's start vector: the agent's generator is a CPU one, the parameters may
    be on an accelerator, where torch.randn refuses a generator of another device (simulated here
    with meta tensors, the one other device this machine has)."""
    from moxco import tensors

    real = torch.randn

    def strict(*args, generator=None, device=None, **kwargs):
        if generator is not None and torch.device(device or "cpu").type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return real(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", strict)
    xs = [torch.empty(3, 2, device="meta"), torch.empty(4, device="meta")]
    out = tensors.random_like(xs, generator=torch.Generator().manual_seed(0))
    assert [o.device.type for o in out] == ["meta", "meta"] and [o.shape for o in out] == [x.shape for x in xs]
    cpu = tensors.random_like([torch.empty(3, 2)], generator=torch.Generator().manual_seed(0))
    assert torch.equal(cpu[0], real(3, 2, generator=torch.Generator().manual_seed(0)))
