"""Sharpness (moxco.hessian) against the explicit Hessian.

Ground truth is always an explicit matrix: the known ``A`` of a quadratic ``½xᵀAx + bᵀx``, or
``torch.func.hessian`` of a small float64 MLP (flattened into one vector for the ground truth
only), diagonalised by ``torch.linalg.eigh``. Vectors under test are lists of several tensors.
"""

from __future__ import annotations

import gc
import io
import math
import statistics
import weakref

import pytest
import torch

from moxco import tensors
from moxco.hessian import EigenResult, Sharpness, hvp, power_iteration, top_eigenvalue

# torch.func.hessian (forward AD) loads its jvp decompositions through the deprecated torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SHAPES = [(3, 4), (5,), (2, 2, 2)]  # three tensors, 12 + 5 + 8 = 25 numbers
DIM = sum(math.prod(s) for s in SHAPES)


def split(flat: torch.Tensor, shapes=SHAPES) -> list[torch.Tensor]:
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[i : i + n].reshape(s))
        i += n
    return out


def flat(xs) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cos(us, vs) -> float:
    return float(tensors.dot(us, vs) / (tensors.norm(us) * tensors.norm(vs)))


def matrix_with_spectrum(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    """``A = Q diag(eigs) Qᵀ`` with ``Q`` a random orthogonal matrix (Haar, via QR)."""
    q, r = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return (q * eigs) @ q.T


class Quadratic:
    """``f(x) = ½xᵀAx + bᵀx`` with ``x`` held as a list of parameter tensors shaped by ``SHAPES``."""

    def __init__(self, A: torch.Tensor, seed: int = 0):
        self.A = A
        self.b = torch.randn(DIM, generator=gen(seed + 100), dtype=torch.float64)
        x0 = torch.randn(DIM, generator=gen(seed + 200), dtype=torch.float64)
        self.params = [t.clone().requires_grad_(True) for t in split(x0)]

    def loss(self) -> torch.Tensor:
        x = flat(self.params)
        return 0.5 * x @ self.A @ x + self.b @ x


def spd(seed: int) -> torch.Tensor:
    """Random SPD matrix with a spectral gap: top eigenvalue 10, the rest uniform in [0.1, 7]."""
    rest = 0.1 + 6.9 * torch.rand(DIM - 1, generator=gen(seed), dtype=torch.float64)
    return matrix_with_spectrum(torch.cat([rest, torch.tensor([10.0], dtype=torch.float64)]), seed)


def indefinite(seed: int, top: float, bottom: float) -> torch.Tensor:
    """Symmetric with eigenvalues ``top``, ``bottom`` and the rest uniform in [0.7·bottom, 0.7·top]."""
    rest = 0.7 * bottom + 0.7 * (top - bottom) * torch.rand(DIM - 2, generator=gen(seed), dtype=torch.float64)
    eigs = torch.cat([rest, torch.tensor([top, bottom], dtype=torch.float64)])
    return matrix_with_spectrum(eigs, seed)


# --- small MLPs with an explicit Hessian ---------------------------------------------------------------


class MLP:
    """2-layer tanh MLP in float64 (weights and biases: four parameter tensors) on a fixed batch."""

    def __init__(self, seed: int, din: int = 6, hidden: int = 16, dout: int = 2, n: int = 64, loss: str = "mse"):
        g = gen(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(din, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dout)
        ).double()
        with torch.no_grad():
            for p in self.model.parameters():
                p.normal_(0.0, 1.0, generator=g)
        self.x = torch.randn(n, din, generator=g, dtype=torch.float64)
        if loss == "mse":
            self.y = torch.randn(n, dout, generator=g, dtype=torch.float64)
            self.criterion = torch.nn.functional.mse_loss
        else:
            self.y = torch.randint(0, dout, (n,), generator=g)
            self.criterion = torch.nn.functional.cross_entropy
        self.params = list(self.model.parameters())
        self.names = [name for name, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.params]

    def loss(self, x=None, y=None) -> torch.Tensor:
        x = self.x if x is None else x
        y = self.y if y is None else y
        return self.criterion(self.model(x), y)

    def explicit_hessian(self) -> torch.Tensor:
        def f(theta):
            named = dict(zip(self.names, split(theta, self.shapes)))
            return self.criterion(torch.func.functional_call(self.model, named, (self.x,)), self.y)

        return torch.func.hessian(f)(flat([p.detach() for p in self.params]))

    def sgd_step(self, lr: float) -> None:
        grads = torch.autograd.grad(self.loss(), self.params)
        with torch.no_grad():
            torch._foreach_add_(self.params, grads, alpha=-lr)


def dominant(eigs: torch.Tensor) -> float:
    return float(eigs[eigs.abs().argmax()])


# --- hvp ---------------------------------------------------------------------------------------------


def test_hvp_equals_explicit_hessian_times_vector():
    mlp = MLP(0)
    H = mlp.explicit_hessian()
    v = tensors.random_like([p.detach() for p in mlp.params], generator=gen(1))
    loss, hv = hvp(mlp.loss, mlp.params, v)
    torch.testing.assert_close(flat(hv), H @ flat(v), rtol=1e-10, atol=1e-12)
    assert float(loss) == pytest.approx(float(mlp.loss().detach()))
    assert not loss.requires_grad and all(not h.requires_grad for h in hv)
    assert [h.shape for h in hv] == mlp.shapes


def test_hvp_on_quadratic_is_A_v_and_works_under_no_grad():
    q = Quadratic(spd(0))
    v = split(torch.randn(DIM, generator=gen(3), dtype=torch.float64))
    with torch.no_grad():
        _, hv = hvp(q.loss, q.params, v)
    torch.testing.assert_close(flat(hv), q.A @ flat(v), rtol=1e-12, atol=1e-12)


def test_hvp_blocks_of_unused_and_linear_parameters_are_zero():
    q = Quadratic(spd(0))
    linear = torch.randn(4, dtype=torch.float64, requires_grad=True)  # enters linearly: constant gradient
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)  # not in the loss at all
    params = [*q.params, linear, unused]
    v = tensors.random_like([p.detach() for p in params], generator=gen(4))
    _, hv = hvp(lambda: q.loss() + linear.sum(), params, v)
    torch.testing.assert_close(flat(hv[: len(SHAPES)]), q.A @ flat(v[: len(SHAPES)]))
    assert torch.count_nonzero(hv[-2]) == 0 and torch.count_nonzero(hv[-1]) == 0


