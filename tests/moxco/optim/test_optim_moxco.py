"""MoXCo wrapper (MoXCo eq. 1-5, Algorithm 1, A.5.3, Theorem 2): exactness against hand-computed
steps, phases, θ access, schedules, checkpoints."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from moxco.goodness import eos_sharpness
from moxco.landscapes import quadratic
from moxco.optim import SGDHD, AdamHD, MoXCo, L1, PHASE_COMMIT, PHASE_EXPLORE
from moxco.optim.moxco_wrapper import alpha_at, moxco_inertial_update

DT = torch.float64


def problem(seed: int = 0):
    """A small non-quadratic loss over two parameter tensors (float64)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(9, 4, generator=g, dtype=DT)
    y = torch.randn(9, 2, generator=g, dtype=DT)
    w0 = torch.randn(4, 2, generator=g, dtype=DT)
    b0 = torch.randn(2, generator=g, dtype=DT)

    def loss_fn(w, b):
        return ((torch.tanh(X @ w + b) - y) ** 2).mean() + 0.1 * (w ** 4).sum()

    return loss_fn, w0, b0


def train(make_opt, steps: int = 25, seed: int = 0):
    loss_fn, w0, b0 = problem(seed)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = make_opt([w, b])
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(w, b).backward()
        opt.step()
    return opt, [w.detach().clone(), b.detach().clone()]


BASES = [
    (torch.optim.SGD, {}),
    (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (torch.optim.Adam, {}),
    (torch.optim.AdamW, {"weight_decay": 0.1, "betas": (0.8, 0.99)}),
    (torch.optim.RMSprop, {"momentum": 0.5}),
]


@pytest.mark.parametrize("base,kwargs", BASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_alpha_beta_zero_with_identity_prox_is_exactly_the_base(base, kwargs):
    _, ref = train(lambda p: base(p, lr=0.02, **kwargs))
    _, got = train(lambda p: MoXCo(p, base, lr=0.02, alpha=0.0, beta=0.0, **kwargs))
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_prebuilt_base_instance_with_alpha_beta_zero_is_exactly_the_base():
    _, ref = train(lambda p: torch.optim.Adam(p, lr=0.03))
    _, got = train(lambda p: MoXCo(p, torch.optim.Adam(p, lr=0.03), alpha=0.0, beta=0.0))
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def hand_inertial(loss_fn, w0, b0, *, lr, alphas, betas, steps, direction):
    """Eq. 1-4 written out: θ_{t+1} = u_t − η Δ_t with Δ_t = direction(∇f(v_t), t)."""
    theta = [w0.clone(), b0.clone()]
    prev = [w0.clone(), b0.clone()]
    history = []
    for t in range(steps):
        a, bt = alphas[t], betas[t]
        u = [th + a * (th - pr) for th, pr in zip(theta, prev)]
        v = [(th + bt * (th - pr)).requires_grad_(True) for th, pr in zip(theta, prev)]
        grads = torch.autograd.grad(loss_fn(*v), v)
        delta = direction(grads, t + 1)
        prev, theta = theta, [ui - lr * d for ui, d in zip(u, delta)]
        history.append((theta, [th + betas[t + 1] * (th - pr) for th, pr in zip(theta, prev)]))
    return history


def test_sgd_base_matches_eq_1_to_3_step_by_step_with_random_beta():
    loss_fn, w0, b0 = problem(1)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = MoXCo([w, b], torch.optim.SGD, lr=0.05, alpha=0.8, beta="random", seed=123)
    steps = 15
    alphas, betas = [], [0.0]
    thetas, points = [], []
    for _ in range(steps):
        alphas.append(opt.current_alpha())
        opt.zero_grad()
        loss_fn(w, b).backward()
        opt.step()
        betas.append(opt.current_beta())
        thetas.append([t.clone() for t in opt.theta_tensors()])
        points.append([w.detach().clone(), b.detach().clone()])
    assert len(set(betas[1:])) == steps and all(0.0 <= x < 1.0 for x in betas[1:])
    assert all(a == 0.8 for a in alphas)
    hand = hand_inertial(loss_fn, w0, b0, lr=0.05, alphas=alphas, betas=betas, steps=steps,
                         direction=lambda g, t: list(g))
    for (h_theta, h_v), theta, v in zip(hand, thetas, points):
        for x, y in zip(h_theta, theta):
            torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)
        for x, y in zip(h_v, v):
            torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)


