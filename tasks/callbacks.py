"""Run artefacts written as training goes: the training/validation curve plot."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only


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