def test_hvp_and_power_iteration_leave_grad_untouched():
    mlp = MLP(1)
    sentinels = [torch.full_like(p, 7.0) for p in mlp.params]
    for p, s in zip(mlp.params, sentinels):
        p.grad = s
    v = tensors.random_like([p.detach() for p in mlp.params], generator=gen(0))
    hvp(mlp.loss, mlp.params, v)
    top_eigenvalue(mlp.loss, mlp.params, iters=5, generator=gen(0))
    top_eigenvalue(mlp.loss, mlp.params, iters=5, generator=gen(0), reuse_graph=True)
    Sharpness(mlp.params, iters_per_call=2)(mlp.loss)
    for p, s in zip(mlp.params, sentinels):
        assert p.grad is s and bool((s == 7.0).all())
    mlp2 = MLP(2)
    top_eigenvalue(mlp2.loss, mlp2.params, iters=3, generator=gen(0))
    assert all(p.grad is None for p in mlp2.params)


def test_hvp_leaves_no_graph_alive():
    """A tensor saved for backward inside loss_fn dies with the call: no graph outlives ``hvp``."""
    mlp = MLP(0)
    saved = []

    def loss_fn():
        hidden = torch.tanh(mlp.x @ mlp.params[0].T + mlp.params[1])  # saved by tanh's backward
        saved.append(weakref.ref(hidden))
        out = hidden @ mlp.params[2].T + mlp.params[3]
        return ((out - mlp.y) ** 2).mean()

    v = tensors.random_like([p.detach() for p in mlp.params], generator=gen(0))
    loss, hv = hvp(loss_fn, mlp.params, v)
    power_iteration(loss_fn, mlp.params, iters=3, generator=gen(0), reuse_graph=True)  # one loss_fn call
    power_iteration(loss_fn, mlp.params, iters=3, generator=gen(0))  # three
    gc.collect()
    assert len(saved) == 5 and all(ref() is None for ref in saved)


