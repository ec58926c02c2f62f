"""Every loop style gets the loss with at most one call, and says which call when it cannot; the
user's own series and what the loop tells for free (learning rate, step time, throughput) are
stored.

The check of a replay on the step's own batch: ``update_corr_t + inst_gap_t = loss_diff_t`` holds
only if the replayed loss is the step's loss (audit eq. 2 and 9 share ``⟨g_t, x_t − x_{t−1}⟩``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moxco.agent
from moxco.collector import open_store


@pytest.fixture(autouse=True)
def private_spool(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXCO_SPOOL", str(tmp_path / "spool-root"))


def data(step, classes=None):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    if classes:
        return x, torch.randint(0, classes, (12,), generator=gen)
    return x, torch.randn(12, 1, generator=gen, dtype=torch.float64)


def mlp(out=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, out)).double()


def check_replays(store, run, steps):
    """Every metric group ran on the step's own loss."""
    losses = store.series(run, "loss")
    assert losses[0].tolist() == list(range(steps))
    corr, gap, diff = (dict(zip(*store.series(run, m))) for m in ("update_corr", "inst_gap", "loss_diff"))
    assert sorted(gap) == list(range(1, steps))
    for step in gap:
        assert corr[step] + gap[step] == pytest.approx(diff[step], rel=1e-9, abs=1e-12)
    assert np.isfinite(store.series(run, "sharpness")[1]).all()
    return losses


def test_a_plain_loop_with_a_functional_loss_needs_one_call(tmp_path):
    """``loss = agent.loss(lambda out, y: ((out − y)**2).mean(), model(x), y)``: the step's loss is
    the job's, and every replay forms it the same way (the loss-free metrics need nothing at all)."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = moxco.agent.attach(model, opt, url=url, run="functional", reeval_every=1, probe_every=2)
    losses = []
    for step in range(6):
        x, y = data(step)
        loss = agent.loss(lambda out, target: ((out - target) ** 2).mean(), model(x), y)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {}
    stored = check_replays(open_store(url), "functional", 6)
    np.testing.assert_allclose(stored[1], losses, rtol=1e-12)


@pytest.mark.parametrize("loop, hint", [
    ("plain", "agent.loss(F.cross_entropy, output, y)"),
    ("loss_fn without targets", "agent.targets(y)"),
    ("closure", "agent.before_optimizer_step() after its backward"),
])
def test_a_loss_the_agent_cannot_find_names_the_call_for_the_loop_it_saw(loop, hint, tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"loss_fn": F.cross_entropy} if loop.startswith("loss_fn") else {}
    agent = moxco.agent.attach(model, opt, url=url, run="hint", reeval_every=1, probe_every=0,
                               manual_pre_step=loop == "closure", **options)
    for step in range(3):
        x, y = data(step, classes=3)
        F.cross_entropy(model(x), y).backward()
        if loop == "closure":
            agent.before_optimizer_step()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert set(agent.errors) == {"loss"} and hint in agent.errors["loss"]
    assert {"grad_norm_sq", "update_norm", "distance", "lr"} <= set(open_store(url).metrics("hint"))


def test_the_users_own_series_and_what_the_loop_tells_are_stored(tmp_path):
    """``agent.log`` stores any scalar series at the step given (default: the steps taken), numbers
    and one-element tensors, NaN kept; a name moxco uses or the wire refuses is a clear error. Every
    step stores its learning rate (a scheduler's), its wall time and its samples a second
    (``samples_per_second · step_time`` is the batch size)."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run="own", criterion=criterion, reeval_every=0, probe_every=0)
    for step in range(6):
        x, y = data(step)
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
        if step % 2 == 1:
            agent.log({"val_loss": 1.0 / (step + 1), "accuracy": torch.tensor(0.5 + step / 100)})
    agent.log({"val_loss": float("nan")}, step=100)
    with pytest.raises(ValueError, match="'loss' is a moxco metric"):
        agent.log({"loss": 1.0})
    with pytest.raises(ValueError, match="control characters"):
        agent.log({"bad\nname": 1.0})
    with pytest.raises(TypeError, match="not a number"):
        agent.log({"text": "high"})
    agent.close()
    assert agent.errors == {}
    store = open_store(url)
    steps, val = store.series("own", "val_loss")
    assert steps.tolist() == [2, 4, 6, 100]
    np.testing.assert_allclose(val[:3], [1 / 2, 1 / 4, 1 / 6])
    assert np.isnan(val[3])
    np.testing.assert_allclose(store.series("own", "accuracy")[1], [0.51, 0.53, 0.55])
    steps, lr = store.series("own", "lr")
    assert steps.tolist() == list(range(6)) and lr.tolist() == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    time_steps, seconds = store.series("own", "step_time")
    assert time_steps.tolist() == list(range(1, 6)) and (seconds > 0).all()
    rate_steps, rate = store.series("own", "samples_per_second")
    assert rate_steps.tolist() == list(range(1, 6))
    np.testing.assert_allclose(rate * seconds, 12.0, rtol=1e-9)


def test_lightning_replays_training_step_so_a_functional_loss_needs_nothing(tmp_path):
    """``training_step`` returns ``F.cross_entropy(self(x), y)`` and logs it: the callback alone (no
    ``module=``, no ``loss_fn``) gives every metric on the step's loss; the replays do not log; the
    module's hparams and its validation metrics are stored, the learning rate every step."""
    import lightning.pytorch as pl

    from moxco.agent.integrations.lightning import MoxcoCallback

    class Module(pl.LightningModule):
        def __init__(self, lr=0.1):
            super().__init__()
            self.save_hyperparameters()
            self.net = mlp(3)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    pairs = [data(step, classes=3) for step in range(8)]
    dataset = torch.utils.data.TensorDataset(torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]))
    batches = torch.utils.data.DataLoader(dataset, batch_size=12)
    url = f"sqlite:///{tmp_path / 'pl.db'}"
    callback = MoxcoCallback(url=url, run="pl", reeval_every=1, probe_every=2)
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=4, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    validation = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(24)), batch_size=12)
    trainer.fit(Module(), train_dataloaders=batches, val_dataloaders=validation)
    assert callback.agent.errors == {}
    store = open_store(url)
    losses = check_replays(store, "pl", 8)
    # the replays (at x_{t−1}, after the step's own call) went through training_step without logging
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(losses[1][-1], rel=1e-12)
    assert store.run("pl").config["hparams"] == {"lr": 0.1}
    assert store.series("pl", "val_loss")[0].tolist() == [4, 8]
    assert store.series("pl", "lr")[1].tolist() == [0.1] * 8
    assert "training_step" not in vars(trainer.lightning_module)  # the module's own method again


