"""SGD-HD and Adam-HD (Baydin et al. 2018): hand-computed recurrences, reduction to torch SGD/Adam,
foreach vs per-tensor paths, checkpoints, validation."""

from __future__ import annotations

import copy

import pytest
import torch

from moxco.optim import SGDHD, AdamHD

DT = torch.float64


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.randn(12, generator=g, dtype=DT)
    w0 = torch.randn(3, generator=g, dtype=DT)
    b0 = torch.randn((), generator=g, dtype=DT)

    def loss_fn(w, b):
        return ((torch.sin(X @ w) + b - y) ** 2).mean()

    return loss_fn, w0, b0


def train(make_opt, steps=20, seed=0):
    loss_fn, w0, b0 = problem(seed)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = make_opt([w, b])
    lrs = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(w, b).backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    return opt, [w.detach().clone(), b.detach().clone()], lrs


def test_sgdhd_matches_baydin_algorithm_by_hand():
    """α_t = α_{t−1} + β ∇f(θ_{t−1})·∇f(θ_{t−2});  θ_t = θ_{t−1} − α_t ∇f(θ_{t−1})."""
    loss_fn, w0, b0 = problem(1)
    lr, beta = 0.05, 0.02
    _, got, got_lrs = train(lambda p: SGDHD(p, lr=lr, hypergrad_lr=beta), steps=15, seed=1)
    x = [w0.clone(), b0.clone()]
    prev_g = None
    lrs = []
    for _ in range(15):
        xs = [t.clone().requires_grad_(True) for t in x]
        g = torch.autograd.grad(loss_fn(*xs), xs)
        if prev_g is not None:
            lr = lr + beta * sum(float((a * c).sum()) for a, c in zip(g, prev_g))
        x = [t - lr * gi for t, gi in zip(x, g)]
        prev_g = g
        lrs.append(lr)
    for a, b in zip(x, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    assert got_lrs == pytest.approx(lrs, rel=1e-12)
    assert lrs[-1] != 0.05


def test_adamhd_matches_baydin_algorithm_by_hand():
    """u_t = −m̂_t/(√v̂_t+ε);  α_t = α_{t−1} − β ∇f(θ_{t−1})·u_{t−1};  θ_t = θ_{t−1} + α_t u_t."""
    loss_fn, w0, b0 = problem(2)
    lr, beta, (b1, b2), eps = 0.01, 1e-3, (0.9, 0.999), 1e-8
    _, got, got_lrs = train(lambda p: AdamHD(p, lr=lr, hypergrad_lr=beta, betas=(b1, b2), eps=eps), steps=15, seed=2)
    x = [w0.clone(), b0.clone()]
    m = [torch.zeros_like(t) for t in x]
    v = [torch.zeros_like(t) for t in x]
    u_prev = None
    lrs = []
    for t in range(1, 16):
        xs = [a.clone().requires_grad_(True) for a in x]
        g = torch.autograd.grad(loss_fn(*xs), xs)
        if u_prev is not None:
            lr = lr - beta * sum(float((a * c).sum()) for a, c in zip(g, u_prev))
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        u = [-(mi / (1 - b1 ** t)) / ((vi / (1 - b2 ** t)).sqrt() + eps) for mi, vi in zip(m, v)]
        x = [a + lr * ui for a, ui in zip(x, u)]
        u_prev = u
        lrs.append(lr)
    for a, b in zip(x, got):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-13)
    assert got_lrs == pytest.approx(lrs, rel=1e-11)


