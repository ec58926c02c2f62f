"""Solvers (moxco.curvature.solvers) against explicit spectra and traces.

``lanczos`` returns the *algebraic* extremes: on quadratics with mixed-sign spectra and on small MLPs
at points where negative curvature dominates, its top Ritz value is ``eigvalsh(H)[-1]`` and its
bottom one ``eigvalsh(H)[0]`` (1e-3 relative), where power iteration returns ``eigvalsh(H)[0]`` as the
"top" eigenvalue. ``hutchinson`` is checked statistically against the explicit trace.
"""

from __future__ import annotations

import math

import pytest
import torch

from curvature_problems import (
    DIM, MLP, SHAPES, Quadratic, cos, dominant, gen, indefinite, matrix_with_spectrum, spd, split,
)
from moxco import tensors
from moxco.curvature import (
    AutogradHessian, EigenResult, FiniteDifferenceHessian, extreme_eigenvalues, hessian_trace, hutchinson, lanczos,
    power, power_iteration, top_eigenvalue,
)

# torch.func's forward-mode decompositions go through the deprecated torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

MIXED = [  # (top, bottom): positive-dominant, balanced, negative-dominant, strongly negative-dominant
    (10.0, -6.0), (5.0, -5.2), (4.0, -10.0), (1.0, -30.0),
]


def diag_quadratic():
    """``f = ½θᵀdiag(1, −3)θ``: λ_max = 1, λ_min = −3."""
    theta = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    A = torch.diag(torch.tensor([1.0, -3.0], dtype=torch.float64))
    return theta, lambda: 0.5 * theta @ A @ theta


def test_lanczos_on_the_diagonal_saddle_is_one_and_minus_three_where_power_iteration_says_minus_three():
    theta, f = diag_quadratic()
    result = extreme_eigenvalues(f, [theta], generator=gen(0))
    assert result.eigenvalue == pytest.approx(1.0, rel=1e-12)
    assert result.eigenvalue_min == pytest.approx(-3.0, rel=1e-12)
    assert result.converged and result.hvps == 2  # the Krylov space is the whole space: breakdown
    assert top_eigenvalue(f, [theta], generator=gen(0))[0] == pytest.approx(1.0, rel=1e-12)
    # power iteration: the largest magnitude
    assert power_iteration(f, [theta], generator=gen(0)).eigenvalue == pytest.approx(-3.0, rel=1e-3)


@pytest.mark.parametrize("top,bottom", MIXED)
@pytest.mark.parametrize("seed", [0, 1])
def test_lanczos_extremes_of_mixed_sign_quadratics_are_eigvalsh_first_and_last(top, bottom, seed):
    q = Quadratic(indefinite(seed, top=top, bottom=bottom), seed)
    eigs, vecs = torch.linalg.eigh(q.A)
    result = extreme_eigenvalues(q.loss, q.params, generator=gen(seed), tol=1e-8)
    assert result.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-3)
    assert result.eigenvalue_min == pytest.approx(float(eigs[0]), rel=1e-3)
    assert abs(cos(result.eigenvector, split(vecs[:, -1]))) > 0.999
    assert tensors.norm(result.eigenvector).item() == pytest.approx(1.0, abs=1e-12)
    assert result.residual >= 0 and result.residual_min >= 0


@pytest.mark.parametrize("seed", [1, 2])
def test_lanczos_on_mlps_where_negative_curvature_dominates(seed):
    mlp = MLP(seed, weight_std=2.0)
    eigs = mlp.spectrum()
    assert -eigs[0] > 1.2 * eigs[-1] > 0  # the point is one where |λ_min| dominates
    result = extreme_eigenvalues(mlp.loss, mlp.params, generator=gen(seed), iters=200, tol=1e-10)
    assert result.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-3)
    assert result.eigenvalue_min == pytest.approx(float(eigs[0]), rel=1e-3)
    # the largest-magnitude answer power iteration gives there is the bottom of the spectrum
    assert power_iteration(mlp.loss, mlp.params, generator=gen(seed), iters=2000).eigenvalue == pytest.approx(
        float(eigs[0]), rel=1e-2)


@pytest.mark.parametrize("seed,loss", [(0, "mse"), (3, "ce")])
def test_lanczos_on_mlps_with_positive_dominant_curvature_agrees_with_power_iteration(seed, loss):
    mlp = MLP(seed, loss=loss)
    eigs, vecs = torch.linalg.eigh(mlp.explicit_hessian())
    assert dominant(eigs) == float(eigs[-1]) > 0
    lam, v = top_eigenvalue(mlp.loss, mlp.params, generator=gen(seed), tol=1e-10, iters=200)
    assert lam == pytest.approx(float(eigs[-1]), rel=1e-8)
    assert abs(cos(v, split(vecs[:, -1], mlp.shapes))) > 0.999
    powered = power_iteration(mlp.loss, mlp.params, generator=gen(seed), iters=300)
    assert powered.converged and powered.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-3)
    reused, _ = top_eigenvalue(mlp.loss, mlp.params, generator=gen(seed), tol=1e-10, iters=200, reuse_graph=True)
    assert reused == pytest.approx(lam, rel=1e-12)


