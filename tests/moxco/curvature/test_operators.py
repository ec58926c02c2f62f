"""Curvature operators (moxco.curvature.operators) against explicit Hessians.

The autograd product equals ``H @ v`` of the explicit Hessian to float error; the central finite
difference equals the autograd product within its stated tolerance (float64 1e-8, float32 2e-3
relative, in norm); the preconditioned operator equals ``P^{-1/2} H P^{-1/2} v`` with ``P`` from a
real Adam state, bias correction included.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from curvature_problems import DIM, MLP, SHAPES, Quadratic, flat, gen, spd, split
from moxco import tensors
from moxco.curvature import (
    AutogradHessian, FiniteDifferenceHessian, Preconditioned, adam_preconditioner, extreme_eigenvalues, fd_epsilon,
    fd_hvp, hvp,
)


def rel_err(a, b) -> float:
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


# --- autograd -------------------------------------------------------------------------------------


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
    for product in (hvp, fd_hvp):
        _, hv = product(lambda: q.loss() + linear.sum(), params, v)
        torch.testing.assert_close(flat(hv[: len(SHAPES)]), q.A @ flat(v[: len(SHAPES)]), rtol=1e-6, atol=1e-6)
        assert float(hv[-2].abs().max()) < 1e-6 and float(hv[-1].abs().max()) == 0.0


def test_reused_graph_gives_the_same_products_and_is_freed_on_close():
    mlp = MLP(0)
    saved = []

    def loss_fn():
        hidden = torch.tanh(mlp.x @ mlp.params[0].T + mlp.params[1])  # saved by tanh's backward
        saved.append(weakref.ref(hidden))
        out = hidden @ mlp.params[2].T + mlp.params[3]
        return ((out - mlp.y) ** 2).mean()

    vs = [tensors.random_like([p.detach() for p in mlp.params], generator=gen(i)) for i in range(3)]
    with AutogradHessian(loss_fn, mlp.params, reuse_graph=True) as op:
        reused = [op(v)[1] for v in vs]
        assert len(saved) == 1 and op.hvps == 3
    fresh = [hvp(loss_fn, mlp.params, v)[1] for v in vs]
    gc.collect()
    assert len(saved) == 4 and all(ref() is None for ref in saved)  # no graph outlives the calls
    for a, b in zip(reused, fresh):
        torch.testing.assert_close(flat(a), flat(b), rtol=1e-12, atol=1e-14)


def test_a_graph_kept_by_one_operator_serves_another_without_evaluating_the_loss_again():
    mlp = MLP(1)
    calls = []

    def loss_fn():
        calls.append(1)
        return mlp.loss()

    v, w = (tensors.random_like([p.detach() for p in mlp.params], generator=gen(i)) for i in (5, 6))
    with AutogradHessian(loss_fn, mlp.params, reuse_graph=True) as first:
        assert first.graph is None
        loss, hv = first(v)
        graph = first.graph
    assert first.graph is None and graph is not None  # close() drops the operator's own reference
    with AutogradHessian(loss_fn, mlp.params, graph=graph) as second:
        loss2, hw = second(w)
    assert len(calls) == 1 and float(loss2) == float(loss)
    h = mlp.explicit_hessian()
    torch.testing.assert_close(flat(hw), h @ flat(w), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(hv), h @ flat(v), rtol=1e-10, atol=1e-12)


class _OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_a_once_differentiable_backward_is_refused_not_silently_left_out_of_the_product():
    """Autograd prunes a ``@once_differentiable`` backward's error node when differentiating the
    gradient (nothing differentiable lies behind it), so double backward returned the product of the
    *other* paths without a sign (9 % under λ_max in the agent's test). It is refused now; finite differences
    give the explicit Hessian's product."""
    mlp = MLP(0)
    w1, b1, w2, b2 = mlp.params

    def fused_loss():
        hidden = _OnceDifferentiableTanh.apply(mlp.x @ w1.T + b1)
        return torch.nn.functional.mse_loss(hidden @ w2.T + b2, mlp.y)

    v = tensors.normalized(tensors.random_like([p.detach() for p in mlp.params], generator=gen(3)))
    with pytest.raises(RuntimeError, match="once_differentiable"):
        hvp(fused_loss, mlp.params, v)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        extreme_eigenvalues(fused_loss, mlp.params, iters=5, generator=gen(0))
    _, fd = fd_hvp(fused_loss, mlp.params, v)
    assert float((flat(fd) - mlp.explicit_hessian() @ flat(v)).norm() / flat(fd).norm()) < 1e-8


# --- finite differences ------------------------------------------------------------------------------


def test_fd_epsilon_is_the_cube_root_of_the_unit_roundoff():
    assert fd_epsilon(torch.float64) == pytest.approx(2.0 ** (-52 / 3))
    assert fd_epsilon(torch.float32) == pytest.approx(2.0 ** (-23 / 3))
    assert 4e-3 < fd_epsilon(torch.float32) < 6e-3 and 5e-6 < fd_epsilon(torch.float64) < 7e-6


@pytest.mark.parametrize("seed,weight_std", [(0, 1.0), (1, 2.0), (3, 1.0)])
def test_finite_difference_hvp_equals_autograd_in_float64_within_1e8(seed, weight_std):
    mlp = MLP(seed, weight_std=weight_std)
    for k in range(3):
        v = tensors.normalized(tensors.random_like([p.detach() for p in mlp.params], generator=gen(10 + k)))
        _, exact = hvp(mlp.loss, mlp.params, v)
        _, approx = fd_hvp(mlp.loss, mlp.params, v)
        assert rel_err(approx, exact) < 1e-8  # measured: ≤ 5e-10


@pytest.mark.parametrize("seed,weight_std", [(0, 1.0), (1, 2.0)])
def test_finite_difference_hvp_equals_autograd_in_float32_within_2e3(seed, weight_std):
    mlp = MLP(seed, weight_std=weight_std).to_float32()
    errors = []
    for k in range(3):
        v = tensors.normalized(tensors.random_like([p.detach() for p in mlp.params], generator=gen(10 + k)))
        _, exact = hvp(mlp.loss, mlp.params, v)
        _, approx = fd_hvp(mlp.loss, mlp.params, v)
        assert approx[0].dtype == torch.float32
        errors.append(rel_err(approx, exact))
    assert max(errors) < 2e-3  # measured: ≤ 2.2e-4
    # the tolerance discriminates: a step 100× too large is off by more than it
    v = tensors.normalized(tensors.random_like([p.detach() for p in mlp.params], generator=gen(10)))
    _, exact = hvp(mlp.loss, mlp.params, v)
    _, coarse = fd_hvp(mlp.loss, mlp.params, v, eps=100 * fd_epsilon(torch.float32))
    assert rel_err(coarse, exact) > 2e-3


@pytest.mark.parametrize("length", [1e-4, 1e3])
def test_finite_difference_steps_along_the_unit_direction_whatever_the_vectors_length(length):
    """ε is the step along v/‖v‖: a direction of length 1e3 (a preconditioned or Rademacher vector) or
    1e-4 has the unit direction's accuracy (a step of ε‖v‖ was off by 5e-5 at length 1e3)."""
    mlp = MLP(1, weight_std=2.0)
    v = tensors.scale(tensors.normalized(tensors.random_like([p.detach() for p in mlp.params], generator=gen(7))),
                      length)
    _, exact = hvp(mlp.loss, mlp.params, v)
    _, approx = fd_hvp(mlp.loss, mlp.params, v)
    assert rel_err(approx, exact) < 1e-8
    _, zero = fd_hvp(mlp.loss, mlp.params, [torch.zeros_like(p) for p in mlp.params])
    assert all(float(z.abs().max()) == 0.0 for z in zero)


def test_finite_difference_inside_a_preconditioner_is_explicit_p_inv_sqrt_h_p_inv_sqrt():
    """Late in training Adam's √v̂ + ε is 1e-6…1e-3, so P^{-1/2}v is 100-1000× longer than v: the inner
    finite difference must still step ε along a unit direction."""
    mlp = MLP(1, weight_std=2.0)
    g = gen(9)
    p_diag = [10.0 ** (-6.0 + 3.0 * torch.rand(p.shape, generator=g, dtype=torch.float64)) for p in mlp.params]
    d = flat(p_diag).rsqrt()
    explicit = d[:, None] * mlp.explicit_hessian() * d[None, :]
    v = tensors.normalized(tensors.random_like([p.detach() for p in mlp.params], generator=gen(5)))
    assert float(tensors.norm(list(torch._foreach_mul(v, [t.rsqrt() for t in p_diag])))) > 100.0
    _, mv = Preconditioned(FiniteDifferenceHessian(mlp.loss, mlp.params), p_diag)(v)
    expected = explicit @ flat(v)
    assert float((flat(mv) - expected).norm() / expected.norm()) < 1e-7


def test_finite_difference_with_a_gradient_function_moves_tensors_that_do_not_require_grad():
    """FSDP's local shards do not require grad; with a grad_fn (a replay through the sharded module)
    the operator only moves them, so it must accept them."""
    q = Quadratic(spd(0))
    shards = [p.detach() for p in q.params]  # the same storage, requires_grad False

    def grad_fn():
        loss = q.loss()
        return loss, torch.autograd.grad(loss, q.params)

    v = tensors.normalized(split(torch.randn(DIM, generator=gen(2), dtype=torch.float64)))
    _, hv = FiniteDifferenceHessian(None, shards, grad_fn=grad_fn)(v)
    torch.testing.assert_close(flat(hv), q.A @ flat(v), rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="does not require grad"):
        FiniteDifferenceHessian(q.loss, shards)  # with loss_fn it differentiates by them


def test_finite_difference_restores_parameters_bit_for_bit_and_leaves_grad_alone():
    mlp = MLP(0).to_float32()
    before = [p.detach().clone() for p in mlp.params]
    versions = [p._version for p in mlp.params]
    sentinels = [torch.full_like(p, 7.0) for p in mlp.params]
    for p, s in zip(mlp.params, sentinels):
        p.grad = s
    v = tensors.normalized(tensors.random_like(before, generator=gen(0)))
    fd_hvp(mlp.loss, mlp.params, v)
    assert all(torch.equal(p.detach(), b) for p, b in zip(mlp.params, before))
    assert all(p.grad is s and bool((s == 7.0).all()) for p, s in zip(mlp.params, sentinels))
    assert [p._version for p in mlp.params] == versions

    def failing():  # an exception in the second evaluation still restores θ
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        FiniteDifferenceHessian(None, mlp.params, grad_fn=failing)(v)
    assert all(torch.equal(p.detach(), b) for p, b in zip(mlp.params, before))


def test_finite_difference_accepts_a_gradient_function_and_validates_eps():
    q = Quadratic(spd(0))
    calls = []

    def grad_fn():
        calls.append(1)
        loss = q.loss()
        return loss, torch.autograd.grad(loss, q.params)

    v = tensors.normalized(split(torch.randn(DIM, generator=gen(1), dtype=torch.float64)))
    _, hv = FiniteDifferenceHessian(None, q.params, grad_fn=grad_fn)(v)
    assert len(calls) == 2
    torch.testing.assert_close(flat(hv), q.A @ flat(v), rtol=1e-8, atol=1e-8)  # exact on a quadratic
    for bad in (0.0, -1e-3, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="eps must be"):
            FiniteDifferenceHessian(q.loss, q.params, eps=bad)
    with pytest.raises(ValueError, match="needs loss_fn or grad_fn"):
        FiniteDifferenceHessian(None, q.params)


# --- the Adam preconditioner ----------------------------------------------------------------------------


def adam_trained(mlp: MLP, optimizer_cls=torch.optim.Adam, steps: int = 5, **kwargs):
    opt = optimizer_cls(mlp.params, lr=1e-3, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        mlp.loss().backward()
        opt.step()
    opt.zero_grad()
    return opt


def explicit_adam_p(opt, params, amsgrad=False):
    """``√(v/(1−β₂^t)) + ε`` written out from the optimizer's documented update."""
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    out = []
    for p in params:
        state = opt.state[p]
        v = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
        t = float(state["step"])
        out.append((v / (1 - beta2**t)).sqrt() + eps)
    return out


@pytest.mark.parametrize("cls,kwargs", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.1}),
                                        (torch.optim.Adam, {"amsgrad": True, "eps": 1e-3})])
