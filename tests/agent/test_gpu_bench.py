"""bench/gpu.py, the benchmark of the agent on a GPU, with its tiny plan on the CPU: every code path the
device run takes except the CUDA clock, memory and synchronisation probes (whose warning hook is
driven here with another C++ warning). No timing is asserted: only that the figures exist, are
finite, and that the correctness checks (bitwise parameters, float64 replay) pass."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import threading
import _thread
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.py"

pytestmark = pytest.mark.slow


def _load_module():
    spec = importlib.util.spec_from_file_location("moxco_bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


gpu = _load_module()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench")
    # a generous time limit: on a loaded machine the plan's own would drop repeats, not what is tested here
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out),
                           "--time-limit", "1200"], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((out / gpu.JSON_NAME).read_text()), (out / gpu.MD_NAME).read_text(), out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_tiny_run_reports_every_section_without_errors(tiny_run):
    results, text, _ = tiny_run
    assert results["errors"] == []
    assert results["device"]["type"] == "cpu" and results["device"]["torch"] == torch.__version__
    assert set(results["workloads"]) == {"gpt2", "mlp"}
    for name, w in results["workloads"].items():
        assert w["parameters"] > 0 and w["param_bytes"] == 4 * w["parameters"], name
        timing = w["timing"]
        assert timing["repeats"] == gpu.TINY.repeats
        assert set(timing["configs"]) == set(gpu.CONFIGS)
        for key, c in timing["configs"].items():
            assert not c["errors"], (name, key, c["errors"])
            for field in ("step_s", "ratio", "wall_ratio", "optimizer_step_s", "in_step_over_step", "peak_copies",
                          "retained_copies"):
                assert _finite(c[field]), (name, key, field, c[field])
        for field in ("reeval_s", "floor_s", "ratio", "cross_check_ratio"):
            assert _finite(timing["reeval"][field]), (name, field)
        assert not timing["reeval"]["errors"]
        assert timing["probe"]["error"] is None and _finite(timing["probe"]["probe_s"])
        counts = w["syncs"][gpu.HostReads.key]
        assert set(counts) == {"label", *gpu.SYNC_CONFIGS}
        for key in gpu.SYNC_CONFIGS:
            assert counts[key]["steps"] == gpu.TINY.sync_steps and not counts[key]["errors"], (name, key)
            if key != "base":
                assert _finite(counts[key]["agent_per_step"]), (name, key)
    eager = results["workloads"]["gpt2"]["probe_eager_attention"]
    assert not eager["errors"] and _finite(eager["probe_s"]) and _finite(eager["floor_s"])
    assert set(results["correctness"]["bitwise"]) == {"gpt2", "mlp"}
    assert set(results["correctness"]["replay"]) == {"gpt2", "mlp"}
    assert "### On the CPU" in text and "| budget | workload | measured | target | verdict |" in text


def test_step_time_ratios_to_the_no_agent_run_are_finite_and_positive(tiny_run):
    results, _, _ = tiny_run
    for name, w in results["workloads"].items():
        timing = w["timing"]
        for key, c in timing["configs"].items():
            for ratio in [c["ratio"], c["wall_ratio"], *c["ratios"], *c["wall_ratios"]]:
                assert _finite(ratio) and ratio > 0, (name, key, ratio)
        assert timing["configs"]["base"]["ratios"] == [1.0] * timing["repeats"]
        for ratio in [timing["reeval"]["ratio"], *timing["reeval"]["ratios"], timing["probe"]["step_ratio"],
                      timing["probe"]["floor_ratio"]]:
            assert _finite(ratio) and ratio > 0, (name, ratio)


def test_parameters_are_bitwise_identical_with_and_without_the_agent_at_every_step(tiny_run):
    results, _, _ = tiny_run
    for name, b in results["correctness"]["bitwise"].items():
        assert b["steps"] == gpu.TINY.bitwise_steps
        assert b["deterministic"], (name, b["control_differences"])
        assert b["agent_identical"] == [True] * b["steps"], (name, b["agent_differences"])
        assert b["identical"] and not b["agent_errors"], (name, b["agent_errors"])


def test_stored_metrics_equal_the_float64_replay_within_the_stated_tolerance(tiny_run):
    results, _, _ = tiny_run
    steps = gpu.TINY.replay_steps
    for name, r in results["correctness"]["replay"].items():
        assert r["tolerance"]["rtol"] == gpu.REPLAY_RTOL and not r["agent_errors"], name
        assert set(r["metrics"]) == set(gpu.REPLAYED)
        for metric, m in r["metrics"].items():
            first = 0 if metric in ("loss", "grad_norm_sq", "update_norm", "distance") else 1
            assert [row["step"] for row in m["rows"]] == list(range(first, steps)), (name, metric)
            for row in m["rows"]:
                assert row["agent"] is not None and row["float64"] is not None, (name, metric, row)
                assert row["error"] <= row["tolerance"], (name, metric, row)
            assert m["ok"], (name, metric)
        assert r["ok"]


def test_free_metrics_and_reevaluation_read_no_tensor_value_on_the_training_thread(tiny_run):
    results, _, _ = tiny_run
    for name, w in results["workloads"].items():
        counts = w["syncs"][gpu.HostReads.key]
        assert counts["base"]["training"] == 0, (name, counts["base"]["locations"])
        for key in ("free", "reeval1", "defaults"):
            assert counts[key]["training"] == 0 and counts[key]["agent_per_step"] == 0, (name, key, counts[key])


def test_report_renders_the_saved_json_and_writes_it_between_the_doc_markers(tiny_run, tmp_path, capsys,
                                                                             monkeypatch):
    _, text, out = tiny_run
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Doc\n\nbefore\n\n{gpu.BEGIN}\npending\n{gpu.END}\n\nafter\n")
    monkeypatch.setattr(gpu, "DOC", doc)  # where --write-docs writes
    assert gpu.main(["--report", str(out / gpu.JSON_NAME), "--write-docs"]) == 0
    assert capsys.readouterr().out.strip() == text.strip()
    written = doc.read_text()
    assert "pending" not in written and written.startswith("# Doc\n\nbefore\n\n")
    assert written.endswith(f"{text.strip()}\n{gpu.END}\n\nafter\n")


def _warn_from_cpp(n: int) -> None:
    """A C++ ``TORCH_WARN`` that reaches Python as a warning, as the sync debug mode's does."""
    source = torch.ones(2)
    for _ in range(n):
        source.new_tensor(source)