# --- top_eigenvalue against the explicit spectrum ------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_eigenvalue_of_random_spd_quadratic(seed):
    q = Quadratic(spd(seed), seed)
    eigs, vecs = torch.linalg.eigh(q.A)
    lam, v = top_eigenvalue(q.loss, q.params, generator=gen(seed))
    assert lam == pytest.approx(float(eigs[-1]), rel=1e-3)
    assert abs(cos(v, split(vecs[:, -1]))) > 0.999
    assert tensors.norm(v).item() == pytest.approx(1.0, abs=1e-12)
    assert isinstance(lam, float) and [t.shape for t in v] == [torch.Size(s) for s in SHAPES]


@pytest.mark.parametrize("seed", [0, 1])
def test_top_eigenvalue_of_indefinite_quadratic_with_positive_dominant(seed):
    q = Quadratic(indefinite(seed, top=10.0, bottom=-6.0), seed)
    eigs, vecs = torch.linalg.eigh(q.A)
    assert eigs[0] < 0 < eigs[-1]
    lam, v = top_eigenvalue(q.loss, q.params, generator=gen(seed))
    assert lam == pytest.approx(float(eigs[-1]), rel=1e-3)
    assert abs(cos(v, split(vecs[:, -1]))) > 0.999


def test_negative_dominant_eigenvalue_is_returned_and_shift_recovers_the_top_one():
    q = Quadratic(indefinite(3, top=4.0, bottom=-10.0), 3)
    eigs = torch.linalg.eigvalsh(q.A)
    lam_min, _ = top_eigenvalue(q.loss, q.params, generator=gen(0))
    assert lam_min == pytest.approx(float(eigs[0]), rel=1e-3)  # largest magnitude, negative
    lam_max, _ = top_eigenvalue(q.loss, q.params, generator=gen(0), shift=lam_min, iters=500)
    assert lam_max == pytest.approx(float(eigs[-1]), rel=1e-3)


def test_eigenvalue_is_exact_rayleigh_quotient_at_an_exact_eigenvector():
    q = Quadratic(spd(4), 4)
    eigs, vecs = torch.linalg.eigh(q.A)
    result = power_iteration(q.loss, q.params, v0=split(3.0 * vecs[:, -1]))  # normalised internally
    assert result.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-12)
    assert result.converged and result.hvps == 2 and result.residual < 1e-5


def test_zero_hessian_returns_zero_after_one_hvp():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, dtype=torch.float64)
    result = power_iteration(lambda: c @ x, [x], generator=gen(0))
    assert result.eigenvalue == 0.0 and result.converged and result.hvps == 1


@pytest.mark.parametrize("seed,loss", [(0, "mse"), (1, "mse"), (2, "mse"), (3, "ce")])
def test_top_eigenvalue_of_mlp_matches_explicit_hessian(seed, loss):
    mlp = MLP(seed, loss=loss)
    eigs, vecs = torch.linalg.eigh(mlp.explicit_hessian())
    assert dominant(eigs) == float(eigs[-1]) > 0  # these networks' dominant curvature is positive
    result = power_iteration(mlp.loss, mlp.params, generator=gen(seed), iters=300)
    assert result.converged
    assert result.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-3)
    # the same answer when the gradient graph is built once and reused for every HVP
    lam_reused, _ = top_eigenvalue(mlp.loss, mlp.params, generator=gen(seed), iters=300, reuse_graph=True)
    assert lam_reused == pytest.approx(result.eigenvalue, rel=1e-12)
    # tight tolerance: the eigenvector too
    tight = power_iteration(mlp.loss, mlp.params, generator=gen(seed), iters=2000, tol=1e-12, reuse_graph=True)
    assert tight.eigenvalue == pytest.approx(float(eigs[-1]), rel=1e-8)
    assert abs(cos(tight.eigenvector, split(vecs[:, -1], mlp.shapes))) > 0.999


def test_float32_mlp_is_within_1e3_of_its_float64_hessian():
    mlp = MLP(0)
    eigs = torch.linalg.eigvalsh(mlp.explicit_hessian())
    mlp.model.float()
    mlp.x, mlp.y = mlp.x.float(), mlp.y.float()
    lam, v = top_eigenvalue(mlp.loss, mlp.params, generator=gen(0))
    assert v[0].dtype == torch.float32
    assert lam == pytest.approx(float(eigs[-1]), rel=1e-3)


