"""Adam+CM, Adam+CG, SGD+CM, SGD+CG (Adam+CM paper eq. 3-8, 10, Algorithm 1): hand-computed steps
against a plain reference of the priority buffer, buffer statistics (fig. 8), checkpoints."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from moxco.optim import SAM, AdamCG, AdamCM, SGDCG, SGDCM
from moxco.optim.critical import buffer_statistics, priority_insert_

DT = torch.float64


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randn(10, generator=g, dtype=DT)
    w0 = torch.randn(3, generator=g, dtype=DT)
    b0 = torch.randn(1, generator=g, dtype=DT)

    def loss_fn(w, b):
        return ((torch.cos(X @ w) * 2 + b - y) ** 2).mean()

    return loss_fn, w0, b0


class ReferenceBuffer:
    """The buffer of Algorithm 1 as the paper states it: a dict priority → entry."""

    def __init__(self, capacity, decay):
        self.capacity, self.decay, self.items = capacity, decay, []  # [priority, entry]

    def mean(self, like):
        total = [torch.zeros_like(t) for t in like]
        for _, entry in self.items:
            total = [a + b for a, b in zip(total, entry)]
        return [t / self.capacity for t in total]  # eq. 6: 1/C Σ

    def offer(self, key, entry):
        entry = [t.clone() for t in entry]
        if len(self.items) < self.capacity:
            self.items.append([key, entry])
        else:
            i = min(range(len(self.items)), key=lambda j: self.items[j][0])
            if key > self.items[i][0]:
                self.items[i] = [key, entry]
        for item in self.items:
            item[0] *= self.decay


def reference_run(kind, steps, *, lr, capacity, decay, betas=(0.9, 0.99), eps=1e-8, momentum=0.9, seed=0):
    loss_fn, w0, b0 = problem(seed)
    x = [w0.clone(), b0.clone()]
    buf = ReferenceBuffer(capacity, decay)
    m = [torch.zeros_like(t) for t in x]
    v = [torch.zeros_like(t) for t in x]
    b1, b2 = betas
    for t in range(1, steps + 1):
        xs = [a.clone().requires_grad_(True) for a in x]
        g = list(torch.autograd.grad(loss_fn(*xs), xs))
        key = math.sqrt(sum(float((gi ** 2).sum()) for gi in g))
        mean = buf.mean(x)
        if kind == "AdamCM":
            m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]                       # eq. 4
            agg = [mi + ci for mi, ci in zip(m, mean)]                                   # eq. 4, 6
            v = [b2 * vi + (1 - b2) * a * a for vi, a in zip(v, agg)]                    # eq. 5
            buf.offer(key, m)
            x = [xi - lr * (a / (1 - b1 ** t)) / ((vi / (1 - b2 ** t)).sqrt() + eps) for xi, a, vi in zip(x, agg, v)]  # eq. 7
        elif kind == "AdamCG":
            agg = [gi + ci for gi, ci in zip(g, mean)]                                   # eq. 3
            m = [b1 * mi + (1 - b1) * a for mi, a in zip(m, agg)]
            v = [b2 * vi + (1 - b2) * a * a for vi, a in zip(v, agg)]
            buf.offer(key, g)
            x = [xi - lr * (mi / (1 - b1 ** t)) / ((vi / (1 - b2 ** t)).sqrt() + eps) for xi, mi, vi in zip(x, m, v)]
        elif kind == "SGDCM":
            m = [momentum * mi + gi for mi, gi in zip(m, g)]
            agg = [mi + ci for mi, ci in zip(m, mean)]
            buf.offer(key, m)
            x = [xi - lr * a for xi, a in zip(x, agg)]                                   # eq. 8
        elif kind == "SGDCG":
            agg = [gi + ci for gi, ci in zip(g, mean)]
            buf.offer(key, g)
            x = [xi - lr * a for xi, a in zip(x, agg)]                                   # eq. 10
    return x, buf


CLASSES = {"AdamCM": AdamCM, "AdamCG": AdamCG, "SGDCM": SGDCM, "SGDCG": SGDCG}


def run(cls, steps, seed=0, **kwargs):
    loss_fn, w0, b0 = problem(seed)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = cls([w, b], **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(w, b).backward()
        opt.step()
    return opt, [w.detach().clone(), b.detach().clone()]


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_the_papers_equations_step_by_step(name, foreach):
    kwargs = dict(lr=0.05, buffer_capacity=3, buffer_decay=0.6, foreach=foreach)
    if name.startswith("Adam"):
        kwargs["betas"] = (0.9, 0.99)
    for steps in (1, 2, 3, 4, 9, 25):
        opt, got = run(CLASSES[name], steps, **kwargs)
        ref, ref_buf = reference_run(name, steps, lr=0.05, capacity=3, decay=0.6)
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-13)
        # the same entries with the same priorities are in the buffer
        w = opt.param_groups[0]["params"][0]
        prio = opt.state[w]["buffer_priority"]
        ours = sorted(float(p) for p in prio if p > -math.inf)
        assert ours == pytest.approx(sorted(p for p, _ in ref_buf.items), rel=1e-12)
        assert opt.buffer_stats()["buffer_size"] == min(steps, 3)


def test_priority_buffer_fills_then_replaces_only_the_smallest_when_exceeded():
    buf = [torch.zeros(2, 1, dtype=DT)]
    prio = [torch.full((2,), -math.inf, dtype=DT)]

    def offer(key, value):
        priority_insert_(buf, prio, [torch.tensor([value], dtype=DT)], torch.tensor(key, dtype=DT), decay=0.5)
        return sorted(buf[0].flatten().tolist()), prio[0].tolist()

    assert offer(4.0, 1.0) == ([0.0, 1.0], [2.0, -math.inf])
    assert offer(1.0, 2.0) == ([1.0, 2.0], [1.0, 0.5])      # fills the empty slot even with a small key
    assert offer(0.4, 3.0) == ([1.0, 2.0], [0.5, 0.25])     # 0.4 < min 0.5: rejected, still decays
    assert offer(0.3, 4.0) == ([1.0, 4.0], [0.25, pytest.approx(0.15)])    # 0.3 > min 0.25: replaces entry 2.0
    assert offer(math.nan, 5.0)[0] == [1.0, 4.0]           # a NaN gradient norm never enters


def test_buffer_statistics_match_numpy_on_a_known_buffer():
    entries = np.array([[3.0, 0.0, 1.0], [1.0, 1.0, 0.0], [2.0, -1.0, 1.0]])
    capacity = 4
    buf_a = torch.zeros(capacity, 2, dtype=DT)
    buf_b = torch.zeros(capacity, 1, dtype=DT)
    buf_a[:3] = torch.tensor(entries[:, :2])
    buf_b[:3] = torch.tensor(entries[:, 2:])
    prio = torch.tensor([1.0, 2.0, 0.5, -math.inf], dtype=DT)
    stats = buffer_statistics([buf_a, buf_b], prio)
    assert stats["buffer_size"] == 3
    assert stats["buffer_variance"] == pytest.approx(entries.var(axis=0).mean())
    k = int(np.argmax((entries ** 2).sum(axis=1)))
    cos = [entries[k] @ entries[j] / np.linalg.norm(entries[k]) / np.linalg.norm(entries[j]) for j in range(3) if j != k]
    assert stats["buffer_cosine"] == pytest.approx(np.mean(cos))
    single = buffer_statistics([buf_a[:1].clone(), buf_b[:1].clone()], prio[:1].clone())
    assert single["buffer_size"] == 1 and math.isnan(single["buffer_cosine"]) and single["buffer_variance"] == 0.0


def test_cm_buffer_agrees_more_than_cg_buffer_on_a_noisy_problem():
    """Adam+CM fig. 8's reading on a small stochastic least-squares problem: momenta agree (high
    cosine, low variance) where raw gradients in the CG buffer disagree."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 20, generator=g)
    y = X @ torch.randn(20, generator=g) + 0.5 * torch.randn(256, generator=g)
    stats = {}
    for cls in (AdamCM, AdamCG):
        w = torch.nn.Parameter(torch.zeros(20))
        opt = cls([w], lr=0.01, buffer_capacity=5, buffer_decay=0.7)
        gen = torch.Generator().manual_seed(1)
        for _ in range(150):
            idx = torch.randint(0, 256, (8,), generator=gen)
            opt.zero_grad()
            ((X[idx] @ w - y[idx]) ** 2).mean().backward()
            opt.step()
        stats[cls.__name__] = opt.hyperparameters()
    assert stats["AdamCM"]["buffer_cosine"] > stats["AdamCG"]["buffer_cosine"]
    assert stats["AdamCM"]["buffer_variance"] < stats["AdamCG"]["buffer_variance"]