def test_adam_base_matches_the_papers_adam_wrapping_A53():
    """θ_{t+1} = x_t − γ m̂_t/(√v̂_t + ε), moments of ∇L(y_t), γ = η (MoXCo A.5.3 / eq. 10)."""
    loss_fn, w0, b0 = problem(2)
    lr, alpha, beta, (b1, b2), eps = 0.01, 0.9, 0.4, (0.9, 0.99), 1e-8
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = MoXCo([w, b], torch.optim.Adam, lr=lr, alpha=alpha, beta=beta, betas=(b1, b2), eps=eps)
    steps = 20
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(w, b).backward()
        opt.step()
    m = [torch.zeros_like(w0), torch.zeros_like(b0)]
    v2 = [torch.zeros_like(w0), torch.zeros_like(b0)]

    def adam_direction(grads, t):
        out = []
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v2[i] = b2 * v2[i] + (1 - b2) * g * g
            out.append((m[i] / (1 - b1 ** t)) / ((v2[i] / (1 - b2 ** t)).sqrt() + eps))
        return out

    hand = hand_inertial(loss_fn, w0, b0, lr=lr, alphas=[alpha] * steps, betas=[0.0] + [beta] * steps,
                         steps=steps, direction=adam_direction)
    h_theta, h_v = hand[-1]
    for x, y in zip(h_theta, opt.theta_tensors()):
        torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12)
    for x, y in zip(h_v, [w, b]):
        torch.testing.assert_close(y.detach(), x, rtol=1e-10, atol=1e-12)


def test_increasing_alpha_schedule_and_callable_schedules():
    assert alpha_at("increasing", 1) == pytest.approx(0.5)  # α_0 = 0.5 in MoXCo A.4.5
    assert alpha_at("increasing", 10) == pytest.approx(29 / 31)
    assert alpha_at(lambda t: 1 / (t + 1), 3) == pytest.approx(0.25)
    loss_fn, w0, b0 = problem(3)
    _, got = train(lambda p: MoXCo(p, torch.optim.SGD, lr=0.05, alpha="increasing", beta=lambda t: 0.1 * (t % 3)), steps=6, seed=3)
    alphas = [alpha_at("increasing", t) for t in range(6)]
    betas = [0.0] + [0.1 * (t % 3) for t in range(1, 7)]
    hand = hand_inertial(loss_fn, w0, b0, lr=0.05, alphas=alphas, betas=betas, steps=6, direction=lambda g, t: list(g))
    for x, y in zip(hand[-1][1], got):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.5, 0.0), (0.9, 0.9), (0.6, 0.6), (0.3, 1.0)])
def test_theorem2_moxco_gd_diverges_just_above_and_converges_just_below_the_eos_bound(alpha, beta):
    lr = 0.05
    bound = eos_sharpness(lr, alpha, beta)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(7), dtype=DT))

    def run(top: float):
        eig = torch.tensor([top, 0.5 * bound, 0.1 * bound], dtype=DT)
        f = quadratic(q @ torch.diag(eig) @ q.T, torch.tensor([1.0, -2.0, 0.5], dtype=DT))
        x = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0], dtype=DT))
        opt = MoXCo([x], torch.optim.SGD, lr=lr, alpha=alpha, beta=beta)
        x_star = f.minimiser()
        for t in range(4000):
            opt.zero_grad()
            f(x).backward()
            opt.step()
            if not torch.isfinite(x).all() or x.abs().max() > 1e12:
                break
            if t % 100 == 99 and (opt.theta_tensors()[0] - x_star).abs().max() < 1e-9:
                break
        theta = opt.theta_tensors()[0]
        return (q.T @ (theta - x_star)).abs()  # error along each eigen-direction

    above = run(1.02 * bound)
    below = run(0.98 * bound)
    assert not (above[0] < 1e6), f"expected divergence along the top eigen-direction, got {above}"
    assert below.max() < 1e-6, f"expected convergence below the bound, got {below}"


def test_theta_context_manager_swaps_and_restores_bit_for_bit():
    loss_fn, w0, b0 = problem(4)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = MoXCo([w, b], torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.7)
    with opt.theta():  # before any step: θ_0 = v_0
        assert torch.equal(w, w0)
    for _ in range(5):
        opt.zero_grad()
        loss_fn(w, b).backward()
        opt.step()
    v_before = [w.detach().clone(), b.detach().clone()]
    theta = [t.clone() for t in opt.theta_tensors()]
    assert not torch.equal(v_before[0], theta[0])
    with opt.theta():
        assert torch.equal(w, theta[0]) and torch.equal(b, theta[1])
        loss_at_theta = float(loss_fn(w, b).detach())
    assert torch.equal(w, v_before[0]) and torch.equal(b, v_before[1])
    assert math.isfinite(loss_at_theta)
    # v = θ + β (θ − θ_prev): the model sits at the extrapolated point
    state = opt.state[w]
    torch.testing.assert_close(w.detach(), state["theta"] + 0.7 * state["inertia"], rtol=0, atol=1e-15)


