"""Training data order that can be resumed exactly, even from a checkpoint saved mid-epoch.

The sampler's order depends only on (seed, epoch), so it does not matter which process drew it,
and the data module's checkpoint state says how many samples finished training batches consumed,
so a resumed run skips exactly those. Lightning restores a data module's state before it asks for
the training loader, which is why the state lives on the data module and not on the loader.

Under a distributed sampler Lightning replaces the sampler; mid-epoch resumes then restart the
epoch's data order (Lightning warns), while epoch-boundary resumes stay exact.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .evaluation import evaluation_loader


class EpochShuffleSampler(Sampler):
    """Yields indices in an order fixed by ``(seed, epoch)``; can skip a prefix once.

    With ``keys_with_epoch`` it yields ``(epoch, index)`` keys instead: datasets that read the epoch
    from the key can seed their per-sample augmentation, which makes the augmentation as
    reproducible as the order. Lightning calls ``set_epoch`` every epoch.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, keys_with_epoch: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.keys_with_epoch = size, seed, shuffle, keys_with_epoch
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Union[int, tuple[int, int]]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        skip, self.skip = self.skip, 0
        indices = order[skip:].tolist()
        return ((self.epoch, index) for index in indices) if self.keys_with_epoch else iter(indices)

    def __len__(self) -> int:
        return self.size


class ResumableTrainData:
    """LightningDataModule mixin: a resumable training loader and the checkpoint state behind it."""

    trainer: Any
    batch_size: int
    seed: int
    _train_sampler: Optional[EpochShuffleSampler] = None
    _resume_state: Optional[dict[str, int]] = None

    def resumable_loader(self, dataset: Dataset, keys_with_epoch: bool = True, **loader_kwargs: Any) -> DataLoader:
        """A training DataLoader over an ``EpochShuffleSampler``, positioned where a checkpoint left off."""
        sampler = EpochShuffleSampler(len(dataset), self.seed, keys_with_epoch=keys_with_epoch)
        if self._resume_state:
            sampler.set_epoch(self._resume_state["epoch"])
            sampler.skip = self._resume_state["samples_done"]
            self._resume_state = None
        self._train_sampler = sampler
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **loader_kwargs)

    def state_dict(self) -> dict[str, int]:
        """Epoch and samples consumed by finished training batches; an epoch's end points at the next one."""
        if self.trainer is None or self._train_sampler is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if done >= self.trainer.num_training_batches:
            return {"epoch": self._train_sampler.epoch + 1, "samples_done": 0}
        return {"epoch": self._train_sampler.epoch, "samples_done": done * self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_state = dict(state) if state else None


def seed_for(seed: int, epoch: int, index: int) -> int:
    """A per-sample, per-epoch seed for augmentation."""
    return (seed * 1_000_003 + epoch) * 2_147_483_647 + index


class SplitLoaders(ResumableTrainData):
    """LightningDataModule mixin for datamodules with ``datasets["train"|"val"]``: the resumable training loader
    and the evaluation loaders (val serves test) with one set of loader options.

    ``collate_fn``: the batch collation (None: torch's default); ``drop_last_train``: full training batches only.
    """

    collate_fn: Optional[Callable] = None
    drop_last_train: bool = False
    datasets: dict[str, Dataset]
    num_workers: int
    pin_memory: bool
    val_batch_size: int

    def _loader_kwargs(self) -> dict:
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=self.collate_fn,
                    persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(self.datasets["train"], drop_last=self.drop_last_train, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self.datasets["val"], self.val_batch_size, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
