"""ALIGATOR vs. fixed smoothers on simulated noisy streams: a markdown table of MSE and update cost.

For each signal type the table gives the MSE against the true signal of: the raw observations;
ALIGATOR (``moxco.aligator.Aligator``, default noise-scaled rate); ALIGATOR with the paper's
exp-concavity rate ``1/(8B²)`` and ``B = max|y|`` (known in hindsight); the best trailing moving
average chosen in hindsight over 60 log-spaced windows (an oracle: it knows the signal); and a
bias-corrected EMA with β = 0.99 (MoXCo A.2.2's fixed smoother). The last column is ALIGATOR's
wall time per ``update`` in microseconds (pure Python, this machine).

    python bench/aligator.py --n 5000 --seed 0 --out bench-aligator.md
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict

import numpy as np

from moxco.aligator import Aligator


def piecewise_constant(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cuts = np.sort(rng.choice(np.arange(100, n - 100), size=5, replace=False))
    signal = np.repeat(rng.uniform(-2.0, 2.0, size=6), np.diff(np.concatenate([[0], cuts, [n]])))
    return signal, signal + rng.standard_normal(n)


def slow_sine(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    signal = 2.0 * np.sin(2.0 * np.pi * np.arange(n) / n + rng.uniform(0.0, 2.0 * np.pi))
    return signal, signal + rng.standard_normal(n)


def fast_sine(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    phase = 2.0 * np.pi * np.arange(n) / n
    signal = 2.0 * np.sin(3.0 * phase) + np.cos(7.0 * phase)
    return signal, signal + rng.standard_normal(n)


def loss_curve(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A training loss: exponential decay to a floor, noise proportional to the loss (σ_t = 0.3 μ_t)."""
    signal = 0.5 + 3.0 * np.exp(-np.arange(n) / (n / 5.0))
    return signal, signal * (1.0 + 0.3 * rng.standard_normal(n))


SIGNALS: Dict[str, Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "piecewise constant (6 levels, σ=1)": piecewise_constant,
    "slow sine (1 period, amp. 2, σ=1)": slow_sine,
    "fast sine (3+7 periods, σ=1)": fast_sine,
    "loss curve (decay, σ_t = 0.3·μ_t)": loss_curve,
}


def trailing_moving_average(y: np.ndarray, window: int) -> np.ndarray:
    cumulative = np.concatenate([[0.0], np.cumsum(y)])
    end = np.arange(1, len(y) + 1)
    start = np.maximum(0, end - window)
    return (cumulative[end] - cumulative[start]) / (end - start)


def best_moving_average(y: np.ndarray, signal: np.ndarray) -> tuple[float, int]:
    windows = np.unique(np.round(np.geomspace(1, len(y), 60)).astype(int))
    errors = [float(np.mean((trailing_moving_average(y, w) - signal) ** 2)) for w in windows]
    best = int(np.argmin(errors))
    return errors[best], int(windows[best])


def ema(y: np.ndarray, beta: float = 0.99) -> np.ndarray:
    out, state = np.empty_like(y), 0.0
    for t, value in enumerate(y, start=1):
        state = beta * state + (1.0 - beta) * value
        out[t - 1] = state / (1.0 - beta**t)  # bias-corrected (Adam-style) so early steps are not pulled to 0
    return out


def run_aligator(y: np.ndarray, bound: float | None = None) -> tuple[np.ndarray, float]:
    denoiser = Aligator(bound=bound)
    start = time.perf_counter()
    out = np.array([denoiser.update(value) for value in y.tolist()])
    return out, (time.perf_counter() - start) / len(y) * 1e6


def table(n: int, seed: int) -> str:
    rows = [
        "| signal | raw MSE | ALIGATOR MSE | ALIGATOR, paper rate 1/(8B²) | best moving average MSE (window) "
        "| EMA(0.99) MSE | µs / update |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for index, (name, make) in enumerate(SIGNALS.items()):
        rng = np.random.default_rng([seed, index])
        signal, y = make(n, rng)
        mse = lambda estimate: float(np.mean((estimate - signal) ** 2))  # noqa: E731
        aligator, micros = run_aligator(y)
        paper, _ = run_aligator(y, bound=float(np.max(np.abs(y))))
        oracle, window = best_moving_average(y, signal)
        rows.append(
            f"| {name} | {mse(y):.4f} | {mse(aligator):.4f} | {mse(paper):.4f} | {oracle:.4f} ({window}) "
            f"| {mse(ema(y)):.4f} | {micros:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="stream length (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.n < 300:
        parser.error("--n must be at least 300 (the piecewise signal keeps 100 steps clear at each end)")
    text = f"n = {args.n}, seed = {args.seed}\n\n{table(args.n, args.seed)}\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
