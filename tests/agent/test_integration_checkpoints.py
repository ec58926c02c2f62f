"""The Hugging Face and Lightning integrations save the agent's state with the trainer's own
checkpoints and restore it when training resumes from one: a fit stopped at a checkpoint and
resumed from it stores every series exactly as the same fit run straight through, the decision
taken before the stop is not taken again, the phase is kept.

Both fits flush the agent after each step (a test callback), so that the policy's decision comes
back, and is applied, at the same step in every run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moxco.agent.groups.free import TIMING
from moxco.collector import open_store

OPTIONS = dict(reeval_every=1, probe_every=3, sharpness_iters=2, seed=5, on_decision=lambda decision: None,
               goodness={"tau": 1e-6, "sharpness_target": 10.0},
               policy={"threshold": 0.5, "consecutive": 1, "min_step": 3, "max_decisions": 1})


@pytest.fixture(autouse=True)
def private_spool(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXCO_SPOOL", str(tmp_path / "spool-root"))


def mlp(out):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, out)).double()


def examples(n=96):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True)), (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def assert_same_series(store, straight, resumed):
    want = {m: store.series(straight, m) for m in store.metrics(straight) if m not in TIMING}
    got = {m: store.series(resumed, m) for m in store.metrics(resumed) if m not in TIMING}
    assert set(got) == set(want) >= {"loss", "inst_gap", "exp_gap", "sharpness", "goodness", "phase", "lr", "distance"}
    for metric, (steps, values) in want.items():
        np.testing.assert_array_equal(got[metric][0], steps, err_msg=metric)
        np.testing.assert_array_equal(got[metric][1], values, err_msg=metric)
    (taken,) = store.decisions(straight)
    (kept,) = store.decisions(resumed)
    assert kept.step == taken.step == 3 and kept.applied_step == taken.applied_step
    assert store.series(resumed, "phase")[1][-1] == 2.0 and store.run(resumed).status == "finished"


def test_a_hugging_face_fit_stopped_at_a_checkpoint_and_resumed_continues_every_series(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from moxco.agent.integrations.huggingface import STATE_FILE, MoxcoCallback

    x, y, _ = examples()
    rows = [{"x": x[i], "y": y[i]} for i in range(len(x))]
    url = f"sqlite:///{tmp_path / 'hf.db'}"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(1)

        def forward(self, x):
            return self.net(x)

    class MSETrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return F.mse_loss(model(inputs["x"]), inputs["y"])

    class Flush(TrainerCallback):
        def __init__(self, moxco, stop_at=None):
            self.moxco, self.stop_at = moxco, stop_at

        def on_step_end(self, args, state, control, **kwargs):
            assert self.moxco.agent.flush(60)
            if state.global_step == self.stop_at:
                control.should_training_stop = True

    def fit(run, output, stop_at=None, resume_from=None):
        moxco = MoxcoCallback(url=url, run=run, **OPTIONS)
        args = TrainingArguments(output_dir=str(tmp_path / output), max_steps=12, per_device_train_batch_size=8,
                                 learning_rate=0.05, save_strategy="steps", save_steps=6, report_to=[],
                                 disable_tqdm=True, use_cpu=True, remove_unused_columns=False, seed=3)
        trainer = MSETrainer(model=Net(), args=args, train_dataset=rows, callbacks=[moxco, Flush(moxco, stop_at)])
        trainer.train(resume_from_checkpoint=resume_from)
        assert moxco.agent.errors == {}
        return moxco

    fit("straight", "straight")
    first = fit("hf", "stopped", stop_at=6)
    checkpoint = tmp_path / "stopped" / "checkpoint-6"
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert saved["run"] == "hf" and saved["step"] == 6 and saved["run_id"] == first.agent.run_id
    resumed = fit("hf", "stopped", resume_from=str(checkpoint))
    assert resumed.agent.run_id == first.agent.run_id  # the same run, continued
    assert_same_series(open_store(url), "straight", "hf")


def test_a_lightning_fit_stopped_at_a_checkpoint_and_resumed_continues_every_series(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from moxco.agent.integrations.lightning import MoxcoCallback

    x, _, labels = examples()
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=16)
    url = f"sqlite:///{tmp_path / 'pl.db'}"

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(3)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return F.cross_entropy(self.net(inputs), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    class Flush(Callback):
        def __init__(self, moxco):
            self.moxco = moxco

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert self.moxco.agent.flush(60)

    def fit(run, epochs, ckpt_path=None):
        moxco = MoxcoCallback(url=url, run=run, **OPTIONS)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / run, save_last=True, save_top_k=0)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[moxco, Flush(moxco), checkpoints],
                             default_root_dir=str(tmp_path))
        trainer.fit(Module(), batches, ckpt_path=ckpt_path)
        assert moxco.agent.errors == {}
        return moxco

    fit("straight", 4)
    first = fit("pl", 2)  # 12 steps, the last checkpoint at its end
    resumed = fit("pl", 4, ckpt_path=str(tmp_path / "pl" / "last.ckpt"))
    assert resumed.agent.run_id == first.agent.run_id
    assert_same_series(open_store(url), "straight", "pl")