def test_reduce_receives_float64_partials_once_per_hvp():
    q = Quadratic(spd(0))
    seen = []

    def reduce(partials):
        seen.append((partials.dtype, partials.shape))
        return partials

    result = power_iteration(q.loss, q.params, generator=gen(0), reduce=reduce)
    assert len(seen) == result.hvps + 1  # + the start vector's norm
    assert seen[0] == (torch.float64, (1,)) and set(seen[1:]) == {(torch.float64, (2,))}
    assert result.eigenvalue == pytest.approx(top_eigenvalue(q.loss, q.params, generator=gen(0))[0], rel=1e-15)


def test_hv_mean_is_applied_to_every_hvp_before_the_reductions():
    """``hv_mean`` (an all-reduce mean over data-parallel ranks) sees each local ``H v`` once and its
    output is what the iteration uses: a hook returning ``2·Hv`` (the mean of ``H v`` and ``3 H v``)
    makes the iteration find ``2λ_max``, with the same vector."""
    q = Quadratic(spd(1), 1)
    exact = float(torch.linalg.eigvalsh(q.A)[-1])
    calls = []

    def hv_mean(hv):
        calls.append([t.shape for t in hv])
        return tensors.scale(tensors.add_scaled(hv, hv, 3.0), 0.5)

    result = power_iteration(q.loss, q.params, generator=gen(0), hv_mean=hv_mean)
    assert len(calls) == result.hvps and calls[0] == [torch.Size(s) for s in SHAPES]
    assert result.eigenvalue == pytest.approx(2 * exact, rel=1e-3)
    tracker = Sharpness(q.params, iters_per_call=100, tol=1e-4, generator=gen(0), hv_mean=hv_mean)
    assert tracker(q.loss) == pytest.approx(2 * exact, rel=1e-3)
    assert len(calls) == result.hvps + tracker.hvps


def test_top_eigenvalue_unpacks_to_two_items_and_power_iteration_counts_hvps():
    q = Quadratic(spd(1), 1)
    out = top_eigenvalue(q.loss, q.params, generator=gen(0))
    assert len(out) == 2
    result = power_iteration(q.loss, q.params, generator=gen(0))
    assert isinstance(result, EigenResult) and result.converged and 2 <= result.hvps <= 100
    assert result.eigenvalue == out[0]
    capped = power_iteration(q.loss, q.params, generator=gen(0), iters=3)
    assert capped.hvps == 3 and not capped.converged
    fixed = power_iteration(q.loss, q.params, generator=gen(0), iters=7, tol=None)
    assert fixed.hvps == 7 and not fixed.converged


# --- warm start ---------------------------------------------------------------------------------------


def test_warm_start_needs_fewer_hvps_on_a_drifting_quadratic():
    """``A_t = A + t·εB``: each point's eigenvalue to tol 1e-4, cold (random start) vs warm (v0 = the
    previous point's eigenvector, and the ``Sharpness`` tracker that keeps it)."""
    A = spd(5)
    B = matrix_with_spectrum(torch.linspace(-1, 1, DIM, dtype=torch.float64), 6)
    q = Quadratic(A, 5)
    tracker = Sharpness(q.params, iters_per_call=100, tol=1e-4, generator=gen(0))
    cold_hvps, warm_hvps, tracked_hvps, v = [], [], [], None
    for t in range(8):
        q.A = A + t * 0.02 * B
        exact = float(torch.linalg.eigvalsh(q.A)[-1])
        cold = power_iteration(q.loss, q.params, generator=gen(t))
        warm = power_iteration(q.loss, q.params, v0=v)
        before = tracker.hvps
        assert tracker(q.loss) == pytest.approx(exact, rel=1e-3)
        assert cold.eigenvalue == pytest.approx(exact, rel=1e-3)
        assert warm.eigenvalue == pytest.approx(exact, rel=1e-3)
        if t > 0:
            cold_hvps.append(cold.hvps)
            warm_hvps.append(warm.hvps)
            tracked_hvps.append(tracker.hvps - before)
        v = warm.eigenvector
    assert sum(warm_hvps) < 0.5 * sum(cold_hvps)
    assert sum(tracked_hvps) < 0.5 * sum(cold_hvps)