def test_lanczos_needs_far_fewer_products_than_power_iteration_on_a_crowded_top():
    eigs_in = torch.cat([torch.linspace(-2.0, 9.0, DIM - 1, dtype=torch.float64), torch.tensor([10.0])])
    q = Quadratic(matrix_with_spectrum(eigs_in, 7), 7)
    lz = extreme_eigenvalues(q.loss, q.params, generator=gen(0), tol=1e-6)
    pw = power_iteration(q.loss, q.params, generator=gen(0), tol=1e-6, iters=1000)
    assert lz.eigenvalue == pytest.approx(10.0, rel=1e-4)
    assert lz.hvps < pw.hvps / 3


def test_thick_restarted_lanczos_converges_to_both_extremes_with_a_small_basis():
    q = Quadratic(indefinite(4, top=3.0, bottom=-8.0), 4)
    eigs = torch.linalg.eigvalsh(q.A)
    with AutogradHessian(q.loss, q.params) as op:
        result = lanczos(op, iters=200, tol=1e-12, generator=gen(0), max_basis=4)
    assert result.hvps > 4  # it did restart
    assert result.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-6)
    assert result.eigenvalue_min == pytest.approx(float(eigs[0]), rel=1e-6)


def test_float32_mlp_top_eigenvalue_is_within_1e3_of_its_float64_hessian():
    mlp = MLP(1, weight_std=2.0)
    eigs = mlp.spectrum()
    mlp.to_float32()
    lam, v = top_eigenvalue(mlp.loss, mlp.params, generator=gen(0), iters=60)
    assert v[0].dtype == torch.float32
    assert lam == pytest.approx(float(eigs[-1]), rel=1e-3)


def test_lanczos_on_finite_difference_products_matches_the_explicit_spectrum():
    mlp = MLP(2, weight_std=2.0)
    eigs = mlp.spectrum()
    result = lanczos(FiniteDifferenceHessian(mlp.loss, mlp.params), iters=150, tol=1e-10, generator=gen(0))
    assert result.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-3)
    assert result.eigenvalue_min == pytest.approx(float(eigs[0]), rel=1e-3)


def test_an_exact_eigenvector_gives_its_eigenvalue_in_one_product():
    q = Quadratic(spd(4), 4)
    eigs, vecs = torch.linalg.eigh(q.A)
    result = extreme_eigenvalues(q.loss, q.params, v0=split(3.0 * vecs[:, -1]))  # normalised internally
    assert result.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-12)
    assert result.converged and result.hvps == 1 and result.residual < 1e-6
    assert math.isnan(result.eigenvalue_min)  # one product: no λ_min information
    pw = power_iteration(q.loss, q.params, v0=split(3.0 * vecs[:, -1]))
    assert pw.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-12) and pw.converged and pw.hvps == 2


def test_zero_hessian_returns_zero_after_one_product():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, dtype=torch.float64)
    for result in (power_iteration(lambda: c @ x, [x], generator=gen(0)),
                   extreme_eigenvalues(lambda: c @ x, [x], generator=gen(0))):
        assert result.eigenvalue == 0.0 and result.converged and result.hvps == 1


def test_power_counts_and_caps_products_and_shift_below_lambda_min_finds_the_top():
    q = Quadratic(indefinite(3, top=4.0, bottom=-10.0), 3)
    eigs = torch.linalg.eigvalsh(q.A)
    result = power_iteration(q.loss, q.params, generator=gen(0))
    assert isinstance(result, EigenResult) and result.converged and 2 <= result.hvps <= 100
    assert result.eigenvalue == pytest.approx(float(eigs[0]), rel=1e-3)  # largest magnitude
    shifted = power_iteration(q.loss, q.params, generator=gen(0), shift=float(eigs[0]), iters=2000)
    assert shifted.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-3)
    assert power_iteration(q.loss, q.params, generator=gen(0), iters=3).hvps == 3
    fixed = power_iteration(q.loss, q.params, generator=gen(0), iters=7, tol=None)
    assert fixed.hvps == 7 and not fixed.converged
    with AutogradHessian(q.loss, q.params) as op:
        _, nxt = power(op, iters=1, generator=gen(0))
    assert tensors.norm(nxt).item() == pytest.approx(1.0, abs=1e-12)


def test_reduce_receives_float64_partials_and_hv_mean_every_product():
    q = Quadratic(spd(1), 1)
    exact = float(torch.linalg.eigvalsh(q.A)[-1])
    seen, calls = [], []

    def reduce(partials):
        seen.append(partials.dtype)
        return partials

    def hv_mean(hv):  # the mean of H v and 3 H v: the operator becomes 2H
        calls.append(1)
        return tensors.scale(tensors.add_scaled(hv, hv, 3.0), 0.5)

    result = extreme_eigenvalues(q.loss, q.params, generator=gen(0), reduce=reduce, hv_mean=hv_mean, tol=1e-8)
    assert result.eigenvalue == pytest.approx(2 * exact, rel=1e-6)
    assert len(calls) == result.hvps and set(seen) == {torch.float64}
    assert len(seen) == 1 + 2 * result.hvps + 1  # start norm, two passes per product, the Ritz vector's norm
    plain = extreme_eigenvalues(q.loss, q.params, generator=gen(0), tol=1e-8)
    assert result.eigenvalue == pytest.approx(2 * plain.eigenvalue, rel=1e-12)


