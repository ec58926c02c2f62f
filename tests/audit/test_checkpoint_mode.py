"""Checkpoint mode (``moxco audit --checkpoints``) against online mode with the same x*.

A deterministic full-batch task (logistic regression on scikit-learn's breast-cancer data, float64):
each step's batch is the whole data set, which is also checkpoint mode's probe set, so ``F`` is the
same function in both modes and the running ``convexity_ratio`` (and ``inst_gap_ref``,
``inst_smooth_ref``) at the probe steps must agree to rounding."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.cli import main
from moxco.collector import open_store

DATA_MODULE = textwrap.dedent('''
    import numpy as np
    import torch
    from sklearn.datasets import load_breast_cancer
    from torch import nn

    class LogReg(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(30, 1).double()

        def forward(self, x, y):
            return nn.functional.binary_cross_entropy_with_logits(self.linear(x), y)

    def data():
        d = load_breast_cancer()
        x = torch.tensor((d.data - d.data.mean(0)) / d.data.std(0), dtype=torch.float64)
        y = torch.tensor(d.target, dtype=torch.float64).unsqueeze(1)
        return x, y

    def probe(checkpoints_dir):
        return LogReg, [data()]
''')


@pytest.fixture
def task(tmp_path, monkeypatch):
    (tmp_path / "probe_task.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import probe_task

    importlib.reload(probe_task)
    return probe_task


def train(task, url, run, steps, *, reference=None, checkpoints=None, probe_every=5, seed=0):
    torch.manual_seed(seed)
    model = task.LogReg()
    x, y = task.data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    agent = moxco.agent.attach(model, opt, url=url, run=run, reeval_every=probe_every, probe_every=probe_every,
                               reference=reference, seed=0)
    for step in range(steps):
        if checkpoints is not None and step % probe_every == 0:
            torch.save({"step": step, "model": model.state_dict()}, checkpoints / f"step_{step:04d}.pt")
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_checkpoint_mode_equals_online_mode_with_the_same_reference(tmp_path, task, capsys):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    x_star = train(task, url, "first", 120, seed=1)
    torch.save(x_star, tmp_path / "xstar.pt")
    checkpoints = tmp_path / "ckpts"
    checkpoints.mkdir()
    train(task, url, "online", 40, reference=str(tmp_path / "xstar.pt"), checkpoints=checkpoints)
    out = tmp_path / "ckpt.html"
    code = main(["audit", "--checkpoints", str(checkpoints), "--reference", str(tmp_path / "xstar.pt"),
                 "--data", f"{tmp_path / 'probe_task.py'}:probe", "--run", "from-checkpoints", "--store", url,
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "8/8" in captured.err or "9/9" in captured.err  # the progress bar ran to the end (x* + 8 checkpoints)
    store = open_store(url)
    online_steps, online = store.series("online", "convexity_ratio")
    ckpt_steps, ckpt = store.series("from-checkpoints", "convexity_ratio")
    np.testing.assert_array_equal(online_steps, np.arange(0, 40, 5))
    np.testing.assert_array_equal(ckpt_steps, online_steps)
    np.testing.assert_allclose(ckpt, online, rtol=1e-9, atol=1e-12)
    for metric in ("inst_gap_ref", "inst_smooth_ref"):
        steps, values = store.series("online", metric)
        np.testing.assert_allclose(store.series("from-checkpoints", metric)[1], values, rtol=1e-9, atol=1e-12)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["sections"]["global_convexity"]["numbers"]["convexity_ratio"] == pytest.approx(online[-1], rel=1e-9)
    assert summary["sections"]["global_convexity"]["verdict"] == "holds"  # convex task: ratio > 1
    detail = json.loads((tmp_path / "ckpt-checkpoints.json").read_text())
    assert [row["step"] for row in detail["checkpoints"]] == list(range(0, 40, 5))
    assert detail["numerator"] / detail["denominator"] == pytest.approx(online[-1], rel=1e-9)


def test_checkpoint_mode_refuses_to_overwrite_and_explains_bad_input(tmp_path, task, capsys):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    checkpoints = tmp_path / "ckpts"
    checkpoints.mkdir()
    x_star = train(task, url, "online", 10, checkpoints=checkpoints)
    torch.save(x_star, tmp_path / "xstar.pt")
    args = ["audit", "--checkpoints", str(checkpoints), "--reference", str(tmp_path / "xstar.pt"), "--store", url,
            "--out", str(tmp_path / "r.html"), "--no-progress"]
    assert main(args + ["--data", f"{tmp_path / 'probe_task.py'}:nothing"]) == 1
    assert "has no function 'nothing'" in capsys.readouterr().err
    assert main(args + ["--data", "probe_task"]) == 1
    assert "module:function" in capsys.readouterr().err
    assert main(args[:-1] + ["--data", "probe_task:probe"][:0]) == 2  # no --data
    capsys.readouterr()
    assert main(args + ["--data", "probe_task:probe", "--run", "x"]) == 0
    assert main(args + ["--data", "probe_task:probe", "--run", "x"]) == 1
    assert "already has convexity_ratio" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["audit", "--checkpoints", str(empty), "--reference", str(tmp_path / "xstar.pt"), "--store", url,
                 "--data", "probe_task:probe"]) == 1
    assert "no checkpoints" in capsys.readouterr().err
