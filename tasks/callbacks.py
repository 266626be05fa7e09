"""Run callbacks: curve plot, readable epoch logs, the run's checkpoints (also on interrupt), non-finite guard."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .run_dir import open_new

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("mambalab")


def metric_history(frame: "pd.DataFrame", column: str) -> "pd.DataFrame":
    """One metric's ``(step, value)`` rows from a ``metrics.csv`` frame, one row per step, in step order.

    A run resumed into its own folder from an earlier checkpoint logs some steps again; the rows written
    last (the resumed attempt's) are the history.
    """
    series = frame[["step", column]].dropna()
    return series.drop_duplicates("step", keep="last").sort_values("step", kind="stable")


def plot_metrics_csv(metrics_csv: Path, out_png: Path) -> Path:
    """Plot every ``*/loss`` and ``*/acc`` series of a Lightning ``metrics.csv`` against the step.

    The image is written beside ``out_png`` and renamed into place, so a kill never leaves half a picture.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.read_csv(metrics_csv)
    panels = [("loss", [c for c in frame.columns if c.endswith("/loss") or c.endswith("/loss_epoch")]),
              ("accuracy", [c for c in frame.columns if c.endswith("/acc")])]
    panels = [(title, cols) for title, cols in panels if cols]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    for ax, (title, columns) in zip(axes[0], panels):
        for column in columns:
            series = metric_history(frame, column)
            ax.plot(series["step"], series[column], marker="o" if len(series) < 30 else None, label=column)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    temporary = out_png.with_name(f".{out_png.name}.{os.getpid()}.tmp.png")
    fig.savefig(temporary, dpi=100)
    plt.close(fig)
    os.replace(temporary, out_png)
    return out_png


class CurvePlotter(pl.Callback):
    """After fitting and testing, save ``curves.png`` beside the CSV logger's ``metrics.csv``."""

    def __init__(self, filename: str = "curves.png") -> None:
        self.filename = filename

    @rank_zero_only
    def _plot(self, trainer: pl.Trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
                metrics_csv = Path(logger.log_dir) / "metrics.csv"
                if metrics_csv.exists():
                    plot_metrics_csv(metrics_csv, Path(trainer.default_root_dir) / self.filename)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plot(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plot(trainer)


class EpochSummary(pl.Callback):
    """Log one readable line of metrics per epoch, so logs and CI output show progress without a TTY."""

    @staticmethod
    def _summarise(trainer: pl.Trainer, prefixes: tuple[str, ...]) -> str:
        metrics = trainer.callback_metrics
        return "  ".join(f"{name}={float(value):.4f}" for name, value in sorted(metrics.items())
                         if name.startswith(prefixes) and not name.endswith("_step"))

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log.info("epoch %d  %s", trainer.current_epoch, self._summarise(trainer, ("train/", "val/")))

    @rank_zero_only
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log.info("test  %s", self._summarise(trainer, ("test/",)))


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the run's newest state.

    Two Lightning behaviours left ``last.ckpt`` stale. It writes ``last`` only when a best-k checkpoint was
    written at the same step, so epochs that do not improve the monitored metric were never saved. And it
    writes ``last-v1.ckpt`` beside an existing ``last.ckpt`` unless the restored checkpoint names that file as
    its last one, which a resumed run's checkpoint often does not (one saved on SIGTERM before the first
    validation, or a best-k one). Here ``last.ckpt`` is rewritten wherever Lightning considers saving (each
    validation, or each epoch end) and at the end of training, after the best-k save (atomically, through the
    trainer's checkpoint IO). Best-k files keep Lightning's rules and
    ``-v1`` naming, so nothing else is written over.
    """

    newest_step: Optional[int] = None

    def last_checkpoint_path(self) -> str:
        """Where this callback writes the run's newest state."""
        return self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.save_last:
            self.last_model_path = self.last_checkpoint_path()

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self.newest_step = trainer.global_step

    def _save_newest(self, trainer: pl.Trainer) -> None:
        if self.save_last and self.newest_step != trainer.global_step \
                and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # else the best-k save comes at epoch end, first
            self._save_newest(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_newest(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_newest(trainer)


class CheckpointOnInterrupt(pl.Callback):
    """Save the newest state when training is stopped by SIGTERM (cluster pre-emption) or Ctrl+C.

    The file is the run's ``last.ckpt``: the one the ``ModelCheckpoint`` callback writes as its last (and is
    told it wrote), or ``<dirpath>/<filename>`` when there is no such callback. Lightning turns SIGTERM into
    an exception raised between batches, so the checkpoint holds a consistent state and resuming from it
    continues at the next batch. A Ctrl+C can land inside a step; that checkpoint is saved too but may repeat
    the interrupted batch. ``saved_path`` is the file written, None until then.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.saved_path: Optional[Path] = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.state.fn != "fit":
            return
        path = self.path
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last and checkpoint.dirpath:
            path = Path(checkpoint.format_checkpoint_name({}, checkpoint.CHECKPOINT_NAME_LAST))
            checkpoint.last_model_path = str(path)  # part of the saved state: a resume keeps writing this file
        trainer.save_checkpoint(path)
        self.saved_path = path
        log.warning("interrupted by %s: saved %s", type(exception).__name__, path)


class NonFiniteGuard(pl.Callback):
    """Stop at the first NaN/Inf activation or loss, naming where it came from, and save the batch.

    Forward hooks watch every module's tensor output in training, validation and testing (one ``isfinite``
    reduction per module output). At the first non-finite output, or a non-finite training loss, the batch
    that produced it is saved to a new file ``<dump_dir>/nonfinite_<phase>_step<step>_batch<index>.pt``
    (never over an earlier dump) and a ``FloatingPointError`` names the phase (train, val, test), the global
    step, the epoch, the batch index and the first module that produced it.
    """

    PHASES = {"train": "train", "validation": "val", "test": "test"}

    def __init__(self, dump_dir: str) -> None:
        self.dump_dir = Path(dump_dir)
        self.handles: list = []
        self.phase: Optional[str] = None
        self.batch, self.batch_idx = None, -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.handles:
            return

        def watch(name: str):
            def hook(module: torch.nn.Module, inputs, output) -> None:
                if self.phase is not None and isinstance(output, torch.Tensor) and output.is_floating_point() \
                        and not torch.isfinite(output).all():
                    self._stop(trainer, f"{name} ({type(module).__name__})")
            return hook

        self.handles = [module.register_forward_hook(watch(name or "<root>"))
                        for name, module in pl_module.named_modules()]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _enter(self, trainer: pl.Trainer, hook: str, batch, batch_idx: int) -> None:
        phase = self.PHASES[hook]
        self.phase = f"{phase} (sanity check)" if trainer.sanity_checking else phase
        self.batch, self.batch_idx = batch, batch_idx

    def _leave(self, *args, **kwargs) -> None:
        self.phase, self.batch = None, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._enter(trainer, "train", batch, batch_idx)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._enter(trainer, "validation", batch, batch_idx)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._enter(trainer, "test", batch, batch_idx)

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _leave

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            self._stop(trainer, "the loss (every module output was finite)")

    def _stop(self, trainer: pl.Trainer, culprit: str) -> None:
        phase, step, index = self.phase or "train", trainer.global_step, self.batch_idx
        rank = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        name = f"nonfinite_{phase.split()[0]}_step{step}_batch{index}{rank}.pt"
        path, handle = open_new(self.dump_dir / name)
        with handle:
            torch.save({"batch": self.batch, "phase": phase, "global_step": step, "epoch": trainer.current_epoch,
                        "batch_idx": index, "module": culprit}, handle)
        self.phase = None  # report once: the exception unwinds through the other hooks
        raise FloatingPointError(f"non-finite values first produced by {culprit} in {phase} batch {index} "
                                 f"(global step {step}, epoch {trainer.current_epoch}); batch saved to {path}")