def test_commit_switches_phase_resets_inertia_and_twice_is_a_no_op():
    opt, _ = train(lambda p: MoXCo(p, torch.optim.SGD, lr=0.05, alpha=0.9, beta="random", seed=0), steps=5)
    assert opt.phase == PHASE_EXPLORE and opt.hyperparameters()["phase"] == 1
    w = opt.param_groups[0]["params"][0]
    assert opt.commit(alpha=0.2, beta=0.1, lr=0.01) is True
    assert opt.phase == PHASE_COMMIT and opt.committed_at == 5
    group = opt.param_groups[0]
    assert (group["alpha"], group["beta"], group["lr"]) == (0.2, 0.1, 0.01)
    assert torch.equal(w.detach(), opt.state[w]["theta"])  # restart: θ_{-1} ← θ_t
    assert torch.count_nonzero(opt.state[w]["inertia"]) == 0
    snapshot = copy.deepcopy(opt.state_dict())
    params_before = [p.detach().clone() for p in group["params"]]
    assert opt.commit(alpha=0.5, beta=0.5, lr=1.0) is False
    assert (group["alpha"], group["beta"], group["lr"]) == (0.2, 0.1, 0.01)
    for p, q in zip(group["params"], params_before):
        assert torch.equal(p.detach(), q)
    after = opt.state_dict()
    assert after["moxco"]["phase"] == snapshot["moxco"]["phase"] == 2
    hp = opt.hyperparameters()
    assert hp["phase"] == 2 and hp["alpha"] == 0.2 and hp["beta"] == 0.1 and hp["lr"] == 0.01
    assert hp["eos_sharpness"] == pytest.approx(eos_sharpness(0.01, 0.2, 0.1))


def test_explore_returns_to_phase_one_with_the_given_constants_and_no_hypergradient():
    """``explore`` (a decision's ``phase: 1``): from Phase 2 the phase is 1 again, η stops adapting,
    and the next step is eq. 1-4 with the given α, β, η from ``v_t = θ_t + β m_t``, by hand."""
    loss_fn, _, _ = problem(0)
    opt, _ = train(lambda p: MoXCo(p, torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.5, hypergrad_lr=1e-2, seed=0), steps=5)
    assert opt.explore(alpha=0.4) is False and opt.phase == PHASE_EXPLORE  # in Phase 1: constants only
    assert opt.param_groups[0]["alpha"] == 0.4
    w, b = opt.param_groups[0]["params"]
    opt.commit(alpha=0.1, beta=0.1)
    for _ in range(5):
        opt.zero_grad()
        loss_fn(w, b).backward()
        opt.step()
    adapted = opt.param_groups[0]["lr"]
    assert adapted != 0.05  # the hypergradient moved η in Phase 2
    assert opt.explore(alpha=0.5, beta=0.3) is True
    assert opt.phase == PHASE_EXPLORE and opt.committed_at is None and opt.hyperparameters()["phase"] == 1
    assert opt.param_groups[0]["lr"] == adapted  # η stays where the hypergradient left it
    theta = [opt.state[p]["theta"].clone() for p in (w, b)]
    m = [opt.state[p]["inertia"].clone() for p in (w, b)]
    for p, th, mm in zip((w, b), theta, m):
        torch.testing.assert_close(p.detach(), th + 0.3 * mm, rtol=0, atol=1e-15)  # v_t = θ_t + β m_t
    assert opt.explore(lr=0.02) is False
    opt.zero_grad()
    loss_fn(w, b).backward()
    grads = [w.grad.clone(), b.grad.clone()]
    expected = []
    for th, mm, g in zip(theta, m, grads):
        v = th + 0.3 * mm
        new_theta = v - 0.02 * g + (0.5 - 0.3) * mm  # eq. 3-4 with the identity prox: θ + α m − η g(v)
        expected.append(new_theta + 0.3 * (new_theta - th))
    opt.step()
    for p, e in zip((w, b), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-13)
    assert opt.param_groups[0]["lr"] == 0.02  # no hypergradient step in Phase 1