def test_warm_tracker_needs_fewer_hvps_while_an_mlp_trains():
    mlp = MLP(0)  # three SGD steps between probes change λ_max by well under 1 %
    tracker = Sharpness(mlp.params, iters_per_call=100, tol=1e-4, generator=gen(0))
    tracker(mlp.loss)
    cold_hvps, warm_hvps = [], []
    for probe in range(6):
        for _ in range(3):
            mlp.sgd_step(lr=0.02)
        exact = float(torch.linalg.eigvalsh(mlp.explicit_hessian())[-1])
        before = tracker.hvps
        assert tracker(mlp.loss) == pytest.approx(exact, rel=1e-3)
        warm_hvps.append(tracker.hvps - before)
        cold = power_iteration(mlp.loss, mlp.params, generator=gen(probe))
        assert cold.eigenvalue == pytest.approx(exact, rel=1e-3)
        cold_hvps.append(cold.hvps)
    assert sum(warm_hvps) < 0.3 * sum(cold_hvps)


def test_one_iteration_per_call_tracks_the_top_eigenvalue_of_a_training_mlp():
    """MoXCo A.2.1 trick 2: one HVP per probe, warm started, follows λ_max while the model moves."""
    mlp = MLP(1)
    tracker = Sharpness(mlp.params, iters_per_call=1, cold_iters=100, tol=1e-4, generator=gen(0))
    tracker(mlp.loss)
    errors = []
    for probe in range(30):
        mlp.sgd_step(lr=0.02)
        estimate = tracker(mlp.loss)
        assert tracker.last.hvps == 1
        if probe >= 20:
            exact = float(torch.linalg.eigvalsh(mlp.explicit_hessian())[-1])
            errors.append(abs(estimate - exact) / exact)
    assert max(errors) < 1e-2


# --- stochastic HVPs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_stochastic_hvps_converge_near_the_full_batch_eigenvalue(seed):
    """MoXCo A.2.1 trick 1: every HVP on a fresh random minibatch (256 of 1024 samples).

    The iteration is then the noisy power method (Hardt & Price 2014): each estimate is
    ``vᵀH_b v`` for a random minibatch Hessian ``H_b``, which scatters around ``vᵀHv`` with the
    minibatch noise ``s``, and the iterate itself jitters around the top eigenvector, biasing the
    estimate down by an amount of the same order. We measure ``s`` in the test, as the standard
    deviation of ``uᵀH_b u / λ`` over minibatches at the exact top eigenvector ``u``, and require
    both the mean of the last 40 estimates and the full-batch Rayleigh quotient of the final
    vector to be within ``2s`` of ``λ`` (``s`` ≈ 3 % here, so within about 6 %; a random unit vector
    sits at roughly the mean eigenvalue, far below ``λ``).
    """
    mlp = MLP(seed, n=1024)
    eigs, vecs = torch.linalg.eigh(mlp.explicit_hessian())
    lam = float(eigs[-1])
    batches = gen(seed + 10)

    def minibatch_loss():
        idx = torch.randperm(1024, generator=batches)[:256]
        return mlp.loss(mlp.x[idx], mlp.y[idx])

    u = split(vecs[:, -1], mlp.shapes)
    quotients = [float(tensors.dot(u, hvp(minibatch_loss, mlp.params, u)[1])) / lam for _ in range(40)]
    s = statistics.stdev(quotients)
    assert 0.005 < s < 0.05

    tracker = Sharpness(mlp.params, iters_per_call=1, generator=gen(seed))
    estimates = [tracker(minibatch_loss) for _ in range(80)]
    assert abs(statistics.mean(estimates[-40:]) / lam - 1) < 2 * s
    v = tracker.eigenvector
    full_batch_quotient = float(tensors.dot(v, hvp(mlp.loss, mlp.params, v)[1]))
    assert abs(full_batch_quotient / lam - 1) < 2 * s
    # the tolerance discriminates: a random unit vector's Rayleigh quotient is far outside it
    r = tensors.normalized(tensors.random_like(v, gen(0)))
    assert float(tensors.dot(r, hvp(mlp.loss, mlp.params, r)[1])) / lam < 1 - 4 * s


# --- validation, NaN, state ---------------------------------------------------------------------------


