"""Test-only Lightning callbacks, instantiated from the command line by the end-to-end tests."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class SigtermAtStep(pl.Callback):
    """Send this process a real SIGTERM after the given global step, as a cluster pre-emption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class NanInBatch(pl.Callback):
    """Turn the images of one batch of one phase ("train", "val" or "test") into NaN, as a corrupt file would.

    The batch tensor is changed in place, so every callback holding the batch sees the poisoned values.
    """

    def __init__(self, phase: str, batch_idx: int = 0) -> None:
        self.phase, self.batch_idx = phase, batch_idx

    def _poison(self, phase: str, batch, batch_idx: int) -> None:
        if phase == self.phase and batch_idx == self.batch_idx:
            batch[0].fill_(float("nan"))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._poison("train", batch, batch_idx)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._poison("val", batch, batch_idx)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._poison("test", batch, batch_idx)
