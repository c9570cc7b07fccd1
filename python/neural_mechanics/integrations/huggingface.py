"""Hugging Face: ``NeuralMechanicsCallback``, a ``TrainerCallback`` for ``transformers.Trainer``.

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[NeuralMechanicsCallback()])
    trainer.train()                         # the run: callback.run, and <output_dir>/neural_mechanics.nmrun

At ``on_train_begin`` the callback takes the Trainer's model and optimizer (AdamW by default; the
torch optimizer inside accelerate's wrapper). The groups are found at the first forward pass, from
the model's main input (``model.main_input_name``, e.g. ``input_ids``: the Trainer calls models
with keyword arguments), unless ``symmetries=`` is given. Any optimizer other than
torch.optim.SGD is measured through its applied update (docs/tracking.md): ``exact`` is
bookkeeping of the update, ``paper`` the paper's form applied to it (docs/theory.md §5.5), and
the effective learning rate of scale groups is
η/|θ_A| (docs/theory.md §5.4).

Logging goes through ``on_log``, at the Trainer's ``logging_steps``: the scalars of the newest
tracked row (integrations/scalars.py) are written to the destinations of ``args.report_to``
that neural-mechanics can write to — ``"tensorboard"`` (a SummaryWriter of its own in
``<output_dir>/runs/neural_mechanics``, or under ``$TENSORBOARD_LOGGING_DIR``, so TensorBoard
pointed at ``<output_dir>/runs`` shows it next to the Trainer's run) and ``"wandb"`` (the run
the Trainer's WandbCallback started) — or to ``log_to=`` when given, and they are added to the
Trainer's ``state.log_history`` (kept in ``trainer_state.json``). At ``on_train_end``: the final
row, the summary table and the report's figures, and the run saved into ``args.output_dir``.

Limitations, each named in a warning when met: other ``report_to`` integrations (mlflow, comet,
...) get nothing (the scalars stay in ``log_history``); DeepSpeed and FSDP shard the parameters
and are not supported (the run is not tracked); with several processes (DDP) only the main
process tracks (its gradients are all-reduced before the step), which has not been tested here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise MissingDependencyError(
        "neural_mechanics.integrations.huggingface needs transformers: pip install 'neural-mechanics[huggingface]'"
    ) from exc

SUPPORTED_REPORTS = ("tensorboard", "wandb")


def _warn(message: str) -> None:
    warnings.warn(f"neural_mechanics NeuralMechanicsCallback: {message}", UserWarning, stacklevel=3)


class NeuralMechanicsCallback(TrainerCallback):
    """Tracks the symmetry charges of a ``transformers.Trainer`` run (see the module docstring).

    Args:
        symmetries: the groups (``nm.find_symmetries`` / ``nm.declare``); None finds them at
            the first forward pass.
        log_to: where to log instead of ``args.report_to`` (as ``nm.track``'s ``log_to``).
        log_histograms, log_figures: as in ``nm.track``.
        filename: the saved run's name in ``args.output_dir`` (None: not saved).
        **track_kwargs: passed to ``nm.track`` (``every``, ``record_every``, ``memory_limit``...).

    After training: ``callback.run`` (the Run) and ``callback.path`` (where it was saved).
    """

    def __init__(
        self,
        *,
        symmetries: Any = None,
        log_to: Any = None,
        log_histograms: bool = False,
        log_figures: bool = True,
        filename: str | None = "neural_mechanics.nmrun",
        **track_kwargs: Any,
    ):
        self.symmetries, self.log_to = symmetries, log_to
        self.log_histograms, self.log_figures = log_histograms, log_figures
        self.filename, self.track_kwargs = filename, track_kwargs
        self.tracker: Any = None
        self.run: Any = None
        self.path: Path | None = None
        self._loggers: list[Any] = []
        self._hook: Any = None

    # -- attach --------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        self._detach()
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            _warn("DeepSpeed / FSDP shard the parameters, which this callback does not support: the run is not tracked")
            return
        if getattr(args, "world_size", 1) > 1:
            if not state.is_world_process_zero:
                return
            _warn(f"{args.world_size} processes: tracking on the main process only (gradients are all-reduced before the step); not tested with several processes")
        optimizer = _torch_optimizer(optimizer)
        if model is None or optimizer is None:
            _warn("the Trainer handed no model or no torch optimizer to the callback: the run is not tracked")
            return
        from .loggers import Logger, sinks_for

        sinks = sinks_for(self.log_to) if self.log_to is not None else self._report_sinks(args)
        self._loggers = [Logger(s, every=None, histograms=self.log_histograms, figures=self.log_figures) for s in sinks]
        if self.symmetries is not None:
            self._attach(model, optimizer, self.symmetries)
        else:  # the Trainer calls model(**inputs): find the groups from the first call's main input
            self._hook = model.register_forward_pre_hook(lambda m, a, kw: self._discover(m, optimizer, a, kw), with_kwargs=True)

    def _report_sinks(self, args: Any) -> list[Any]:
        from .loggers import TensorBoardSink, WandbSink

        sinks: list[Any] = []
        for name in list(getattr(args, "report_to", None) or []):
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                base = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
                sinks.append(TensorBoardSink(SummaryWriter(log_dir=os.path.join(base, "neural_mechanics")), owned=True))
            elif name == "wandb":
                import wandb

                if wandb.run is None:
                    _warn("report_to includes wandb but no wandb run is active: nothing is logged to wandb")
                else:
                    sinks.append(WandbSink(wandb.run))
            else:
                _warn(f"report_to {name!r}: not supported by neural-mechanics (only {SUPPORTED_REPORTS}); the scalars stay in state.log_history")
        return sinks

    def _discover(self, model: Any, optimizer: Any, args: tuple, kwargs: dict) -> None:
        import neural_mechanics as nm

        self._hook.remove()
        self._hook = None
        if args:
            example: Any = args
        else:
            main = getattr(model, "main_input_name", "input_ids")
            value = kwargs.get(main)
            if value is None:
                _warn(f"the model was called without its main input {main!r}: pass symmetries=; the run is not tracked")
                return
            example = (value,)
        self._attach(model, optimizer, nm.find_symmetries(model, example))

    def _attach(self, model: Any, optimizer: Any, symmetries: Any) -> None:
        import neural_mechanics as nm

        self.tracker = nm.track(model, optimizer, symmetries, **self.track_kwargs)
        for logger in self._loggers:
            self.tracker.observe(logger)

    # -- log -----------------------------------------------------------------------------------
    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        observers = None if self.tracker is None else self.tracker._observers
        if observers is None or observers.watcher is None or observers.watcher.row is None:
            return
        watcher = observers.watcher
        for logger in list(self._loggers):
            if logger in observers.items and logger.logged_step != watcher.step:
                observers._call(logger, "log", watcher.step, watcher)
        if state.log_history:
            state.log_history[-1].update(watcher.scalars())

    # -- detach --------------------------------------------------------------------------------
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tracker = self.tracker
        self._detach()
        if tracker is None:
            return
        if tracker._run is None:
            _warn("no optimizer step was tracked: no run to save")
            return
        self.run = tracker.run
        if self.filename and state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            self.path = self.run.save(os.path.join(args.output_dir, self.filename))

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.tracker is not None:
            self.tracker.close()  # closes the loggers too (the table and the figures)
            self.tracker = None
        else:
            for logger in self._loggers:
                logger.sink.close()
        self._loggers = []


def _torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or None)."""
    import torch

    # accelerate's AcceleratedOptimizer subclasses torch.optim.Optimizer without being one: unwrap
    # every ``.optimizer`` that is a torch optimizer.
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


__all__ = ["NeuralMechanicsCallback"]
