"""Tests for moxco.landscapes: published minima against independent search, batching,
autograd against finite differences, the quadratic's closed forms and sharp_flat's curvatures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from moxco import landscapes as L
from moxco.landscapes import (
    ACKLEY_ROSENBROCK_LOCAL_MIN_POINT,
    ACKLEY_ROSENBROCK_LOCAL_MIN_VALUE,
    ACKLEY_ROSENBROCK_MIN_POINT,
    ACKLEY_ROSENBROCK_MIN_VALUE,
    ACKLEY_ROSENBROCK_PAPER_POINT,
    LANDSCAPES,
    LOG_GOLDSTEIN_PRICE_MIN,
    Landscape,
    ackley,
    ackley_rosenbrock,
    beale,
    get_landscape,
    goldstein_price,
    levy,
    log_goldstein_price,
    quadratic,
    quadratic_minimiser,
    rosenbrock,
    sharp_flat,
    sharp_flat_minima,
)

F64 = torch.float64

# The registry's default instances plus larger / parameterised members of the families.
EXTRA = {
    "ackley_1d": get_landscape("ackley", dim=1),
    "ackley_5d": get_landscape("ackley", dim=5),
    "levy_1d": get_landscape("levy", dim=1),
    "levy_5d": get_landscape("levy", dim=5),
    "rosenbrock_4d": get_landscape("rosenbrock", dim=4),
    "sharp_flat_2d_s2": get_landscape("sharp_flat", dim=2, s=2.0),
    "sharp_flat_3d_s100": get_landscape("sharp_flat", dim=3, s=100.0),
    "sharp_flat_10d_s10": get_landscape("sharp_flat", dim=10, s=10.0),
}
ALL = {**LANDSCAPES, **EXTRA}
ALL_IDS = sorted(ALL)
TWO_D = sorted(k for k, v in LANDSCAPES.items() if v.dim == 2)


def _value_and_grad(fn, z: np.ndarray):
    t = torch.tensor(z, dtype=F64, requires_grad=True)
    v = fn(t)
    (g,) = torch.autograd.grad(v, t)
    return float(v.detach()), g.numpy()


def _local_minimize(fn, start, bounds):
    res = minimize(
        lambda z: _value_and_grad(fn, z),
        np.asarray(start, dtype=np.float64),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 500, "ftol": 1e-14, "gtol": 1e-10},
    )
    return res.x, float(res.fun)


def _spread_starts(points: torch.Tensor, values: torch.Tensor, k: int, min_sep: float):
    """The k lowest points that are pairwise at least min_sep apart."""
    order = torch.argsort(values)
    chosen = []
    for i in order[:5000].tolist():
        p = points[i]
        if all(float((p - q).norm()) >= min_sep for q in chosen):
            chosen.append(p)
            if len(chosen) == k:
                break
    return [c.numpy() for c in chosen]


# ---------------------------------------------------------------------------------------
# registry and published minima
# ---------------------------------------------------------------------------------------


def test_registry_entries_are_consistent():
    expected = {
        "beale",
        "ackley",
        "goldstein_price",
        "log_goldstein_price",
        "log_goldstein_price_unit",
        "levy",
        "ackley_rosenbrock",
        "rosenbrock",
        "sharp_flat",
    }
    assert expected <= set(LANDSCAPES)
    for key, land in ALL.items():
        assert isinstance(land, Landscape)
        assert key in LANDSCAPES or key.startswith(land.name)
        if key in LANDSCAPES:
            assert land.name == key
        assert land.reference
        assert len(land.bounds) == land.dim
        for low, high in land.bounds:
            assert low < high
        assert len(land.global_minima) >= 1
        box = land.bounds_tensor()
        for pts in (land.minima_tensor(), torch.tensor(land.local_minima, dtype=F64).reshape(-1, land.dim)):
            assert pts.shape[-1] == land.dim
            assert bool(((pts >= box[:, 0]) & (pts <= box[:, 1])).all()), key


@pytest.mark.parametrize("key", ALL_IDS)
def test_published_minimum_value(key):
    land = ALL[key]
    values = land(land.minima_tensor())
    torch.testing.assert_close(values, torch.full_like(values, land.global_min_value), atol=1e-6, rtol=0)
    # and below every point a little away from the minimisers (random shell)
    g = torch.Generator().manual_seed(1)
    for p in land.minima_tensor()[:4]:
        shell = p + 1e-3 * torch.nn.functional.normalize(torch.randn(64, land.dim, generator=g, dtype=F64), dim=-1)
        assert bool((land(shell) > land.global_min_value).all())


@pytest.mark.parametrize("key", ALL_IDS)
def test_published_minimum_is_stationary(key):
    land = ALL[key]
    points = land.minima_tensor()[:8]
    if land.local_minima:
        points = torch.cat([points, torch.tensor(land.local_minima, dtype=F64)])
    for p in points:
        g = torch.func.grad(land.fn)(p)
        assert torch.isfinite(g).all()
        assert float(g.norm()) < 1e-6, (key, p, g)
        if land.smooth_at_minimum:
            eig = torch.linalg.eigvalsh(torch.func.hessian(land.fn)(p))
            assert float(eig.min()) > 0, (key, p, eig)  # strict local minimum


def test_known_local_minima_values():
    torch.testing.assert_close(
        goldstein_price(torch.tensor(LANDSCAPES["goldstein_price"].local_minima, dtype=F64)),
        torch.tensor([30.0, 84.0, 840.0], dtype=F64),
    )
    unit = LANDSCAPES["log_goldstein_price_unit"]
    raw = LANDSCAPES["log_goldstein_price"]
    torch.testing.assert_close(
        unit(torch.tensor(unit.local_minima, dtype=F64)), raw(torch.tensor(raw.local_minima, dtype=F64))
    )
    v = ackley_rosenbrock(torch.tensor(ACKLEY_ROSENBROCK_LOCAL_MIN_POINT, dtype=F64))
    assert abs(float(v) - ACKLEY_ROSENBROCK_LOCAL_MIN_VALUE) < 1e-12


# ---------------------------------------------------------------------------------------
# independent search: nothing in the box beats the published minimum, and search finds it
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", TWO_D)
def test_two_d_minimum_survives_grid_and_multistart_search(key):
    land = LANDSCAPES[key]
    box = land.bounds_tensor()
    n = 801
    gx = torch.linspace(float(box[0, 0]), float(box[0, 1]), n, dtype=F64)
    gy = torch.linspace(float(box[1, 0]), float(box[1, 1]), n, dtype=F64)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), dim=-1).reshape(-1, 2)
    values = land(grid)
    f_star = land.global_min_value
    assert float(values.min()) >= f_star - 1e-9

    spacing = float(max(gx[1] - gx[0], gy[1] - gy[0]))
    starts = _spread_starts(grid, values, k=12, min_sep=5 * spacing)
    starts += list(land.sample(12, generator=torch.Generator().manual_seed(0)).numpy())
    bounds = [tuple(b) for b in land.bounds]
    found = [_local_minimize(land.fn, s, bounds) for s in starts]
    best_x, best_f = min(found, key=lambda r: r[1])
    assert min(f for _, f in found) >= f_star - 1e-9
    # the search recovers the published minimiser (up to the kink tolerance for Ackley)
    tol = 1e-6 if land.smooth_at_minimum else 1e-3
    assert best_f <= f_star + tol, (key, best_x, best_f)
    dist = (land.minima_tensor() - torch.tensor(best_x, dtype=F64)).norm(dim=-1).min()
    assert float(dist) < (1e-4 if land.smooth_at_minimum else 1e-3), (key, best_x)


def test_one_d_sharp_flat_minimum_survives_grid_search():
    land = LANDSCAPES["sharp_flat"]
    grid = torch.linspace(-5, 5, 100_001, dtype=F64).unsqueeze(-1)
    values = land(grid)
    assert float(values.min()) >= 0.0
    zeros = grid[values < 1e-8].squeeze(-1)
    assert bool(((zeros.abs() < 1e-3) | ((zeros - 1).abs() < 1e-3)).all())


@pytest.mark.parametrize("key", ["ackley_5d", "levy_5d", "rosenbrock_4d", "sharp_flat_10d_s10"])
def test_high_d_minimum_survives_random_and_multistart_search(key):
    land = EXTRA[key]
    g = torch.Generator().manual_seed(2)
    samples = land.sample(200_000, generator=g)
    values = land(samples)
    assert float(values.min()) >= land.global_min_value - 1e-9
    starts = _spread_starts(samples, values, k=10, min_sep=1.0) + list(land.sample(10, generator=g).numpy())
    bounds = [tuple(b) for b in land.bounds]
    for s in starts:
        _, f = _local_minimize(land.fn, s, bounds)
        assert f >= land.global_min_value - 1e-9


def test_ackley_rosenbrock_sublevel_set_lies_inside_bounds():
    """No point of a much larger box outside the registry bounds reaches the minimum."""
    land = LANDSCAPES["ackley_rosenbrock"]
    gx = torch.linspace(-30, 30, 1201, dtype=F64)
    gy = torch.linspace(-30, 100, 1301, dtype=F64)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), dim=-1).reshape(-1, 2)
    box = land.bounds_tensor()
    outside = ~((grid >= box[:, 0]) & (grid <= box[:, 1])).all(dim=-1)
    assert float(land(grid[outside]).min()) > ACKLEY_ROSENBROCK_MIN_VALUE + 0.05


def test_ackley_rosenbrock_paper_point_is_not_stationary():
    """Adam+CM A.2.1 puts the minimum at (2.1, 3.9): descent from there ends at (1.998, 4.001)."""
    p = torch.tensor(ACKLEY_ROSENBROCK_PAPER_POINT, dtype=F64)
    assert float(torch.func.grad(ackley_rosenbrock)(p).norm()) > 1.0
    x, f = _local_minimize(ackley_rosenbrock, p.numpy(), None)
    np.testing.assert_allclose(x, ACKLEY_ROSENBROCK_LOCAL_MIN_POINT, atol=1e-6)
    assert abs(f - ACKLEY_ROSENBROCK_LOCAL_MIN_VALUE) < 1e-10
    # ... which is the minimum over [-5, 5]^2, while the global minimum is at (2.995, 9.001)
    g = torch.linspace(-5, 5, 1001, dtype=F64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), dim=-1).reshape(-1, 2)
    assert float(ackley_rosenbrock(grid).min()) >= ACKLEY_ROSENBROCK_LOCAL_MIN_VALUE - 1e-12
    assert ACKLEY_ROSENBROCK_MIN_VALUE < ACKLEY_ROSENBROCK_LOCAL_MIN_VALUE
    assert ACKLEY_ROSENBROCK_MIN_POINT[1] > 5


# ---------------------------------------------------------------------------------------
# formulas against the papers' printed forms
# ---------------------------------------------------------------------------------------


def test_ackley_2d_is_adam_cm_eq_11():
    xy = torch.randn(100, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * 5
    x, y = xy[:, 0], xy[:, 1]
    eq11 = (
        -20 * torch.exp(-0.2 * torch.sqrt(0.5 * (x**2 + y**2)))
        - torch.exp(0.5 * (torch.cos(2 * math.pi * x) + torch.cos(2 * math.pi * y)))
        + math.e
        + 20
    )
    torch.testing.assert_close(ackley(xy), eq11)


def test_ackley_is_a_kink_at_the_origin():
    for d in (1, 2, 5):
        z = torch.zeros(d, dtype=F64)
        g = torch.func.grad(ackley)(z)
        assert torch.equal(g, torch.zeros_like(g))  # zero subgradient, not NaN
        u = torch.nn.functional.normalize(torch.randn(d, dtype=F64), dim=0)
        t = 1e-7
        slope = float(ackley(t * u)) / t  # one-sided radial slope a·b/√d
        assert abs(slope - 20 * 0.2 / math.sqrt(d)) < 1e-4


def test_goldstein_price_standard_expansion():
    xy = (torch.rand(200, 2, generator=torch.Generator().manual_seed(4), dtype=F64) - 0.5) * 4
    x, y = xy[:, 0], xy[:, 1]
    standard = (1 + (x + y + 1) ** 2 * (19 - 14 * x + 3 * x**2 - 14 * y + 6 * x * y + 3 * y**2)) * (
        30 + (2 * x - 3 * y) ** 2 * (18 - 32 * x + 12 * x**2 + 48 * y - 36 * x * y + 27 * y**2)
    )
    torch.testing.assert_close(goldstein_price(xy), standard)
    torch.testing.assert_close(log_goldstein_price(xy), (torch.log(standard) - 8.693) / 2.427)
    unit = torch.rand(200, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(log_goldstein_price(unit, unit_square=True), log_goldstein_price(4 * unit - 2))
    assert abs(LOG_GOLDSTEIN_PRICE_MIN - (math.log(3) - 8.693) / 2.427) < 1e-15
    assert abs(LOG_GOLDSTEIN_PRICE_MIN + 3.12913) < 1e-5  # Picheny et al. / VLSE value


def test_levy_matches_vlse_formula():
    x = (torch.rand(50, 4, generator=torch.Generator().manual_seed(6), dtype=F64) - 0.5) * 20
    w = 1 + (x - 1) / 4
    ref = torch.sin(math.pi * w[:, 0]) ** 2
    for i in range(3):
        ref = ref + (w[:, i] - 1) ** 2 * (1 + 10 * torch.sin(math.pi * w[:, i] + 1) ** 2)
    ref = ref + (w[:, 3] - 1) ** 2 * (1 + torch.sin(2 * math.pi * w[:, 3]) ** 2)
    torch.testing.assert_close(levy(x), ref)


def test_beale_and_rosenbrock_reference_values():
    torch.testing.assert_close(beale(torch.tensor([0.0, 0.0], dtype=F64)), torch.tensor(14.203125, dtype=F64))
    torch.testing.assert_close(rosenbrock(torch.tensor([0.0, 0.0, 0.0], dtype=F64)), torch.tensor(2.0, dtype=F64))
    torch.testing.assert_close(rosenbrock(torch.tensor([-1.0, 1.0], dtype=F64)), torch.tensor(4.0, dtype=F64))


# ---------------------------------------------------------------------------------------
# batching, dtypes, derivatives
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ALL_IDS)
def test_batching(key):
    land = ALL[key]
    pts = land.sample(12, generator=torch.Generator().manual_seed(7))
    batched = land(pts)
    assert batched.shape == (12,)
    single = torch.stack([land(p) for p in pts])
    assert land(pts[0]).shape == ()
    torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-12)
    assert land(pts.reshape(3, 4, land.dim)).shape == (3, 4)
    torch.testing.assert_close(land(pts.reshape(3, 4, land.dim)), batched.reshape(3, 4))
    assert land(pts[:0]).shape == (0,)


@pytest.mark.parametrize("key", sorted(LANDSCAPES))
def test_dtypes(key):
    land = LANDSCAPES[key]
    x64 = land.sample(5, generator=torch.Generator().manual_seed(8))
    out32 = land(x64.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), land(x64), rtol=1e-4, atol=1e-4)
    assert land(x64.round().long()).is_floating_point()  # integer input is promoted


@pytest.mark.parametrize("key", ALL_IDS)
def test_gradients_and_hessians_match_finite_differences(key):
    land = ALL[key]
    pts = land.sample(4, generator=torch.Generator().manual_seed(9)).requires_grad_(True)
    assert torch.autograd.gradcheck(land.fn, (pts,), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradgradcheck(land.fn, (pts,), eps=1e-6, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("key", sorted(LANDSCAPES))
def test_hessian_vector_products_are_finite_and_symmetric(key):
    land = LANDSCAPES[key]
    for p in land.sample(3, generator=torch.Generator().manual_seed(10)):
        H = torch.func.hessian(land.fn)(p)
        assert torch.isfinite(H).all()
        torch.testing.assert_close(H, H.T)
        v = torch.randn(land.dim, dtype=F64)
        _, hvp = torch.func.jvp(torch.func.grad(land.fn), (p,), (v,))
        torch.testing.assert_close(hvp, H @ v)


# ---------------------------------------------------------------------------------------
# sharp_flat
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [0.5, 2.0, 10.0, 100.0])
@pytest.mark.parametrize("dim", [1, 3])
def test_sharp_flat_curvatures(s, dim):
    m = sharp_flat_minima(s, dim)
    assert (m.flat_curvature, m.sharp_curvature) == (2.0, 2.0 * s)
    for point, curvature in ((m.flat, 2.0), (m.sharp, 2.0 * s)):
        assert float(sharp_flat(point, s)) == 0.0
        H = torch.func.hessian(lambda x: sharp_flat(x, s))(point)
        torch.testing.assert_close(H, curvature * torch.eye(dim, dtype=F64))
        assert float(torch.func.grad(lambda x: sharp_flat(x, s))(point).norm()) == 0.0
    # a mixed vertex is a global minimum too, with a mixed diagonal Hessian
    if dim == 3:
        v = torch.tensor([0.0, 1.0, 0.0], dtype=F64)
        assert float(sharp_flat(v, s)) == 0.0
        H = torch.func.hessian(lambda x: sharp_flat(x, s))(v)
        torch.testing.assert_close(H, torch.diag(torch.tensor([2.0, 2.0 * s, 2.0], dtype=F64)))
    # the ridge is where the two branches meet
    r = torch.tensor(m.ridge, dtype=F64)
    torch.testing.assert_close(r**2, s * (r - 1) ** 2)
    assert 0 < m.ridge < 1


def test_sharp_flat_registry_lists_every_vertex():
    land = get_landscape("sharp_flat", dim=3, s=5.0)
    assert len(land.global_minima) == 8
    assert land.global_minima[0] == (0.0, 0.0, 0.0) and land.global_minima[1] == (1.0, 1.0, 1.0)
    assert land.params == {"s": 5.0}
    torch.testing.assert_close(land(torch.ones(3, dtype=F64) * 0.5), sharp_flat(torch.ones(3, dtype=F64) * 0.5, 5.0))


def test_sharp_flat_accepts_tensor_s():
    x = torch.tensor([[0.2, 0.9]], dtype=F64)
    torch.testing.assert_close(sharp_flat(x, torch.tensor(10.0)), sharp_flat(x, 10.0))


# ---------------------------------------------------------------------------------------
# quadratic
# ---------------------------------------------------------------------------------------


def _random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=F64)
    return M @ M.T + 0.5 * torch.eye(d, dtype=F64)


@pytest.mark.parametrize("d", [1, 2, 6])
def test_quadratic_closed_forms(d):
    A = _random_spd(d, seed=d)
    g = torch.Generator().manual_seed(100 + d)
    b = torch.randn(d, generator=g, dtype=F64)
    c = 0.7
    q = quadratic(A, b, c)
    x_star = q.minimiser()
    np.testing.assert_allclose(x_star.numpy(), -np.linalg.solve(A.numpy(), b.numpy()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(quadratic_minimiser(A, b), x_star)
    assert float(torch.func.grad(q)(x_star).norm()) < 1e-10
    expected_min = c - 0.5 * float(b @ torch.linalg.solve(A, b))
    assert abs(float(q(x_star)) - expected_min) < 1e-10
    assert abs(float(q.min_value()) - expected_min) < 1e-10
    x = torch.randn(d, generator=g, dtype=F64)
    torch.testing.assert_close(torch.func.hessian(q)(x), A)
    torch.testing.assert_close(q.hessian(), A)
    torch.testing.assert_close(torch.func.grad(q)(x), q.gradient(x))
    torch.testing.assert_close(q(x), 0.5 * x @ A @ x + b @ x + c)
    xs = torch.randn(5, d, generator=g, dtype=F64)
    torch.testing.assert_close(q(xs), torch.stack([q(v) for v in xs]))
    torch.testing.assert_close(q.eigenvalues(), torch.linalg.eigvalsh(A))
    # nothing random beats the minimiser
    assert bool((q(x_star + torch.randn(1000, d, generator=g, dtype=F64)) > q(x_star)).all())


def test_quadratic_validation():
    with pytest.raises(ValueError, match="square"):
        quadratic(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="square"):
        quadratic(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        quadratic(torch.eye(3), torch.ones(2))
    with pytest.raises(ValueError, match="symmetric"):
        quadratic(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.zeros(2))
    with pytest.raises(ValueError, match="positive definite"):
        quadratic(torch.diag(torch.tensor([1.0, -1.0])), torch.zeros(2)).minimiser()
    with pytest.raises(ValueError, match="finite"):
        quadratic(torch.eye(2), torch.zeros(2), c=float("nan"))
    q = quadratic([[2.0, 0.0], [0.0, 4.0]], [1.0, 1.0])  # array-likes and ints are fine
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        q(torch.zeros(3))
    assert q(torch.zeros(2, dtype=torch.float32)).dtype == torch.float32


# ---------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, shape",
    [
        (beale, (3,)),
        (beale, (4, 1)),
        (goldstein_price, (5, 3)),
        (log_goldstein_price, (1,)),
        (ackley_rosenbrock, (2, 4)),
        (rosenbrock, (7, 1)),
        (ackley, (3, 0)),
        (levy, (0,)),
    ],
)
def test_wrong_last_dim_is_rejected(fn, shape):
    with pytest.raises(ValueError, match=r"shape"):
        fn(torch.zeros(shape))


def test_zero_dim_input_is_rejected():
    for fn in (beale, ackley, levy, rosenbrock, lambda x: sharp_flat(x, 2.0)):
        with pytest.raises(ValueError, match="0-dim"):
            fn(torch.tensor(1.0))


@pytest.mark.parametrize("s", [0.0, -1.0, float("nan"), float("inf")])
def test_sharp_flat_rejects_bad_s(s):
    with pytest.raises(ValueError, match="s must be"):
        sharp_flat(torch.zeros(2), s)
    with pytest.raises(ValueError, match="s must be"):
        sharp_flat_minima(s)
    with pytest.raises(ValueError, match="s must be"):
        get_landscape("sharp_flat", s=s)


def test_sharp_flat_rejects_non_scalar_s():
    with pytest.raises(ValueError, match="scalar"):
        sharp_flat(torch.zeros(2), torch.tensor([1.0, 2.0]))


def test_get_landscape_validation():
    with pytest.raises(KeyError, match="unknown landscape"):
        get_landscape("himmelblau")
    with pytest.raises(ValueError, match="2-D"):
        get_landscape("beale", dim=3)
    with pytest.raises(ValueError, match="dim"):
        get_landscape("ackley", dim=0)
    with pytest.raises(ValueError, match="dim"):
        get_landscape("rosenbrock", dim=1)
    with pytest.raises(TypeError):
        get_landscape("levy", s=3.0)
    land = get_landscape("ackley", dim=3, a=10.0, b=0.5, c=math.pi)
    x = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(land(x), ackley(x, a=10.0, b=0.5, c=math.pi))


def test_module_exports():
    for name in L.__all__:
        assert hasattr(L, name), name
