"""Test-only helpers: Lightning callbacks the end-to-end tests instantiate from the command line, and
checks shared by several test files."""

from __future__ import annotations

import os
import signal
from types import ModuleType
from typing import Iterable

import lightning.pytorch as pl
import torch

GRADIENT_NOISE_FLOOR = 1e-6
"""Relative size below which a gradient entry may be float32 rounding of a quantity that is zero by
construction (rounding is ~1e-7 of the terms summed); anything above it is a real dependence."""


class SigtermAtStep(pl.Callback):
    """Send this process a real SIGTERM after the given global step, as a cluster pre-emption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def parameters_reached(parameters: Iterable[torch.nn.Parameter]) -> float:
    """Fraction of ``parameters`` whose gradient is a real signal: max |grad| above the noise floor relative
    to the largest gradient entry of all of them (a parameter without a gradient counts as not reached)."""
    peaks = [p.grad.abs().max().item() if p.grad is not None else 0.0 for p in parameters]
    if not peaks or max(peaks) == 0:
        return 0.0
    return sum(peak > GRADIENT_NOISE_FLOOR * max(peaks) for peak in peaks) / len(peaks)


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


def record_calls(monkeypatch, module: ModuleType, name: str) -> list:
    """Wrap ``module.name`` so that every call still runs it and appends its first argument's shape to the
    returned list: which code path a model took (e.g. a fused kernel op as its caller's module sees it)."""
    original = getattr(module, name)
    calls = []

    def recorded(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(module, name, recorded)
    return calls
