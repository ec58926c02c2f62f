"""Prox operators (identity, L1, ProxQuant with λ_t = λ₀·t and the final hard sign quantisation,
MoXCo §4(iv)) and a binarised MLP on scikit-learn's bundled digits."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from moxco.optim import L1, Identity, MoXCo, ProxQuant, hard_quantize_
from moxco.optim.prox import prox_from_spec, prox_to_spec

DT = torch.float64


def test_identity_and_l1_soft_threshold_values():
    x = torch.tensor([-1.0, -0.05, 0.0, 0.02, 0.3], dtype=DT)
    y = x.clone()
    Identity()([y], step=5, lr=1.0)
    assert torch.equal(x, y)
    L1(0.5)([y], step=1, lr=0.2)  # threshold 0.1
    torch.testing.assert_close(y, torch.tensor([-0.9, 0.0, 0.0, 0.0, 0.2], dtype=DT), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="weight"):
        L1(-1.0)


def test_proxquant_moves_toward_the_nearest_level_by_lr_lambda_t_without_crossing():
    pq = ProxQuant(lambda0=0.1, scale=1.0)
    assert pq.strength(7) == pytest.approx(0.7)  # homotopy λ_t = λ₀ · t
    x = torch.tensor([0.2, -0.5, 1.8, -1.05, 0.0], dtype=DT)
    pq([x], step=3, lr=0.5)  # threshold η λ_t = 0.15
    expected = torch.tensor([0.35, -0.65, 1.65, -1.0, 0.15], dtype=DT)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-15)
    # a large enough λ_t snaps everything exactly onto ±s
    pq([x], step=1000, lr=0.5)
    assert set(x.tolist()) == {1.0, -1.0}


def test_hard_quantize_gives_exactly_plus_minus_scale():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g)
    a[0, 0] = 0.0
    b = torch.randn(11, generator=g)
    expected_scale = a.abs().mean()
    scales = hard_quantize_([a, b], "mean_abs")
    assert torch.equal(a.abs().unique(), expected_scale.reshape(1))
    assert a[0, 0] == expected_scale  # sign(0) = +1
    assert b.abs().unique().numel() == 1 and torch.equal(scales[1], b.abs()[0])
    c = torch.randn(4, 4, generator=g)
    ProxQuant(scale=0.25).project_([c])
    assert set(c.flatten().tolist()) <= {0.25, -0.25}
    with pytest.raises(ValueError, match="scale"):
        ProxQuant(scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        hard_quantize_([c], "median")


def test_prox_specs_round_trip_as_plain_data():
    for prox in (Identity(), L1(0.3), ProxQuant(1e-4, "mean_abs"), ProxQuant(0.5, 2.0)):
        spec = prox_to_spec(prox)
        assert isinstance(spec, dict)
        assert prox_from_spec(spec) == prox


def digits_data(seed: int = 0):
    from sklearn.datasets import load_digits  # the dev extra installs scikit-learn

    X, y = load_digits(return_X_y=True)  # bundled with scikit-learn: no download
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:1200], perm[1200:]
    mean, std = X[train].mean(0), X[train].std(0) + 1e-3
    X = (X - mean) / std
    return X[train], y[train], X[test], y[test]


BINARY_MARGIN = 0.05  # binarised accuracy must stay within 5 points of full precision


def test_proxquant_binarised_mlp_on_digits_keeps_accuracy_within_margin():
    """Full-precision MLP 64-64-10, then MoXCo(SGD) + ProxQuant (α_t = (3t−1)/(3t+1), random β,
    homotopy λ_t = λ₀t as in MoXCo A.4.5) on the weight matrices, then the hard projection."""
    torch.manual_seed(0)
    Xtr, ytr, Xte, yte = digits_data(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def accuracy(m):
        with torch.no_grad():
            return float((m(Xte).argmax(1) == yte).float().mean())

    def loss(m):
        return torch.nn.functional.cross_entropy(m(Xtr), ytr)

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss(model).backward()
        opt.step()
    full_precision = accuracy(model)
    assert full_precision > 0.93

    binary = copy.deepcopy(model)
    weights = [binary[0].weight, binary[2].weight]
    biases = [binary[0].bias, binary[2].bias]
    opt = MoXCo([{"params": weights, "prox": ProxQuant(lambda0=0.1, scale="mean_abs")}, {"params": biases}],
                torch.optim.SGD, lr=0.05, alpha="increasing", beta="random", seed=0)
    for _ in range(300):
        opt.zero_grad()
        loss(binary).backward()
        opt.step()
    # checkpoint mid-quantisation survives a weights-only load
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["param_groups"][0]["prox"]["prox"] == "ProxQuant"

    opt.finalize_prox()
    for w in weights:
        levels = w.detach().abs().unique()
        assert levels.numel() == 1  # every weight is exactly ±scale
        assert set(torch.sign(w.detach()).unique().tolist()) <= {-1.0, 1.0}
    for w, theta in zip(weights, opt.theta_tensors()[:2]):
        assert torch.equal(w.detach(), theta)
    binarised = accuracy(binary)
    assert binarised >= full_precision - BINARY_MARGIN, (full_precision, binarised)