def test_multiplicative_rule_scales_the_step_size_by_the_cosine_of_consecutive_directions():
    """η_t = η_{t−1}(1 + β cos(g_t, s_{t−1})): scale-free, and positive for β < 1."""
    loss_fn, w0, b0 = problem(4)
    lr, beta = 0.05, 0.5
    _, got, got_lrs = train(lambda p: SGDHD(p, lr=lr, hypergrad_lr=beta, hypergrad_rule="multiplicative"), steps=12, seed=4)
    x = [w0.clone(), b0.clone()]
    prev_g = None
    lrs = []
    for _ in range(12):
        xs = [t.clone().requires_grad_(True) for t in x]
        g = torch.autograd.grad(loss_fn(*xs), xs)
        if prev_g is not None:
            flat, prev = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in prev_g])
            lr = lr * (1 + beta * float(flat @ prev / (flat.norm() * prev.norm())))
        x = [t - lr * gi for t, gi in zip(x, g)]
        prev_g = g
        lrs.append(lr)
    for a, b in zip(x, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    assert got_lrs == pytest.approx(lrs, rel=1e-12)
    assert all(v > 0 for v in got_lrs)
    # a huge additive rate flips the sign of the step size; the multiplicative one cannot
    _, _, additive = train(lambda p: SGDHD(p, lr=0.05, hypergrad_lr=50.0), steps=12, seed=4)
    _, _, multiplicative = train(lambda p: AdamHD(p, lr=0.05, hypergrad_lr=0.9, hypergrad_rule="multiplicative"), steps=12, seed=4)
    assert min(additive) < 0 < min(multiplicative)


@pytest.mark.parametrize("kwargs", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
                                    {"momentum": 0.5, "dampening": 0.3}])
def test_sgdhd_without_hypergradient_is_torch_sgd(kwargs):
    _, ref, _ = train(lambda p: torch.optim.SGD(p, lr=0.05, **kwargs))
    for foreach in (False, True):
        _, got, lrs = train(lambda p: SGDHD(p, lr=0.05, hypergrad_lr=0.0, foreach=foreach, **kwargs))
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15)
        assert set(lrs) == {0.05}


@pytest.mark.parametrize("kwargs", [{}, {"betas": (0.8, 0.99), "weight_decay": 0.05}])
def test_adamhd_without_hypergradient_is_torch_adam(kwargs):
    _, ref, _ = train(lambda p: torch.optim.Adam(p, lr=0.02, **kwargs))
    for foreach in (False, True):
        _, got, _ = train(lambda p: AdamHD(p, lr=0.02, hypergrad_lr=0.0, foreach=foreach, **kwargs))
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls,kwargs", [(SGDHD, {"momentum": 0.9, "nesterov": True}), (AdamHD, {"hypergrad_lr": 1e-3})])
def test_foreach_and_single_tensor_paths_agree(cls, kwargs):
    _, a, la = train(lambda p: cls(p, lr=0.02, foreach=False, **kwargs))
    _, b, lb = train(lambda p: cls(p, lr=0.02, foreach=True, **kwargs))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)
    assert la == pytest.approx(lb, rel=1e-13)


def test_sgdhd_grows_a_too_small_step_size_on_a_quadratic():
    x = torch.nn.Parameter(torch.tensor([3.0, -2.0], dtype=DT))
    opt = SGDHD([x], lr=1e-4, hypergrad_lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        (0.5 * (x ** 2).sum()).backward()
        opt.step()
    assert opt.param_groups[0]["lr"] > 1e-3
    assert opt.hyperparameters()["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("cls,kwargs", [(SGDHD, {"momentum": 0.9}), (AdamHD, {"hypergrad_lr": 1e-3})])
def test_state_dict_round_trip_mid_run(cls, kwargs):
    loss_fn, w0, b0 = problem(3)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = cls([w, b], lr=0.03, **kwargs)

    def loop(o, params, n):
        for _ in range(n):
            o.zero_grad()
            loss_fn(*params).backward()
            o.step()

    loop(opt, [w, b], 6)
    saved = copy.deepcopy(opt.state_dict())
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    loop(opt, [w, b], 6)
    opt2 = cls([w2, b2], lr=1.0, **kwargs)
    opt2.load_state_dict(saved)
    loop(opt2, [w2, b2], 6)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


@pytest.mark.parametrize("cls,kwargs,match", [
    (SGDHD, {"lr": -1.0}, "lr"),
    (SGDHD, {"hypergrad_lr": -1e-3}, "hypergrad_lr"),
    (SGDHD, {"nesterov": True}, "Nesterov"),
    (AdamHD, {"betas": (1.0, 0.9)}, "index 0"),
    (AdamHD, {"eps": -1.0}, "epsilon"),
    (AdamHD, {"hypergrad_rule": "exponential"}, "hypergrad_rule"),
])
def test_invalid_hyperparameters_name_the_bad_value(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