def test_v0_and_argument_validation():
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
    with pytest.raises(ValueError, match="tol must be .* got nan"):
        top_eigenvalue(q.loss, q.params, tol=math.nan)
    with pytest.raises(ValueError, match="shift must be a finite number, got inf"):
        top_eigenvalue(q.loss, q.params, shift=math.inf)
    with pytest.raises(ValueError, match="params is empty"):
        top_eigenvalue(q.loss, [])
    with pytest.raises(ValueError, match=r"params\[0\] .* does not require grad"):
        top_eigenvalue(q.loss, [p.detach() for p in q.params])
    with pytest.raises(ValueError, match="scalar tensor, got \\(2,\\)"):
        top_eigenvalue(lambda: torch.stack([q.loss(), q.loss()]), q.params)
    with pytest.raises(ValueError, match="iters_per_call must be an integer ≥ 1, got 0"):
        Sharpness(q.params, iters_per_call=0)
    with pytest.raises(ValueError, match="cold_iters must be an integer ≥ 1, got -1"):
        Sharpness(q.params, cold_iters=-1)
    # a valid v0 in another dtype is converted to the parameters' dtype
    lam, v = top_eigenvalue(q.loss, q.params, v0=[t.float() for t in good])
    assert v[0].dtype == torch.float64 and lam == pytest.approx(float(torch.linalg.eigvalsh(q.A)[-1]), rel=1e-3)


def test_nan_gives_nan_and_the_tracker_recovers():
    mlp = MLP(0)
    tracker = Sharpness(mlp.params, iters_per_call=3, generator=gen(0))
    assert math.isnan(tracker.eigenvalue) and tracker.eigenvector is None
    first = tracker(mlp.loss)
    assert math.isfinite(first) and tracker.eigenvector is not None
    saved = mlp.params[0].detach().clone()
    with torch.no_grad():
        mlp.params[0][0, 0] = math.nan
    result = power_iteration(mlp.loss, mlp.params, generator=gen(0))
    assert math.isnan(result.eigenvalue) and not result.converged and result.hvps == 1
    assert math.isnan(tracker(mlp.loss))
    assert tracker.eigenvector is None and tracker.last.hvps == 1  # stopped at the first NaN, vector dropped
    with torch.no_grad():
        mlp.params[0].copy_(saved)
    recovered = tracker(mlp.loss)  # a fresh random start, three iterations
    assert math.isfinite(recovered) and recovered > 0
    assert tracker.calls == 3 and tracker.hvps == 3 + 1 + 3
    # an infinite loss is treated like NaN
    assert math.isnan(tracker(lambda: mlp.loss() * math.inf))


def test_state_dict_round_trip_resumes_identically():
    mlp = MLP(2)
    a = Sharpness(mlp.params, iters_per_call=2, generator=gen(0))
    for _ in range(3):
        a(mlp.loss)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = Sharpness(mlp.params, iters_per_call=2, generator=gen(99))
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert (b.eigenvalue, b.hvps, b.calls) == (a.eigenvalue, a.hvps, a.calls)
    mlp.sgd_step(lr=0.01)
    assert b(mlp.loss) == a(mlp.loss)
    assert all(torch.equal(x, y) for x, y in zip(a.eigenvector, b.eigenvector))

    empty = Sharpness(mlp.params)
    c = Sharpness(mlp.params)
    c.load_state_dict(empty.state_dict())
    assert c.eigenvector is None and math.isnan(c.eigenvalue)
    state = a.state_dict()
    state["eigenvector"] = state["eigenvector"][:-1]
    with pytest.raises(ValueError, match="has 3 tensors but params has 4"):
        c.load_state_dict(state)
    with pytest.raises(KeyError, match="hvps"):
        c.load_state_dict({"eigenvector": None, "eigenvalue": 1.0, "calls": 0})


def test_reset_restarts_cold_and_keeps_the_cost_counters():
    q = Quadratic(spd(2), 2)
    tracker = Sharpness(q.params, iters_per_call=1, cold_iters=100, tol=1e-4, generator=gen(0))
    exact = float(torch.linalg.eigvalsh(q.A)[-1])
    assert tracker(q.loss) == pytest.approx(exact, rel=1e-3)
    cold = tracker.hvps
    assert cold > 2
    assert tracker.step(q.loss) == pytest.approx(exact, rel=1e-3) and tracker.hvps == cold + 1
    tracker.reset()
    assert tracker.eigenvector is None and math.isnan(tracker.eigenvalue) and tracker.hvps == cold + 1
    assert tracker(q.loss) == pytest.approx(exact, rel=1e-3) and tracker.hvps > cold + 2
    assert "Sharpness(eigenvalue=" in repr(tracker)
