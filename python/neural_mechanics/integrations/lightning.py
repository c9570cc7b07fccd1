"""Lightning: ``NeuralMechanicsCallback`` tracks a ``Trainer.fit`` (docs/integrations.md).

    trainer = pl.Trainer(max_steps=1000, callbacks=[NeuralMechanicsCallback()])
    trainer.fit(module, loader)             # the run: callback.run, and <log_dir>/neural_mechanics.nmrun

At the start of training (``on_train_start``: after the sanity check, whose eval-mode forward
would hide BatchNorm's scale groups) the callback attaches ``nm.track`` to the LightningModule and
the trainer's first optimizer, logging through every logger of the trainer (``log_metrics`` at
``log_every`` steps, the trainer's ``log_every_n_steps`` by default). At the end of training it
closes the tracker (the final row, the summary table and the report's figures to the loggers)
and saves the run into the trainer's ``log_dir``.

Lightning runs ``optimizer.step(closure)``: the tracker measures right after the closure (forward,
backward, gradient clipping) and before the update, so ``accumulate_grad_batches`` (one step per
optimizer step), ``gradient_clip_val`` (the clipped gradient is the one applied) and
``precision="bf16-mixed"`` (float32 parameters) are tracked as they are applied.

The groups come from ``symmetries=``, else from ``example_input=`` or the module's
``example_input_array``, else from the first forward of the LightningModule itself (a
``training_step`` that never calls ``self(...)`` needs one of the first two).

Limitations, each named in a warning when met: only the first optimizer is tracked; under
``DDPStrategy`` only global rank 0 tracks (its gradients are all-reduced before the step, so its
run is the global one), which has not been tested with more than one process here; sharded
strategies (FSDP, DeepSpeed, model parallel, XLA) are not supported and leave the run untracked.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError

try:  # the package that installs Lightning either way (`lightning` depends on it)
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import lightning.pytorch as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise MissingDependencyError(
            "neural_mechanics.integrations.lightning needs pytorch_lightning (or lightning): pip install 'neural-mechanics[lightning]'"
        ) from exc

SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy", "SingleDeviceXLAStrategy", "XLAFSDPStrategy")


def _warn(message: str) -> None:
    warnings.warn(f"neural_mechanics NeuralMechanicsCallback: {message}", UserWarning, stacklevel=3)


class NeuralMechanicsCallback(pl.Callback):
    """Tracks the symmetry charges of a Lightning ``Trainer.fit`` (see the module docstring).

    Args:
        symmetries: the groups (``nm.find_symmetries`` / ``nm.declare``); None finds them.
        example_input: what the LightningModule is called with, to find the groups before the
            first step (default: its ``example_input_array``, else its first forward).
        log_every: steps between logged scalars (default: the trainer's ``log_every_n_steps``).
        log_histograms, log_figures: as in ``nm.track``.
        filename: the saved run's name in the trainer's ``log_dir`` (None: not saved).
        **track_kwargs: passed to ``nm.track`` (``every``, ``record_every``, ``memory_limit``...).

    After fitting: ``callback.run`` (the Run) and ``callback.path`` (where it was saved).
    """

    def __init__(
        self,
        *,
        symmetries: Any = None,
        example_input: Any = None,
        log_every: int | None = None,
        log_histograms: bool = False,
        log_figures: bool = True,
        filename: str | None = "neural_mechanics.nmrun",
        **track_kwargs: Any,
    ):
        super().__init__()
        self.symmetries, self.example_input = symmetries, example_input
        self.log_every, self.log_histograms, self.log_figures = log_every, log_histograms, log_figures
        self.filename, self.track_kwargs = filename, track_kwargs
        self.tracker: Any = None
        self.run: Any = None
        self.path: Path | None = None

    # -- attach --------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        import neural_mechanics as nm

        self._finish_quietly()
        strategy = {c.__name__ for c in type(trainer.strategy).__mro__}
        if strategy & set(SHARDED):
            _warn(f"{type(trainer.strategy).__name__} shards the parameters, which this callback does not support: the run is not tracked")
            return
        if trainer.world_size > 1:
            if trainer.global_rank != 0:
                return
            _warn(
                f"{type(trainer.strategy).__name__} with {trainer.world_size} processes: tracking on global rank 0 only "
                "(gradients are all-reduced before the step, so its run is the global one); not tested with several processes"
            )
        if not trainer.optimizers:
            _warn("the trainer has no optimizer: nothing to track")
            return
        if len(trainer.optimizers) > 1:
            _warn(f"the trainer has {len(trainer.optimizers)} optimizers: tracking the first one only")
        optimizer = _torch_optimizer(trainer.optimizers[0])
        symmetries = self.symmetries
        if symmetries is None:
            example = self.example_input if self.example_input is not None else getattr(pl_module, "example_input_array", None)
            if example is not None:
                from lightning_fabric.utilities.apply_func import move_data_to_device

                symmetries = nm.find_symmetries(pl_module, move_data_to_device(example, pl_module.device))
        from .loggers import LightningSink

        self.tracker = nm.track(
            pl_module,
            optimizer,
            symmetries,
            log_to=[LightningSink(logger) for logger in trainer.loggers] or None,
            log_every=self.log_every or max(1, int(trainer.log_every_n_steps)),
            log_histograms=self.log_histograms,
            log_figures=self.log_figures,
            **self.track_kwargs,
        )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        t = self.tracker
        if t is not None and t._path is None and not t._closed:
            _warn(
                "the first optimizer step came before any forward pass of the LightningModule (its training_step does "
                "not call self(...)): set example_input_array, or pass example_input= or symmetries=; the run is not tracked"
            )
            t.close()
            self.tracker = None

    # -- detach --------------------------------------------------------------------------------
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(trainer)  # what was recorded until the error is kept

    def _finish(self, trainer: Any) -> None:
        folder = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank asks
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            return
        tracker.close()
        if tracker._run is None:
            _warn("no optimizer step was tracked: no run to save")
            return
        self.run = tracker.run
        if self.filename:
            os.makedirs(folder, exist_ok=True)
            self.path = self.run.save(os.path.join(folder, self.filename))

    def _finish_quietly(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


def _torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's (or a wrapper's) ``.optimizer`` (or None)."""
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
