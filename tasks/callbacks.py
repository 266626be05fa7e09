"""Run callbacks: curve plot, readable epoch logs, checkpoint on interrupt, non-finite guard."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("mambalab")


def plot_metrics_csv(metrics_csv: Path, out_png: Path) -> Path:
    """Plot every ``*/loss`` and ``*/acc`` series of a Lightning ``metrics.csv`` against the step."""
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
            series = frame[["step", column]].dropna()
            ax.plot(series["step"], series[column], marker="o" if len(series) < 30 else None, label=column)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
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


class CheckpointOnInterrupt(pl.Callback):
    """Save ``last.ckpt`` when training is stopped by SIGTERM (cluster pre-emption) or Ctrl+C.

    Lightning turns SIGTERM into an exception raised between batches, so the checkpoint holds a
    consistent state and ``ckpt_path=<run>/checkpoints/last.ckpt`` resumes at the next batch. A
    Ctrl+C can land inside a step; that checkpoint is saved too but may repeat the interrupted batch.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)
            log.warning("interrupted by %s: saved %s; resume with ckpt_path=%s",
                        type(exception).__name__, self.path, self.path)


class NonFiniteGuard(pl.Callback):
    """Stop training at the first non-finite activation, naming the module that produced it.

    Forward hooks watch every module's tensor output during training; when one turns NaN/Inf, or the
    loss does, the batch is saved to ``<dump_dir>/nonfinite_batch.pt`` for inspection and training
    stops before the backward pass with a ``FloatingPointError`` naming the first such module.
    Costs one ``isfinite`` reduction per module output.
    """

    def __init__(self, dump_dir: str) -> None:
        self.dump_dir = Path(dump_dir)
        self.handles: list = []
        self.first_bad: Optional[str] = None
        self.batch = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def watch(name: str):
            def hook(module, inputs, output) -> None:
                if self.first_bad is None and isinstance(output, torch.Tensor) and output.is_floating_point() \
                        and not torch.isfinite(output).all():
                    self.first_bad = f"{name} ({type(module).__name__})"
            return hook

        self.handles = [module.register_forward_hook(watch(name or "<root>"))
                        for name, module in pl_module.named_modules()]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch,
                             batch_idx: int) -> None:
        self.batch = batch

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.first_bad is None and torch.isfinite(loss).all():
            return
        culprit = self.first_bad or "the loss (all module outputs were finite)"
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        dump = self.dump_dir / "nonfinite_batch.pt"
        torch.save({"batch": self.batch, "global_step": trainer.global_step}, dump)
        raise FloatingPointError(f"non-finite values first produced by {culprit} at step {trainer.global_step}; "
                                 f"batch saved to {dump}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
