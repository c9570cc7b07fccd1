"""The trainers' callbacks against the real packages: a Lightning ``Trainer.fit`` (gradient
accumulation, clipping, bf16-mixed on CPU) and a ``transformers.Trainer`` (AdamW, a tiny BERT
built from a config, no download), each ~20 steps, each logging to TensorBoard (read back with
tensorboard's reader) and saving the run where the trainer keeps its logs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import neural_mechanics as nm

from helpers import bn_mlp, digits
from integration_reference import expected_scalars

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(folder: Path) -> dict[int, dict[str, float]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith("neural_mechanics/"):
            for e in acc.Scalars(tag):
                out.setdefault(e.step, {})[tag] = e.value
    return out


def _check_logged(logged: dict[int, dict[str, float]], run) -> None:
    assert logged
    for step, values in logged.items():
        expected = expected_scalars(run, step)
        assert set(values) == set(expected), step
        for tag, value in values.items():
            assert value == pytest.approx(expected[tag], rel=2e-6, abs=1e-12), (step, tag)


# -- Lightning -------------------------------------------------------------------------------------
pl = pytest.importorskip("pytorch_lightning")


class DigitsModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = bn_mlp((16,))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _digits_loader():
    x, y = digits(flatten=True)
    ds = torch.utils.data.TensorDataset(x[:640], y[:640])
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_lightning_fit_with_accumulation_clipping_and_bf16(tmp_path):
    from neural_mechanics.integrations.lightning import NeuralMechanicsCallback

    callback = NeuralMechanicsCallback()
    trainer = pl.Trainer(
        max_steps=20,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        precision="bf16-mixed",
        accelerator="cpu",
        default_root_dir=str(tmp_path),
        log_every_n_steps=5,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(DigitsModule(), _digits_loader())
    run = callback.run
    assert run is not None and run.optimizer == "SGD"
    assert len(run.step_index) == 21 and int(run.step_index[-1]) == trainer.global_step == 20  # one row per optimizer step
    # The gradient measured is the one applied (after accumulation and clipping): the exact
    # ledger reproduces the measured charges.
    assert run.summary()["exact_max"].max() < 1e-5
    # saved where the trainer logs, readable without torch
    assert callback.path == Path(trainer.log_dir) / "neural_mechanics.nmrun"
    again = nm.load_run(callback.path)
    np.testing.assert_array_equal(again.array("measured"), run.array("measured"))
    # logged through the trainer's logger (TensorBoardLogger) every log_every_n_steps
    logged = _scalars(Path(trainer.log_dir))
    assert sorted(logged) == [0, 5, 10, 15]
    _check_logged(logged, run)


def test_lightning_names_its_limitations(tmp_path):
    from neural_mechanics.integrations.lightning import NeuralMechanicsCallback

    class NoForward(DigitsModule):
        def training_step(self, batch, batch_idx):  # never calls self(...)
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    callback = NeuralMechanicsCallback()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", default_root_dir=str(tmp_path), callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(NoForward(), _digits_loader())  # training goes on
    assert any("example_input_array" in str(w.message) for w in caught)
    assert callback.run is None and trainer.global_step == 3

    # with the module's example_input_array, the groups are found before the first step
    module = NoForward()
    module.example_input_array = digits(flatten=True)[0][:4]
    callback = NeuralMechanicsCallback(filename=None)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", default_root_dir=str(tmp_path), callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, _digits_loader())
    assert callback.run is not None and len(callback.run.step_index) == 4 and callback.path is None


# -- Hugging Face ----------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 256):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (n, 12), generator=g)
        self.labels = self.ids[:, 0] % 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _tiny_bert():
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3, max_position_embeddings=32, hidden_act="relu"
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def test_huggingface_trainer_with_adamw(tmp_path):
    from neural_mechanics.integrations.huggingface import NeuralMechanicsCallback

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=20,
        per_device_train_batch_size=8,
        logging_steps=5,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-3,
        weight_decay=0.01,
    )
    callback = NeuralMechanicsCallback()
    trainer = transformers.Trainer(model=_tiny_bert(), args=args, train_dataset=TokenDataset(), callbacks=[callback])
    trainer.train()
    run = callback.run
    assert run is not None and run.optimizer == "AdamW"  # the Trainer's default, unwrapped from accelerate
    # the classifier's columns and the embeddings (translation), the attention and ReLU units and
    # the LayerNorm gains (rescale), the post-LN residual stream (scale): docs/theory.md §2b
    assert set(run.groups.symmetry) == {"translation", "scale", "rescale"}
    assert len(run.step_index) == 21
    assert run.summary()["exact_max"].max() < 1e-5  # bookkeeping of the measured AdamW update
    assert callback.path == tmp_path / "neural_mechanics.nmrun" and nm.load_run(callback.path).optimizer == "AdamW"
    # through on_log, at logging_steps: the newest row (step n = global_step - 1)
    logged = _scalars(tmp_path / "runs" / "neural_mechanics")
    assert sorted(logged) == [4, 9, 14, 19]
    _check_logged(logged, run)
    history = [h for h in trainer.state.log_history if any(k.startswith("neural_mechanics/") for k in h)]
    assert len(history) >= 4 and "loss" in history[0]


def test_huggingface_names_unsupported_reports(tmp_path):
    from neural_mechanics.integrations.huggingface import NeuralMechanicsCallback

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    callback = NeuralMechanicsCallback(filename=None)
    trainer = transformers.Trainer(model=_tiny_bert(), args=args, train_dataset=TokenDataset(32), callbacks=[callback])
    trainer.args.report_to = ["mlflow"]  # as if it were installed: the callback says it does not write there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model, optimizer=None)
    assert any("the Trainer handed no model or no torch optimizer" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("report_to 'mlflow'" in str(w.message) for w in caught)
    assert callback.run is not None and callback.path is None
