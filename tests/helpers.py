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