@pytest.mark.parametrize("base,reference,kwargs,rule", [
    (torch.optim.SGD, SGDHD, {}, "additive"),
    (torch.optim.Adam, AdamHD, {"betas": (0.9, 0.99)}, "additive"),
    (torch.optim.SGD, SGDHD, {}, "multiplicative"),
    (torch.optim.Adam, AdamHD, {"betas": (0.9, 0.99)}, "multiplicative"),
])
def test_phase2_with_zero_momenta_is_hypergradient_descent(base, reference, kwargs, rule):
    """After commit(0, 0) MoXCo adapts η by the hypergradient: with an SGD (Adam) base that is
    exactly SGD-HD (Adam-HD), step sizes included."""
    hg = (1e-2 if base is torch.optim.SGD else 1e-4) if rule == "additive" else 0.3

    def moxco(p):
        opt = MoXCo(p, base, lr=0.02, alpha=0.0, beta=0.0, hypergrad_lr=hg, hypergrad_rule=rule, **kwargs)
        opt.commit(alpha=0.0, beta=0.0)
        return opt

    opt_a, got = train(moxco, steps=30)
    opt_b, ref = train(lambda p: reference(p, lr=0.02, hypergrad_lr=hg, hypergrad_rule=rule, **kwargs), steps=30)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert opt_a.param_groups[0]["lr"] == pytest.approx(opt_b.param_groups[0]["lr"], rel=1e-9)
    assert opt_a.param_groups[0]["lr"] != 0.02


def _loop(opt, params, loss_fn, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(*params).backward()
        opt.step()


@pytest.mark.parametrize("commit_at", [None, 4, 12])
def test_state_dict_round_trip_mid_run_continues_bit_for_bit(commit_at):
    loss_fn, w0, b0 = problem(5)

    def make(params, seed):
        return MoXCo(params, torch.optim.Adam, lr=0.01, alpha="increasing", beta="random", seed=seed,
                     hypergrad_lr=1e-4, prox=L1(0.01))

    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = make([w, b], seed=1)
    for t in range(8):
        if commit_at == t:
            opt.commit()
        _loop(opt, [w, b], loss_fn, 1)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "w": w.detach(), "b": b.detach()}, buf)
    for t in range(8, 20):
        if commit_at == t:
            opt.commit()
        _loop(opt, [w, b], loss_fn, 1)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    w2, b2 = torch.nn.Parameter(saved["w"].clone()), torch.nn.Parameter(saved["b"].clone())
    opt2 = make([w2, b2], seed=999)
    opt2.load_state_dict(saved["opt"])
    assert isinstance(opt2.param_groups[0]["prox"], L1)
    for t in range(8, 20):
        if commit_at == t:
            opt2.commit()
        _loop(opt2, [w2, b2], loss_fn, 1)
    assert torch.equal(w.detach(), w2.detach()) and torch.equal(b.detach(), b2.detach())
    assert opt.hyperparameters() == opt2.hyperparameters()
    for x, y in zip(opt.theta_tensors(), opt2.theta_tensors()):
        assert torch.equal(x, y)


def test_l1_prox_with_zero_momenta_is_proximal_gradient():
    loss_fn, w0, b0 = problem(6)
    lr, lam = 0.1, 0.05
    _, got = train(lambda p: MoXCo(p, torch.optim.SGD, lr=lr, alpha=0.0, beta=0.0, prox=L1(lam)), steps=10, seed=6)
    x = [w0.clone(), b0.clone()]
    for _ in range(10):
        xs = [t.clone().requires_grad_(True) for t in x]
        grads = torch.autograd.grad(loss_fn(*xs), xs)
        y = [t - lr * g for t, g in zip(x, grads)]
        x = [torch.sign(t) * torch.clamp(t.abs() - lr * lam, min=0) for t in y]
    for a, b in zip(x, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    assert (got[0] == 0).any()  # soft-thresholding produces exact zeros


def test_lr_scheduler_and_step_hooks_act_through_the_wrapper():
    loss_fn, w0, b0 = problem(7)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = MoXCo([w, b], torch.optim.SGD, lr=0.1, alpha=0.5, beta=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o.param_groups[0]["lr"]))
    for _ in range(5):
        _loop(opt, [w, b], loss_fn, 1)
        sched.step()
    assert calls == [0.1, 0.1, 0.05, 0.05, 0.025]
    assert opt.base.param_groups[0]["lr"] == 0.025


