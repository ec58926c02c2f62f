"""SAM (Foret et al. 2021) and its adaptive variant around a black-box base: hand-computed steps."""

from __future__ import annotations

import copy

import pytest
import torch

from moxco.optim import SAM

DT = torch.float64


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(8, 3, generator=g, dtype=DT)
    y = torch.randn(8, generator=g, dtype=DT)
    w0 = torch.randn(3, generator=g, dtype=DT)
    b0 = torch.randn(1, generator=g, dtype=DT)
    return (lambda w, b: ((torch.tanh(X @ w) + b - y) ** 2).mean()), w0, b0


def run_sam(steps, seed=0, **kwargs):
    loss_fn, w0, b0 = problem(seed)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = SAM([w, b], **kwargs)

    def closure():
        opt.zero_grad()
        loss = loss_fn(w, b)
        loss.backward()
        return loss

    for _ in range(steps):
        closure()
        opt.step(closure)
    return opt, [w.detach().clone(), b.detach().clone()]


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_the_perturb_then_descend_recipe(adaptive):
    loss_fn, w0, b0 = problem(1)
    lr, rho = 0.1, 0.07
    _, got = run_sam(6, seed=1, base=torch.optim.SGD, lr=lr, rho=rho, adaptive=adaptive)
    x = [w0.clone(), b0.clone()]
    for _ in range(6):
        xs = [t.clone().requires_grad_(True) for t in x]
        g = torch.autograd.grad(loss_fn(*xs), xs)
        scaled = [gi * xi.abs() if adaptive else gi for gi, xi in zip(g, x)]
        norm = torch.sqrt(sum((s ** 2).sum() for s in scaled))
        e = [(gi * xi ** 2 if adaptive else gi) * rho / (norm + 1e-12) for gi, xi in zip(g, x)]
        xp = [(xi + ei).requires_grad_(True) for xi, ei in zip(x, e)]
        g_sam = torch.autograd.grad(loss_fn(*xp), xp)
        x = [xi - lr * gi for xi, gi in zip(x, g_sam)]
    for a, b in zip(x, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_rho_zero_is_exactly_the_base():
    loss_fn, w0, b0 = problem(2)
    _, got = run_sam(8, seed=2, base=torch.optim.Adam, lr=0.01, rho=0.0)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    ref = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(8):
        ref.zero_grad()
        loss_fn(w, b).backward()
        ref.step()
    assert torch.equal(got[0], w.detach()) and torch.equal(got[1], b.detach())


def test_two_halves_api_and_state_dict_round_trip():
    loss_fn, w0, b0 = problem(3)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = SAM([w, b], torch.optim.Adam, rho=0.05, lr=0.01, betas=(0.9, 0.99))

    def two_halves(o, params, n):
        for _ in range(n):
            o.zero_grad()
            loss_fn(*params).backward()
            o.first_step(zero_grad=True)
            loss_fn(*params).backward()
            o.second_step(zero_grad=True)

    two_halves(opt, [w, b], 4)
    saved = copy.deepcopy(opt.state_dict())
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    two_halves(opt, [w, b], 4)
    opt2 = SAM([w2, b2], torch.optim.Adam, rho=0.05, lr=0.5, betas=(0.9, 0.99))
    opt2.load_state_dict(saved)
    two_halves(opt2, [w2, b2], 4)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    hp = opt2.hyperparameters()
    assert hp == {"optimizer": "SAM", "base": "Adam", "lr": 0.01, "rho": 0.05, "adaptive": False}


def test_step_without_closure_and_bad_rho_are_rejected():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="rho"):
        SAM([p], torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="lr is required"):
        SAM([p], torch.optim.SGD)
    opt = SAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
