"""Which convention each audited number follows: moxco's, the audit paper's equations, and the
audit paper's public code (github.com/optimizedlearning/test_properties), side by side.

moxco computes the paper's equations. The authors' public code differs from them in places a
reader comparing our numbers with their figures must know; each entry names the place in their
code (file and line for ``ImageClassification/Cifar10/``, the function or variable for the
language-model scripts). docs/audit.md, "Conventions", prints this table; every section of the
audit's JSON maps each of its numbers to one of these ids (``Section.conventions``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

REPOSITORY = "https://github.com/optimizedlearning/test_properties"
TRAIN = "ImageClassification/Cifar10/train.py"
SGD = "ImageClassification/Cifar10/sgd.py"
CLM = "run_clm_no_trainer.py"


@dataclass(frozen=True)
class Convention:
    quantity: str
    moxco: str
    paper: str
    authors_code: str
    where: str
    #: the authors' code against the paper: "differs", "same", "absent" (not in their code), "moxco only"
    code: str

    def to_json(self) -> Dict[str, object]:
        return asdict(self)


CONVENTIONS: Dict[str, Convention] = {c.quantity: c for c in (
    Convention(
        "inst_gap",
        "f(x_t, z_t) − f(x_{t−1}, z_t) − ⟨g_t, x_t − x_{t−1}⟩: x_{t−1} is replayed on the step's own batch z_t",
        "eq. 2 with y = x_{t−1}, both losses on the same batch z_t",
        "f(x_t, z_t) − f(x_{t−1}, z_{t−1}) − ⟨g_t, x_t − x_{t−1}⟩: the previous step's loss on the previous batch, "
        "no replay",
        f"{TRAIN} lines 34–35, 54, 58 (prev_loss = the last step's loss.item()); {CLM}, main(): "
        "current_convexity_gap = loss − current_loss − linear_approx",
        "differs"),
    Convention(
        "inst_smooth",
        "‖g_t − ∇f(x_{t−1}, z_t)‖ / ‖x_t − x_{t−1}‖: global norms over all parameters, both gradients on z_t",
        "eq. 4 with y = x_{t−1}: ‖∇f(x_t, z) − ∇f(x_{t−1}, z)‖ / ‖x_t − x_{t−1}‖, one batch z",
        "Σᵢ‖g_{t,i} − g_{t−1,i}‖ / Σᵢ‖x_{t,i} − x_{t−1,i}‖: the previous batch's gradient, and sums of per-tensor "
        "norms i instead of global norms (≥ the global-norm ratio's numerator and denominator alike)",
        f"{SGD} lines 94–109 (check_smoothness), 110–120 (save_param keeps p.grad of the previous batch); {CLM}: "
        "compute_smoothness",
        "differs"),
    Convention(
        "avg_gap",
        "the mean of the measured gaps: Σ inst_gap / (number of gaps)",
        "eq. 3: the running average of inst_gap",
        "Σ gaps / (number of batches), and the first batch has no gap: the paper's mean times t/(t+1)",
        f"{TRAIN} line 74 (convexity_gap/step, step counts the first batch); {CLM}: convexity_gap/iteration",
        "differs"),
    Convention(
        "ema",
        "exp_gap, exp_smooth: e_t = β e_{t−1} + (1 − β) x_t, β = 0.99, e_0 = 0, no bias correction",
        "eq. 3 and 5: exponential averages with β = 0.99",
        "the same recursion, β = 0.99 (and 0.9999), e_0 = 0, no bias correction",
        f"{CLM}, main(): exp_avg_gap_1, exp_avg_L_1 (0.99), exp_avg_gap_2, exp_avg_L_2 (0.9999)",
        "same"),
    Convention(
        "max_smooth",
        "the running maximum of inst_smooth",
        "eq. 5: the maximum",
        "the same running maximum (of their inst_smooth, above)",
        f"{TRAIN} line 50; {CLM}, main(): L = max(L, current_L)",
        "same"),
    Convention(
        "epochs",
        "every step after the run's first is measured; the aggregates reset only where the user declares epochs "
        "(agent.epoch()), never in pretraining runs",
        "the averages restart at each epoch, except in the GPT-2 and BERT pretraining runs (no reset); every step "
        "is measured",
        "the first batch of every epoch is skipped (no gap, no smoothness); the averages restart each epoch",
        f"{TRAIN} lines 21, 27, 48 (step = 0 and the sums reset inside train_step, measured if step > 0); {CLM}, "
        "main(): `if step >0:` inside the epoch loop",
        "differs"),
    Convention(
        "convexity_ratio",
        "eq. 6 against a reference x*: Σ_t ⟨∇F(x_t), x_t − x*⟩ / Σ_t (F(x_t) − F(x*)), on the probe batch "
        "(online) or a fixed probe set (checkpoint mode)",
        "eq. 6 against x*, the final weights of a previous run",
        "their logged ratio ('linear/loss_gap', 'innerProd/gap') is between consecutive iterates: "
        "Σ ⟨g_t, x_t − x_{t−1}⟩ / Σ (f(x_t, z_t) − f(x_{t−1}, z_{t−1})), not eq. 6",
        f"{TRAIN} lines 51–52, 74 (num/denom); {CLM}, main(): num, denom, 'linear/loss_gap'",
        "differs"),
    Convention(
        "update_corr",
        "⟨g_{t+1}, x_{t+1} − x_t⟩, stored at step t+1",
        "eq. 9",
        "not computed: only a commented-out line",
        f"{SGD} line 187 (# sum += dot(d_p, displacement))",
        "absent"),
    Convention(
        "random_scaling",
        "x_{t+1} = x_t + s_t Δ_t with s_t ~ Exp(1); update_corr_rs = ⟨g_{t+1}, Δ_t⟩ (the unscaled update)",
        "§4.3, eq. 12–13",
        "not in the public code: only commented-out draws (np.random.exponential(1))",
        f"{SGD} lines 204–206 (commented out)",
        "absent"),
    Convention(
        "sharpness",
        "the top (algebraic largest) Hessian eigenvalue of the probe batch's loss, tracked warm (a cold Lanczos, "
        "then power steps shifted by the smallest eigenvalue's estimate); its probes with a value ≤ 0 are left out "
        "of the comparison",
        "fig. 5: the maximum eigenvalue of the training loss Hessian (Cohen et al.'s full-batch sharpness)",
        "not in the public code",
        "—",
        "absent"),
    Convention(
        "smoothness_pairs",
        "one pair per sharpness probe: the median inst_smooth since the previous probe against the sharpness; "
        "Spearman's ρ with its 2-standard-error interval, and the median ratio",
        "fig. 5: the curves drawn together, no statistic",
        "none",
        "—",
        "moxco only"),
    Convention(
        "edge_of_stability",
        "the median of sharpness / edge over the probes of the run's second half, with its 2-standard-error "
        "interval (order statistics) and quartiles: λ_max against λ_EOS = 2(1+α)/(η(1+2β)); for an Adam-family "
        "optimizer λ_max(P⁻¹H), P = diag(√v̂ + ε) from its second moments, against 2(1+β₁)/((1−β₁)η) "
        "(Cohen et al. 2022)",
        "fig. 5: full-batch gradient descent at the edge of stability 2/η (Cohen et al. 2021), no statistic",
        "not in the public code",
        "—",
        "moxco only"),
    Convention(
        "sign_test",
        "a mean's sign at 2 standard errors; the error from successive differences (von Neumann's δ²), so a "
        "slowly varying trend is not taken for noise",
        "fig. 6–8: running averages, no test",
        "none",
        "—",
        "moxco only"),
    Convention(
        "goodness",
        "MoXCo eq. 6 on ALIGATOR-denoised estimates, relative sharpness term by default; the decision policy of "
        "the run's config",
        "MoXCo eq. 6, Algorithm 1",
        "— (MoXCo, not the audit paper)",
        "—",
        "moxco only"),
)}


def table_json() -> Dict[str, Dict[str, object]]:
    """The conventions as JSON (the audit's ``conventions`` entry)."""
    return {key: c.to_json() for key, c in CONVENTIONS.items()}


def markdown_table() -> str:
    """The conventions as the markdown table docs/audit.md prints (a test keeps the two equal)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| quantity | moxco | the paper's equations | the authors' public code | where in their code | "
            "their code vs the paper |",
            "| --- | --- | --- | --- | --- | --- |"]
    for c in CONVENTIONS.values():
        rows.append(f"| `{c.quantity}` | {cell(c.moxco)} | {cell(c.paper)} | {cell(c.authors_code)} | "
                    f"{cell(c.where)} | {c.code} |")
    return "\n".join(rows)