def test_param_groups_carry_base_options_and_their_own_moxco_settings():
    loss_fn, w0, b0 = problem(8)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = MoXCo([{"params": [w], "weight_decay": 0.5}, {"params": [b], "alpha": 0.0, "beta": 0.0, "lr": 0.3}],
                torch.optim.SGD, lr=0.1, alpha=0.9, beta=0.9)
    assert opt.base.param_groups[0]["weight_decay"] == 0.5 and opt.base.param_groups[1]["weight_decay"] == 0
    assert opt.base.param_groups[1]["lr"] == 0.3 and "alpha" not in opt.base.param_groups[0]
    for _ in range(4):
        b_before = b.detach().clone()
        opt.zero_grad()
        loss_fn(w, b).backward()
        expected_b = b_before.add(b.grad, alpha=-0.3)  # group 1: α = β = 0, plain SGD at lr 0.3
        opt.step()
        assert torch.equal(b.detach(), expected_b)
    assert opt.current_alpha(0) == 0.9 and opt.current_alpha(1) == 0.0
    assert not torch.equal(w.detach(), opt.state[w]["theta"])  # group 0 holds v = θ + 0.9 m


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -0.1}, "lr"),
    ({"lr": 0.1, "alpha": 1.0}, "alpha"),
    ({"lr": 0.1, "alpha": "fast"}, "alpha"),
    ({"lr": 0.1, "beta": -0.5}, "beta"),
    ({"lr": 0.1, "beta": "noisy"}, "beta"),
    ({"lr": 0.1, "hypergrad_lr": -1.0}, "hypergrad_lr"),
    ({"lr": 0.1, "prox": 3}, "prox"),
])
def test_invalid_hyperparameters_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoXCo([torch.nn.Parameter(torch.zeros(2))], torch.optim.SGD, **kwargs)


def test_base_must_be_an_optimizer_over_the_same_parameters_and_lr_is_required_for_classes():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="lr is required"):
        MoXCo([p], torch.optim.SGD)
    with pytest.raises(ValueError, match="same parameters"):
        MoXCo([p], torch.optim.SGD([q], lr=0.1))
    with pytest.raises(TypeError):
        MoXCo([p], "sgd", lr=0.1)
    opt = MoXCo([p], torch.optim.SGD([p], lr=0.25))
    assert opt.param_groups[0]["lr"] == 0.25
    with pytest.raises(ValueError, match="alpha"):
        opt.commit(alpha=1.5)
    assert opt.phase == PHASE_EXPLORE


def test_constructing_without_random_beta_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    MoXCo([torch.nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1, beta=0.5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("foreach", [False, True])
def test_inertial_kernel_foreach_and_single_tensor_paths_agree(foreach):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (5,), ()]
    params = [torch.randn(s, generator=g, dtype=DT) for s in shapes]
    thetas = [torch.randn(s, generator=g, dtype=DT) for s in shapes]
    inertias = [torch.randn(s, generator=g, dtype=DT) for s in shapes]
    ref = [copy.deepcopy(x) for x in (params, thetas, inertias)]
    moxco_inertial_update(params, thetas, inertias, alpha=0.7, beta=0.2, beta_next=0.4, prox=L1(0.1), step=3, lr=0.5,
                          foreach=foreach)
    p_new = [p + 0.5 * m for p, m in zip(ref[0], ref[2])]
    th_new = [torch.sign(x) * torch.clamp(x.abs() - 0.05, min=0) for x in p_new]
    for p, th, m, t_ref, th_old in zip(params, thetas, inertias, th_new, ref[1]):
        torch.testing.assert_close(th, t_ref, rtol=0, atol=1e-15)
        torch.testing.assert_close(m, t_ref - th_old, rtol=0, atol=1e-15)
        torch.testing.assert_close(p, t_ref + 0.4 * (t_ref - th_old), rtol=0, atol=1e-14)


def test_add_param_group_reaches_the_base_and_steps():
    loss_fn, w0, b0 = problem(9)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = MoXCo([w], torch.optim.SGD, lr=0.1, alpha=0.0, beta=0.0, momentum=0.5)
    opt.add_param_group({"params": [b], "lr": 0.2})
    assert len(opt.base.param_groups) == 2 and opt.base.param_groups[1]["lr"] == 0.2
    assert opt.base.param_groups[1]["momentum"] == 0.5
    ref_w, ref_b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    ref = torch.optim.SGD([{"params": [ref_w]}, {"params": [ref_b], "lr": 0.2}], lr=0.1, momentum=0.5)
    for _ in range(5):
        _loop(opt, [w, b], loss_fn, 1)
        _loop(ref, [ref_w, ref_b], loss_fn, 1)
    assert torch.equal(w, ref_w) and torch.equal(b, ref_b)