def test_adam_preconditioner_is_the_optimizers_bias_corrected_denominator(cls, kwargs):
    mlp = MLP(0)
    opt = adam_trained(mlp, cls, steps=4, betas=(0.9, 0.95), **kwargs)
    p_diag = adam_preconditioner(opt, mlp.params)
    expected = explicit_adam_p(opt, mlp.params, amsgrad=kwargs.get("amsgrad", False))
    for a, b in zip(p_diag, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # the step the optimizer takes next divides its bias-corrected momentum by exactly this P
    before = [p.detach().clone() for p in mlp.params]
    mlp.loss().backward()
    if cls is torch.optim.Adam and not kwargs:
        opt.step()
        state = [opt.state[p] for p in mlp.params]
        t = float(state[0]["step"])
        p_next = adam_preconditioner(opt, mlp.params)
        for p, b, s, d in zip(mlp.params, before, state, p_next):
            expected_step = -1e-3 * (s["exp_avg"] / (1 - 0.9**t)) / d
            torch.testing.assert_close(p.detach() - b, expected_step, rtol=1e-6, atol=1e-12)


def test_adam_preconditioner_reads_through_the_moxco_wrapper_and_refuses_non_adam():
    from moxco.optim import MoXCo

    mlp = MLP(0)
    opt = MoXCo(mlp.params, torch.optim.Adam, lr=1e-3, alpha=0.5, beta=0.0)
    with pytest.raises(ValueError, match="no second-moment estimate yet"):
        adam_preconditioner(opt, mlp.params)
    for _ in range(3):
        opt.zero_grad()
        mlp.loss().backward()
        opt.step()
    p_diag = adam_preconditioner(opt, mlp.params)
    for a, b in zip(p_diag, explicit_adam_p(opt.base, mlp.params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    sgd = torch.optim.SGD(mlp.params, lr=0.1)
    with pytest.raises(ValueError, match="not an Adam-family optimizer"):
        adam_preconditioner(sgd, mlp.params)
    stranger = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="not in the optimizer's param_groups"):
        adam_preconditioner(opt, [stranger])


def test_preconditioned_operator_is_explicit_p_inv_sqrt_h_p_inv_sqrt():
    mlp = MLP(1, weight_std=2.0)
    opt = adam_trained(mlp, steps=3)
    p_diag = adam_preconditioner(opt, mlp.params)
    d = flat(p_diag).rsqrt()
    explicit = d[:, None] * mlp.explicit_hessian() * d[None, :]
    v = tensors.random_like([p.detach() for p in mlp.params], generator=gen(5))
    _, mv = Preconditioned(AutogradHessian(mlp.loss, mlp.params), p_diag)(v)
    torch.testing.assert_close(flat(mv), explicit @ flat(v), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="finite and > 0"):
        Preconditioned(AutogradHessian(mlp.loss, mlp.params), [torch.zeros_like(p) for p in mlp.params])


def test_sparse_embedding_products_are_dense_and_equal_the_dense_models():
    torch.manual_seed(0)
    weights = torch.randn(10, 3, dtype=torch.float64)
    idx = torch.tensor([1, 4, 4, 7])
    target = torch.randn(4, 3, dtype=torch.float64)
    results = []
    for sparse in (True, False):
        emb = torch.nn.Embedding(10, 3, sparse=sparse).double()
        with torch.no_grad():
            emb.weight.copy_(weights)
        loss_fn = lambda: (torch.tanh(emb(idx)) - target).pow(2).sum()  # noqa: E731
        v = [torch.randn(10, 3, generator=gen(1), dtype=torch.float64)]
        _, auto = hvp(loss_fn, [emb.weight], v)
        _, fd = fd_hvp(loss_fn, [emb.weight], tensors.normalized(v))
        assert auto[0].layout == torch.strided and fd[0].layout == torch.strided
        results.append(auto[0])
        assert math.isfinite(extreme_eigenvalues(loss_fn, [emb.weight], iters=10, generator=gen(0)).eigenvalue)
    torch.testing.assert_close(results[0], results[1])
