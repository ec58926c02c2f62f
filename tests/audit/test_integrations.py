"""The one-line integrations: a Hugging Face Trainer callback and a Lightning callback attach the
agent, and the metrics they record are taken at the right moment (after backward, before the
update): the identity ``update_corr_t + inst_gap_t = loss_diff_t`` of a replay on the step's own
batch holds only if ``g_t`` and the batch are the step's (a pre-hook that ran before Lightning's
closure would see the previous step's gradient)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moxco.collector import open_store

STEPS = 8


def tiny_gpt2(vocab=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def blocks(n=64, vocab=64):
    return torch.randint(0, vocab, (n, 16), generator=torch.Generator().manual_seed(0))


def check_run(url, run):
    store = open_store(url)
    info = store.run(run)
    assert info.status == "finished"
    assert store.series(run, "loss")[0].size == STEPS
    corr, gap, diff = (dict(zip(*store.series(run, m))) for m in ("update_corr", "inst_gap", "loss_diff"))
    assert len(gap) == STEPS - 1
    for step in gap:
        assert corr[step] + gap[step] == pytest.approx(diff[step], rel=1e-5, abs=1e-6)
    assert np.isfinite(store.series(run, "sharpness")[1]).all()
    return info


def test_transformers_trainer_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    from moxco.agent.integrations.huggingface import MoxcoCallback

    data = blocks()

    class Dataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i]}

    url = f"sqlite:///{tmp_path / 'hf.db'}"
    with pytest.raises(TypeError, match="'probe_evry'.*'probe_every'"):  # at construction, before training
        MoxcoCallback(url=url, probe_evry=4)
    callback = MoxcoCallback(url=url, run="hf", reeval_every=1, probe_every=4)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=8,
                             learning_rate=1e-3, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                             max_grad_norm=0.5)  # clipping on: the agent records the raw gradient
    Trainer(model=tiny_gpt2(), args=args, train_dataset=Dataset(), callbacks=[callback]).train()
    assert callback.agent.errors == {}
    info = check_run(url, "hf")
    assert info.config["integration"] == "transformers.Trainer" and info.config["dtype"] == "float32"
    assert callback.epochs is False  # max_steps set: a pretraining-style run, no aggregate resets


def test_lightning_callback(tmp_path):
    import lightning.pytorch as pl

    from moxco.agent.integrations.lightning import MoxcoCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    url = f"sqlite:///{tmp_path / 'pl.db'}"
    with pytest.raises(TypeError, match="'reeval_evry'.*'reeval_every'"):  # at construction, before training
        MoxcoCallback(module="model", url=url, reeval_evry=1)
    callback = MoxcoCallback(module="model", url=url, run="pl", reeval_every=1, probe_every=4)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=0.5, default_root_dir=str(tmp_path))
    trainer.fit(Module(), torch.utils.data.DataLoader(blocks(), batch_size=8))
    assert callback.agent.errors == {}
    info = check_run(url, "pl")
    assert info.config["integration"] == "lightning"