def test_non_finite_loss_or_product_gives_nan():
    mlp = MLP(0)
    with torch.no_grad():
        mlp.params[0][0, 0] = math.nan
    assert math.isnan(extreme_eigenvalues(mlp.loss, mlp.params, generator=gen(0)).eigenvalue)
    assert math.isnan(power_iteration(mlp.loss, mlp.params, generator=gen(0)).eigenvalue)
    mlp = MLP(0)
    assert math.isnan(extreme_eigenvalues(lambda: mlp.loss() * math.inf, mlp.params, generator=gen(0)).eigenvalue)
    assert math.isnan(hessian_trace(lambda: mlp.loss() * math.inf, mlp.params, samples=3).estimate)


def test_argument_validation():
    q = Quadratic(spd(0))
    good = [torch.ones(s, dtype=torch.float64) for s in SHAPES]
    with pytest.raises(ValueError, match="has 2 tensors but params has 3"):
        top_eigenvalue(q.loss, q.params, v0=good[:2])
    with pytest.raises(ValueError, match=r"v0\[1\] has shape \(4,\)"):
        top_eigenvalue(q.loss, q.params, v0=[good[0], torch.ones(4), good[2]])
    with pytest.raises(ValueError, match="zero vector"):
        top_eigenvalue(q.loss, q.params, v0=[torch.zeros_like(t) for t in good])
    with pytest.raises(ValueError, match="non-finite"):
        top_eigenvalue(q.loss, q.params, v0=[good[0] * math.nan, good[1], good[2]])
    with pytest.raises(TypeError, match="list of tensors"):
        top_eigenvalue(q.loss, q.params, v0=good[0])
    with pytest.raises(ValueError, match="iters must be an integer ≥ 1, got 0"):
        top_eigenvalue(q.loss, q.params, iters=0)
    with pytest.raises(ValueError, match="tol must be .* got -0.1"):
        top_eigenvalue(q.loss, q.params, tol=-0.1)
    with pytest.raises(ValueError, match="shift must be a finite number, got inf"):
        power_iteration(q.loss, q.params, shift=math.inf)
    with pytest.raises(ValueError, match="params is empty"):
        top_eigenvalue(q.loss, [])
    with pytest.raises(ValueError, match=r"params\[0\] .* does not require grad"):
        top_eigenvalue(q.loss, [p.detach() for p in q.params])
    with pytest.raises(ValueError, match="scalar tensor, got \\(2,\\)"):
        top_eigenvalue(lambda: torch.stack([q.loss(), q.loss()]), q.params)
    with pytest.raises(ValueError, match="samples must be an integer ≥ 1"):
        hessian_trace(q.loss, q.params, samples=0)
    lam, v = top_eigenvalue(q.loss, q.params, v0=[t.float() for t in good])  # converted to float64
    assert v[0].dtype == torch.float64 and lam == pytest.approx(float(torch.linalg.eigvalsh(q.A)[-1]), rel=1e-3)


# --- the trace ----------------------------------------------------------------------------------------


def rademacher_sd(A: torch.Tensor) -> float:
    """Standard deviation of one Rademacher sample ``zᵀAz``: ``√(2(‖A‖_F² − Σ A_jj²))``."""
    return math.sqrt(2 * (float((A * A).sum()) - float((A.diagonal() ** 2).sum())))


@pytest.mark.parametrize("seed", [0, 1])
def test_hutchinson_is_within_four_standard_errors_of_the_explicit_trace(seed):
    q = Quadratic(indefinite(seed, top=4.0, bottom=-10.0), seed)
    samples = 400
    result = hessian_trace(q.loss, q.params, samples=samples, generator=gen(seed))
    expected_se = rademacher_sd(q.A) / math.sqrt(samples)
    assert abs(result.estimate - float(q.A.trace())) < 4 * expected_se
    assert 0.8 * expected_se < result.stderr < 1.2 * expected_se  # the reported standard error is right
    assert result.hvps == samples


def test_hutchinson_on_an_mlp_and_on_finite_differences_matches_the_explicit_trace():
    mlp = MLP(1, weight_std=2.0)
    H = mlp.explicit_hessian()
    samples = 300
    se = rademacher_sd(H) / math.sqrt(samples)
    auto = hessian_trace(mlp.loss, mlp.params, samples=samples, generator=gen(3))
    fd = hutchinson(FiniteDifferenceHessian(mlp.loss, mlp.params, eps=1e-5), samples=samples, generator=gen(3))
    assert abs(auto.estimate - float(H.trace())) < 4 * se
    assert fd.estimate == pytest.approx(auto.estimate, rel=1e-4, abs=1e-6 * se)  # same vectors, FD products
