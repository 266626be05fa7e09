"""Evaluation loaders that count every sample exactly once, on one process or many.

Lightning's default distributed sampler pads the last shard with repeated samples so that every process gets
the same number of batches; during validation and testing those repeats are scored twice and shift dataset-level
metrics. ``evaluation_loader`` gives each process one contiguous block of the dataset instead (blocks may differ
by one sample), so gathering the processes' metric states in rank order restores the dataset order: per-sample
lists (COCO detections, per-case rows) come out as on one process.

Uneven shards are safe for evaluation: DDP synchronises buffers only on the first forward pass without
gradients, and metrics synchronise once per epoch. Every process needs at least one sample.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sized

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def distributed_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, or ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's contiguous block: the first ``size % world_size`` ranks get one extra sample."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class ContiguousShardSampler(DistributedSampler):
    """Sequential indices of one contiguous block of the dataset per process, without padding or shuffling.

    A ``DistributedSampler`` subclass, so Lightning keeps it instead of substituting its padded sampler.
    Refuses a dataset smaller than the number of processes (an empty process would stall the others'
    first collective call), naming both numbers.
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        if len(dataset) < self.num_replicas:
            raise ValueError(f"the evaluation set has {len(dataset)} samples, fewer than the {self.num_replicas} "
                             f"processes evaluating it; evaluate on fewer devices")
        self.start, self.stop = shard_bounds(len(dataset), self.rank, self.num_replicas)
        self.num_samples = self.stop - self.start
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.num_samples


def evaluation_loader(dataset: Dataset, batch_size: int, **loader_kwargs: Any) -> DataLoader:
    """A validation/test DataLoader in dataset order; under a process group, each process's contiguous block."""
    _, world_size = distributed_world()
    sampler = ContiguousShardSampler(dataset) if world_size > 1 else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, **loader_kwargs)