def test_sync_debug_counter_attributes_warnings_to_the_training_side_or_background_threads():
    modes = []
    probe = gpu.CudaSyncDebug(message="To copy construct from a tensor", set_mode=modes.append)
    passed = []
    original = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: passed.append(str(message))
    try:
        with probe.counting() as tally:
            _warn_from_cpp(3)  # the training thread
            python_thread = threading.Thread(target=_warn_from_cpp, args=(2,), name="writer-like")
            python_thread.start()
            python_thread.join()
            done = threading.Event()
            _thread.start_new_thread(lambda: (_warn_from_cpp(1), done.set()), ())  # a thread torch could start
            assert done.wait(10)
            warnings.warn("an unrelated warning")
    finally:
        warnings.showwarning = original
    assert modes == ["warn", "default"]
    assert tally.training == 4 and tally.background == 2
    assert tally.threads["writer-like"] == 2
    assert sum(tally.locations.values()) == 4 and all("_warn_from_cpp" in site for site in tally.locations)
    assert passed == ["an unrelated warning"]


def test_host_read_counter_sees_reads_on_the_training_thread_and_in_backward_hooks_only():
    probe = gpu.HostReads("cpu")
    x = torch.randn(4, requires_grad=True)
    x.register_post_accumulate_grad_hook(lambda p: float(p.grad.sum()) and None)
    with probe.counting() as tally:
        y = (x * 2).sum()
        y.detach().item()
        bool(y.detach() > 0)
        y.detach().tolist()
        torch.nonzero(x.detach())
        torch.tensor(1.5, device=x.device)  # host data to the device
        torch.tensor(1.5)  # a host tensor: nothing to wait for on an accelerator
        torch.tensor([], device=x.device)  # nothing to copy
        (x * x).sum().backward()  # the hook's float() on the training thread
        other = threading.Thread(target=lambda: y.detach().item())
        other.start()
        other.join()
    assert tally.training == 6 and tally.background == 0, dict(tally.kinds)
    assert tally.kinds == {"_local_scalar_dense": 3, "tolist": 1, "nonzero": 1, "host data to the device": 1}


def test_the_table_of_a_cuda_run_names_the_device_and_judges_every_budget(tiny_run):
    results, _, _ = tiny_run
    results = json.loads(json.dumps(results))
    results["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "capability": "9.0",
                         "driver": "580.159.04", "cuda": "13.0", "cudnn": 91000, "torch": "2.11.0+cu130",
                         "transformers": "5.17.0", "python": "3.12.3"}
    for w in results["workloads"].values():  # the sync debug mode's counts, as a device run records them
        w["syncs"] = {gpu.CudaSyncDebug.key: {**w["syncs"][gpu.HostReads.key], "label": gpu.CudaSyncDebug.label}}
    w = results["workloads"]["mlp"]
    w["timing"]["configs"]["free"]["ratio"] = 1.5  # 50 % over the step: misses the 1 % budget
    text = gpu.markdown(results)
    assert text.startswith("### On NVIDIA H100 80GB HBM3\n")
    assert "CUDA 13.0" in text and "torch 2.11.0+cu130" in text and "not judged" not in text
    rows = {(r["budget"], r["workload"]): r for r in gpu.budgets(results)}
    assert rows[("free metrics, step time over no agent", "mlp")]["met"] is False
    assert "| free metrics, step time over no agent | mlp | +50.00 % | ≤ 1% | **misses** |" in text
    assert rows[("training-thread synchronisations a step, free", "gpt2")]["met"] is True
    assert all(r["met"] is not None for r in rows.values()), [k for k, r in rows.items() if r["met"] is None]