@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_round_trip_mid_run(name):
    loss_fn, w0, b0 = problem(4)
    cls = CLASSES[name]

    def loop(o, params, n):
        for _ in range(n):
            o.zero_grad()
            loss_fn(*params).backward()
            o.step()

    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = cls([w, b], lr=0.02, buffer_capacity=4, buffer_decay=0.8)
    loop(opt, [w, b], 3)  # buffer not yet full
    saved = copy.deepcopy(opt.state_dict())
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    loop(opt, [w, b], 10)
    opt2 = cls([w2, b2], lr=0.5, buffer_capacity=4, buffer_decay=0.8)
    opt2.load_state_dict(saved)
    loop(opt2, [w2, b2], 10)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    assert opt.buffer_stats() == opt2.buffer_stats()


def test_tensor_scope_equals_group_scope_for_a_single_tensor_and_keys_each_tensor_separately():
    for scope_steps in (5, 12):
        outs = []
        for scope in ("group", "tensor"):
            w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=DT))
            opt = AdamCM([w], lr=0.1, buffer_capacity=3, buffer_scope=scope)
            for _ in range(scope_steps):
                opt.zero_grad()
                (w ** 4).sum().backward()
                opt.step()
            outs.append(w.detach().clone())
        assert torch.equal(outs[0], outs[1])
    a, b = torch.nn.Parameter(torch.ones(2, dtype=DT)), torch.nn.Parameter(torch.ones(2, dtype=DT))
    opt = SGDCG([a, b], lr=0.01, buffer_capacity=2, buffer_scope="tensor")
    opt.zero_grad()
    ((a ** 2).sum() + 10 * (b ** 2).sum()).backward()
    opt.step()
    assert float(opt.state[a]["buffer_priority"].max()) != float(opt.state[b]["buffer_priority"].max())