def test_a_hugging_face_trainer_with_its_own_compute_loss_needs_nothing(tmp_path):
    """A Trainer subclass computing ``F.mse_loss`` on a plain module's output in ``compute_loss``: the
    callback alone gives every metric on that loss; the ``TrainingArguments``, the scheduler's
    learning rate at every step and the evaluation metrics are stored."""
    from transformers import Trainer, TrainingArguments

    from moxco.agent.integrations.huggingface import MoxcoCallback

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

    class MSETrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(inputs["x"])
            loss = F.mse_loss(out, inputs["y"])
            return (loss, out) if return_outputs else loss

    rows = [{"x": x[i], "y": y[i]} for x, y in (data(s) for s in range(4)) for i in range(12)]
    url = f"sqlite:///{tmp_path / 'hf.db'}"
    callback = MoxcoCallback(url=url, run="hf", reeval_every=1, probe_every=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=0.05, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                             remove_unused_columns=False, eval_strategy="steps", eval_steps=3, lr_scheduler_type="linear",
                             label_names=["y"])
    trainer = MSETrainer(model=Net(), args=args, train_dataset=rows, eval_dataset=rows[:8], callbacks=[callback])
    trainer.train()
    assert callback.agent.errors == {}
    store = open_store(url)
    check_replays(store, "hf", 6)
    config = store.run("hf").config
    assert config["training_arguments"]["max_steps"] == 6 and config["training_arguments"]["learning_rate"] == 0.05
    lr_steps, lr = store.series("hf", "lr")
    assert lr_steps.tolist() == list(range(6))
    np.testing.assert_allclose(lr, [0.05 * (1 - s / 6) for s in range(6)], rtol=1e-9)
    assert store.series("hf", "eval_loss")[0].tolist() == [3, 6]
    assert "compute_loss" not in vars(trainer)  # the Trainer's own method again
