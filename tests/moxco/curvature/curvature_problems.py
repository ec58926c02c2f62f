"""Problems with an explicit Hessian for the curvature tests.

Ground truth is always an explicit matrix: the known ``A`` of a quadratic ``½xᵀAx + bᵀx``, or the
Hessian of a small float64 MLP by ``torch.func`` (flattened into one vector for the ground truth
only), diagonalised by ``torch.linalg.eigh``. Vectors under test are lists of several tensors.
"""

from __future__ import annotations

import math

import torch

from moxco import tensors

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


class MLP:
    """2-layer tanh MLP in float64 (weights and biases: four parameter tensors) on a fixed batch.

    ``weight_std=1``: a point whose dominant curvature is positive (λ_max > |λ_min|);
    ``weight_std=2`` with seeds 1 and 2: points where negative curvature dominates (|λ_min| ≈ 2·λ_max
    and 1.3·λ_max), where power iteration returns λ_min."""

    def __init__(self, seed: int, din: int = 6, hidden: int = 16, dout: int = 2, n: int = 64, loss: str = "mse",
                 weight_std: float = 1.0):
        g = gen(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(din, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dout)
        ).double()
        with torch.no_grad():
            for p in self.model.parameters():
                p.normal_(0.0, weight_std, generator=g)
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
            x, y = self.x.to(theta.dtype), self.y.to(theta.dtype) if self.y.is_floating_point() else self.y
            return self.criterion(torch.func.functional_call(self.model, named, (x,)), y)

        theta = flat([p.detach() for p in self.params]).double()
        return torch.func.jacrev(torch.func.jacrev(f))(theta)

    def spectrum(self) -> torch.Tensor:
        return torch.linalg.eigvalsh(self.explicit_hessian())

    def sgd_step(self, lr: float) -> None:
        grads = torch.autograd.grad(self.loss(), self.params)
        with torch.no_grad():
            torch._foreach_add_(self.params, grads, alpha=-lr)

    def to_float32(self) -> "MLP":
        self.model.float()
        self.x = self.x.float()
        if self.y.is_floating_point():
            self.y = self.y.float()
        self.params = list(self.model.parameters())
        return self


def dominant(eigs: torch.Tensor) -> float:
    return float(eigs[eigs.abs().argmax()])