def test_hyperparameters_expose_what_the_agent_records():
    opt, _ = run(AdamCM, 7, lr=0.01, buffer_capacity=5, buffer_decay=0.9)
    hp = opt.hyperparameters()
    assert hp["optimizer"] == "AdamCM" and hp["lr"] == 0.01 and hp["buffer_capacity"] == 5
    assert hp["buffer_decay"] == 0.9 and hp["buffer_size"] == 5 and hp["buffer_kind"] == "momenta"
    assert 0.0 <= hp["buffer_variance"] and -1.0 <= hp["buffer_cosine"] <= 1.0
    fresh = SGDCM([torch.nn.Parameter(torch.zeros(2))]).hyperparameters()
    assert fresh["buffer_size"] == 0 and math.isnan(fresh["buffer_cosine"])


def test_sam_wraps_a_cm_base_as_adam_sam_cm():
    loss_fn, w0, b0 = problem(5)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = SAM([w, b], AdamCM, rho=0.05, lr=0.01, buffer_capacity=3)

    def closure():
        opt.zero_grad()
        loss = loss_fn(w, b)
        loss.backward()
        return loss

    for _ in range(5):
        closure()
        opt.step(closure)
    assert opt.hyperparameters()["base_hyperparameters"]["buffer_size"] == 3


@pytest.mark.parametrize("cls,kwargs,match", [
    (AdamCM, {"buffer_capacity": 0}, "buffer_capacity"),
    (AdamCG, {"buffer_decay": 1.5}, "buffer_decay"),
    (AdamCM, {"buffer_scope": "layer"}, "buffer_scope"),
    (SGDCM, {"momentum": 0.0}, "momentum"),
    (SGDCG, {"lr": -0.1}, "lr"),
    (AdamCM, {"betas": (0.9, 1.0)}, "index 1"),
])
def test_invalid_hyperparameters_name_the_bad_value(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
