"""The agent-overhead benchmark's report (``bench/agent_overhead.py``): the tables and verdicts of a
model's repeats, the chunked-reduction table, the batch-size sweep's table and plot, and where in
docs/benchmarks-agent.md each kind of run goes.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from benchkit import ROOT, fmt_ms, median, spread
from overhead_measure import RunResult, cockpit_window, sweep_point
from overhead_workloads import CONFIGS, SWEEP, SWEEP_SECONDS

DOC = ROOT / "docs" / "benchmarks-agent.md"
DOC_TITLE = "# Agent overhead benchmark"
BEGIN, END = "<!-- bench:agent:begin -->", "<!-- bench:agent:end -->"
TUNED_BEGIN, TUNED_END = "<!-- bench:agent-tuned:begin -->", "<!-- bench:agent-tuned:end -->"
PROFILE_BEGIN, PROFILE_END = "<!-- bench:agent-profile:begin -->", "<!-- bench:agent-profile:end -->"
SWEEP_IMAGE = ROOT / "docs" / "img" / "agent-free-overhead.png"
FREE_TARGET, REEVAL_TARGET = 0.03, 1.1  # the agent's budgets: free metrics ≤ 3 %, re-evaluation ≤ 1.1 × its floor
FREE_COPIES, REEVAL_REF_COPIES = 1, 3


def verdict(ok: bool, text: str) -> str:
    return ("meets" if ok else "**misses**") + f" ({text})"


def report_model(data: Dict[str, Any], args) -> str:
    work, pbytes, results = data["work"], data["param_bytes"], data["results"]
    base = [r.step_s for r in results["base"]]
    base_cpu = [r.cpu_s for r in results["base"]]
    ratio = {k: [r.step_s / b for r, b in zip(v, base)] for k, v in results.items()}
    cpu_ratio = {k: [r.cpu_s / b for r, b in zip(v, base_cpu)] for k, v in results.items()}
    floor = [r.floor_s for r in results["floor"]]
    floor_live = [r.floor_live_s for r in results["floor"]]
    reeval_cost = [a.step_s - f.step_s for a, f in zip(results["reeval1"], results["free"])]
    reeval_ratio = [c / fl for c, fl in zip(reeval_cost, floor)]
    # like for like: the agent's re-evaluation and the floor, both timed directly where they run
    reeval_direct = [r.reeval_s for r in results["reeval1"]]
    direct_ratio = [c / fl for c, fl in zip(reeval_direct, floor)]
    live_ratio = [c / fl for c, fl in zip(reeval_direct, floor_live)]
    # the verdict's measure: both in one run, a step each, so the machine's drift cancels
    together = results["reeval1_floor"]
    together_ratio = [r.reeval_alone_s / r.floor_s for r in together]
    floor_diff = [f.step_s - b for f, b in zip(results["floor"], base)]
    rss = data.get("rss") or {}
    rss_base = rss.get("base")

    def rss_cell(key: str) -> str:
        if key == "base":
            return f"0 (growth {rss_base / 1024:.1f} MiB)" if rss_base is not None else ""
        if rss.get(key) is None or rss_base is None:
            return ""
        return f"{(rss[key] - rss_base) * 1024 / pbytes:+.2f}"

    def retained_cell(rs: List[RunResult]) -> str:
        parts: Dict[str, List[float]] = {}
        for r in rs:
            for k, v in r.retained.items():
                parts.setdefault(k, []).append(v)
        total = median([sum(r.retained.values()) for r in rs]) / pbytes
        detail = ", ".join(f"`{k}` {median(v) / pbytes:.2f}"
                           for k, v in sorted(parts.items(), key=lambda kv: -median(kv[1])))
        return f"{total:.2f}" + (f" ({detail})" if detail else "")

    lines = [f"### {work.name}: {work.description}",
             "",
             f"{pbytes / 2**20:.2f} MiB of parameters ({pbytes // 4:,} float32). {data['repeats']} repeats × "
             f"{data['steps']} timed steps after {args.warmup} warm-up steps. Ratios: medians over repeats of the "
             "ratio to the same repeat's no-agent run, [min–max]; CPU time is the process's user + system time "
             "(every thread, the writer's too), less sensitive than wall time to other jobs on the machine.",
             "",
             "| configuration | ms/step | × no agent (wall) | × no agent (CPU time) | page faults/step | "
             "retained by the agent, parameter copies | peak RSS growth vs no agent, copies |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for config in CONFIGS:
        rs = results[config.key]
        lines.append(f"| {config.label} | {fmt_ms(median([r.step_s for r in rs]))} | "
                     f"{median(ratio[config.key]):.3f} [{spread(ratio[config.key])}] | "
                     f"{median(cpu_ratio[config.key]):.3f} | {median([r.faults for r in rs]):.0f} | "
                     f"{retained_cell(rs) if config.agent is not None else ''} | {rss_cell(config.key)} |")
    if rss.get("defaults_nodist") is not None:
        lines.append(f"| defaults, `track_distance=False` (peak RSS only) | | | | | | {rss_cell('defaults_nodist')} |")
    cockpit = data.get("cockpit") or {}
    if "error" in cockpit:
        lines.append(f"| Cockpit `economy` | not run: {cockpit['error']} | | | | | |")
    for interval in (1, 10):
        c = cockpit.get(interval)
        if c is None:
            continue
        label = f"Cockpit `economy`, tracked every {interval} step{'s' if interval > 1 else ''}"
        if "error" in c:
            lines.append(f"| {label} | failed: `{c['error']}` | | | | | |")
        else:
            lines.append(f"| {label} ({c['repeats']} × {cockpit_window(args, interval)} steps) | "
                         f"{fmt_ms(c['step_s'])} | {c['ratio']:.1f} [{spread(c['ratios'], '.1f')}] | | | | |")
    errors = sorted({f"{k}/{g}: {m}" for k, rs in results.items() for r in rs for g, m in r.errors.items()})
    free = median(ratio["free"]) - 1
    free_nodist = median(ratio["free_nodist"]) - 1
    free_cpu = median(cpu_ratio["free"]) - 1
    optimizer_step = median([r.optimizer_s for r in results["base"]])
    free_added = [f.step_s - b for f, b in zip(results["free"], base)]
    bytes_added = [f.step_s - b for f, b in zip(results["bytes"], base)]
    bytes_over = median(ratio["bytes"]) - 1
    bytes_direct = [r.bytes_s for r in results["bytes"]]
    bytes_direct_share = [d / b for d, b in zip(bytes_direct, base)]
    free_direct = [r.free_s for r in results["free"]]
    free_direct_share = [d / b for d, b in zip(free_direct, base)]
    rr = median(together_ratio)
    rr_steps = median(reeval_ratio)
    retained_free = median([sum(r.retained.values()) for r in results["free"]]) / pbytes
    retained_free_nd = median([sum(r.retained.values()) for r in results["free_nodist"]]) / pbytes
    retained_defaults = median([sum(r.retained.values()) for r in results["defaults"]]) / pbytes
    lines += [
        "",
        f"* Floor (one extra forward+backward of the same batch, timed directly) at `x_{{t−1}}`, a twin model's "
        f"parameters, where `inst_smooth` needs the gradient: **{fmt_ms(median(floor))} ms**; at `x_t`, the live "
        f"parameters the backward has just read: {fmt_ms(median(floor_live))} ms "
        f"(× {median([a / b for a, b in zip(floor, floor_live)]):.3f}). Cross-check, floor step − no-agent step: "
        f"{fmt_ms(median(floor_diff))} ms (one pass a step, and the twin's untimed copy).",
        f"* Re-evaluation against its floor in one run (the `reeval_every=1`, floor every other step row: the "
        f"agent's own account of its re-evaluation, `agent.overhead()['reeval']`, on the steps without a floor pass "
        f"— the replay at `x_{{t−1}}` and `loss_diff`, `inst_gap`, `inst_smooth` — against the floor's pass at "
        f"`x_{{t−1}}` on the others, so that both see the same process and the same minutes of a noisy machine): "
        f"{fmt_ms(median([r.reeval_alone_s for r in together]))} ms against "
        f"{fmt_ms(median([r.floor_s for r in together]))} ms = **{rr:.2f} × the floor** "
        f"[{spread(together_ratio, '.2f')}]: "
        + verdict(rr <= REEVAL_TARGET, f"target ≤ {REEVAL_TARGET}×"
                  + ("" if rr <= REEVAL_TARGET else f"; {rr / REEVAL_TARGET - 1:.0%} over")) + ". "
        f"From separate runs (`reeval_every=1` against the floor row): {fmt_ms(median(reeval_direct))} ms = "
        f"{median(direct_ratio):.2f} × the floor at `x_{{t−1}}` [{spread(direct_ratio, '.2f')}], "
        f"{median(live_ratio):.2f} × the pass at `x_t` [{spread(live_ratio, '.2f')}]. "
        f"Cross-check by step times, `step[reeval_every=1] − step[free]` = {fmt_ms(median(reeval_cost))} ms = "
        f"{rr_steps:.2f} × the floor [{spread(reeval_ratio, '.2f')}] (a difference of two noisy step means, "
        "which also carries the writer thread storing the three extra metrics a step).",
        f"* Free metrics: **{free:+.1%}** wall time ({free_cpu:+.1%} CPU time) with `track_distance=True` (the "
        f"default), {free_nodist:+.1%} without: "
        + verdict(free <= FREE_TARGET, f"target ≤ {FREE_TARGET:.0%}"
                  + ("" if free <= FREE_TARGET else f"; {(free - FREE_TARGET) * 100:.1f} points over")) + ".",
        f"* The free metrics' bytes floor (no agent; `x_t`, `x_{{t−1}}`, `g_t`, `x_0` read and `x_{{t−1}}` "
        "written once each, two multi-tensor calls, nothing computed: the least memory traffic of any "
        f"implementation): **{bytes_over:+.1%}** [{spread([r - 1 for r in ratio['bytes']], '+.1%')}], "
        f"{fmt_ms(median(bytes_added))} ms a step; its pass timed directly: {fmt_ms(median(bytes_direct))} ms "
        f"({median(bytes_direct_share):.1%} of the no-agent step [{spread(bytes_direct_share, '.1%')}]). "
        f"The agent's free metrics timed directly (`agent.overhead()['free']`: the pre-step work and the "
        f"end-of-backward gradient norms; not the hooks' bookkeeping, nor what their traffic costs the model's "
        f"own work through the cache): {fmt_ms(median(free_direct))} ms ({median(free_direct_share):.1%} "
        f"[{spread(free_direct_share, '.1%')}]), {median(free_direct) / median(bytes_direct):.1f} × the bytes pass. "
        + ("The bytes pass alone, timed directly, takes more than 3 % of the step here: no implementation that "
           "keeps `x_{t−1}` (`update_corr` needs it) meets the target on this workload and machine."
           if median(bytes_direct_share) > FREE_TARGET else
           "The bytes pass alone, timed directly, is within 3 % of the step here."),
        f"* For scale: the free metrics add {fmt_ms(median(free_added))} ms a step, "
        f"**{median(free_added) / optimizer_step:.1f} × the optimizer's own `step()`** ({fmt_ms(optimizer_step)} ms, "
        "no agent); both are O(P) passes over the parameters, so the free metrics stay within 3 % wherever the "
        "optimizer's step is a fraction of a percent of the training step.",
        f"* Retained with free metrics: {retained_free:.2f} parameter copies with `track_distance=True` (`x_{{t−1}}`, "
        f"`x_0`), {retained_free_nd:.2f} without: "
        + verdict(retained_free_nd <= FREE_COPIES + 0.01, f"target ≤ {FREE_COPIES} copy without `x_0`; the default "
                  f"`track_distance=True` keeps `x_0` too: {retained_free:.0f}") + ". "
        f"Defaults (probe on): {retained_defaults:.2f} copies, "
        + verdict(retained_defaults <= REEVAL_REF_COPIES + 0.01,
                  f"≤ {REEVAL_REF_COPIES} copies with `x*`, and this run has no `x*`") + ".",
    ]
    defaults = results["defaults"]
    wait_share = [r.decision_wait_s / r.step_s for r in defaults]
    lines.append(
        f"* Decision waits, defaults (`decisions=\"sync\"`, the embedded default: at the boundary a probe's "
        f"decision is due at, the policy's lag after the probe, the training thread waits for the answer if it has "
        f"not come): {median([r.decision_waits for r in defaults]):.0f} waits in {data['steps']} steps, "
        f"{fmt_ms(median([r.decision_wait_s for r in defaults]))} ms a step on average: "
        f"**{median(wait_share):.2%} of the defaults' step** [{spread(wait_share, '.2%')}].")
    if errors:
        lines.append("* Agent errors (those metric groups were disabled, their timings are not valid): "
                     + "; ".join(errors) + ".")
    points = {c.key: median([r.points for r in results[c.key]]) for c in CONFIGS if c.agent is not None}
    lines.append("* Points stored per run (sanity: the metrics were computed): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in points.items()) + ".")
    return "\n".join(lines) + "\n"


def chunking_table(sizes=(100_000, 1_000_000, 4_000_000, 16_000_000), repeats: int = 5) -> str:
    """``moxco.tensors.step_sums(..., grad_norm_sq=True)`` (the free metrics' four sums, what the
    agent computes every step) on one float32 tensor of each size (g, x, x_{t−1}, x_0), four ways:
    the eager paths (``moxco.native.disabled()``) with whole-tensor temporaries (``CHUNKED_ABOVE``
    raised past every size), chunked through cached buffers above ``CHUNKED_ABOVE`` (for copies
    that cannot share one buffer), and ``advance=True`` on ``FlatCopy`` buffers (the differences
    formed in the copy itself); and the fused kernel (``moxco.native``, ``advance=True`` on the
    same buffers: what the agent runs on the CPU). Median wall time of ``repeats`` calls, and the
    relative error of ``⟨g, x − x_{t−1}⟩`` against float64 for the eager in-buffer path and the
    fused one."""
    from moxco import native, tensors

    gen = torch.Generator().manual_seed(0)
    rows = ["| elements | eager, whole-tensor temporaries, ms | eager, chunked, ms | eager, in the copy's buffer, ms | "
            "fused kernel (the agent's), ms | fused vs the best eager | ⟨g, x − x_{t−1}⟩ rel. error, eager / fused |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    limit = tensors.CHUNKED_ABOVE
    fused_ok = native.warm()
    for n in sizes:
        g, x, x0 = (torch.randn(n, generator=gen) for _ in range(3))
        prev = x - 1e-3 * torch.randn(n, generator=gen)
        exact = float((g.double() * (x - prev).double()).sum())
        flat_prev, flat_origin = tensors.FlatCopy([prev]), tensors.FlatCopy([x0])
        timings, errors = {}, {}
        for label, above in (("whole", 1 << 62), ("chunked", min(limit, n - 1)), ("flat", limit), ("fused", limit)):
            if label == "fused" and not fused_ok:
                continue
            tensors.CHUNKED_ABOVE = above
            if label in ("flat", "fused"):
                call = lambda: (tensors.copy_(flat_prev, [prev]),  # untimed: back to x_{t−1}
                                time.perf_counter(), tensors.step_sums([g], [x], flat_prev, flat_origin, advance=True,
                                                                       grad_norm_sq=True))
            else:
                call = lambda: (None, time.perf_counter(), tensors.step_sums([g], [x], [prev], [x0], grad_norm_sq=True))
            try:
                with (contextlib.nullcontext() if label == "fused" else native.disabled()):
                    call()  # warm
                    times = []
                    for _ in range(repeats):
                        _, t0, sums = call()
                        times.append(time.perf_counter() - t0)
            finally:
                tensors.CHUNKED_ABOVE = limit
            timings[label] = statistics.median(times)
            errors[label] = abs(float(sums[1]) - exact) / abs(exact)
        best_eager = min(timings[k] for k in ("whole", "chunked", "flat"))
        fused = (f"{timings['fused'] * 1e3:.2f} | {best_eager / timings['fused']:.1f}× faster | "
                 f"{errors['flat']:.0e} / {errors['fused']:.0e}") if "fused" in timings else \
            f"unavailable ({native.status()}) | | {errors['flat']:.0e} / –"
        rows.append(f"| {n:,} | {timings['whole'] * 1e3:.2f} | {timings['chunked'] * 1e3:.2f} | "
                    f"{timings['flat'] * 1e3:.2f} | {fused} |")
    return "\n".join(["### The free metrics' pass over one large tensor", "",
                      "`moxco.tensors.step_sums` with `grad_norm_sq=True` (`‖g‖²`, `⟨g, x − x_{t−1}⟩`, "
                      "`‖x − x_{t−1}‖²`, `‖x − x_0‖²`) on one float32 tensor, median of "
                      f"{repeats} calls. Eager (`moxco.native.disabled()`): whole-tensor temporaries page-fault "
                      f"in on every call; chunked: tensors above {limit:,} elements walked in chunks of "
                      f"{tensors.CHUNK:,} through two reused buffers (the path for copies that cannot share "
                      "one buffer, forced at every size here); in the copy's buffer: `advance=True` on "
                      "`FlatCopy` buffers, the differences formed in the copy of x_{t−1} itself, which then "
                      "holds x. Fused: `moxco.native`'s one pass over the same buffers, float64 accumulators "
                      "(what the agent runs on the CPU). The copy back to x_{t−1} between calls is not timed.",
                      "", *rows, ""])


# --- the free metrics' overhead against the work per step (--sweep) ------------------------------


def sweep_plot(results: Dict[str, List[Dict[str, Any]]], path: Path) -> None:
    """The passes timed directly against the work per step, log-log, with the budget's line (the
    step-time ratios carry the host's noise, several %: they are in the table)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False)
    for ax, (model, points) in zip(axes[0], results.items()):
        unit = SWEEP[model][0]
        x = [p["work"] for p in points]
        pct = lambda key: [100 * p[key] for p in points]
        ax.plot(x, pct("free_direct"), "o-", color="C0", label="free metrics (the agent's pre-step work)")
        ax.plot(x, pct("bytes_direct"), "s:", color="C3", label="bytes floor (moves their bytes, computes nothing)")
        ax.axhline(3, color="k", lw=1, ls="-.", label="budget, 3 %")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))
        ax.set_xticks(x, [f"{v:,}" for v in x])
        ax.set_xlabel(f"{unit} per step")
        ax.set_ylabel("time a step, % of the step without the agent")
        ax.set_title(f"{'MLP 784→512→512→10' if model == 'mlp' else 'tiny GPT-2, 128-token sequences'}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(models: List[str], repeats: int, warmup: int, tmpdir: str, image: Optional[Path]) -> str:
    results: Dict[str, List[Dict[str, Any]]] = {}
    lines = ["### The free metrics' overhead against the work per step", "",
             "The free metrics cost a fixed number of passes over the parameters; the step grows with the "
             "batch. Each point: no agent, the free metrics (`reeval_every=0, probe_every=0`, "
             "`track_distance=True`) and the bytes floor, "
             f"{repeats} rotated rounds of about {SWEEP_SECONDS:g} s each; step-time ratios, and the passes timed "
             "directly (`agent.overhead()['free']`; the bytes floor's pass) over the no-agent step, medians "
             "over rounds. Timed directly, the passes leave out the hooks' bookkeeping and what their memory "
             "traffic costs the model's own work; the step-time ratios hold everything, and the host's noise, "
             "which on these machines reaches several % between runs of the same loop.", ""]
    for model in models:
        unit, batches = SWEEP[model]
        results[model] = []
        for batch in batches:
            print(f"sweep {model} batch {batch} …", file=sys.stderr, flush=True)
            results[model].append(sweep_point(model, batch, repeats, warmup, tmpdir))
        lines += [f"| {model}: {unit} per step | no-agent step, ms | free metrics, step time [min–max] | free "
                  "metrics, their pass timed | bytes floor, its pass timed | within 3 %: step time / pass timed |",
                  "| ---: | ---: | ---: | ---: | ---: | --- |"]
        for p in results[model]:
            lines.append(f"| {p['work']:,} | {p['base_ms']:.2f} | {100 * p['free']:+.1f}% "
                         f"[{100 * p['free_low']:+.1f}%–{100 * p['free_high']:+.1f}%] | {100 * p['free_direct']:.2f}% | "
                         f"{100 * p['bytes_direct']:.2f}% | {'yes' if p['free'] <= 0.03 else 'no'} / "
                         f"{'yes' if p['free_direct'] <= 0.03 else 'no'} |")
        lines.append("")
    if image is not None:
        sweep_plot(results, image)
        lines += [f"![free-metric overhead against work per step]({image.relative_to(DOC.parent).as_posix()})", ""]
    return "\n".join(lines)


def doc_markers(args) -> tuple[str, str]:
    """Where a run's markdown goes in the doc: the profile, the batch-size sweep, a run with more
    GPT-2 tokens a step (``--gpt2-batch``), a tuned-allocator run, or the main results."""
    if args.profile:
        return PROFILE_BEGIN, PROFILE_END
    if args.sweep:
        return "<!-- bench:agent-sweep:begin -->", "<!-- bench:agent-sweep:end -->"
    if args.gpt2_batch:
        return "<!-- bench:agent-gpt2-batch:begin -->", "<!-- bench:agent-gpt2-batch:end -->"
    return (TUNED_BEGIN, TUNED_END) if args.malloc == "tuned" else (BEGIN, END)
