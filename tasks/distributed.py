"""Distributed-strategy factories that need Python objects Hydra cannot write in YAML."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy

import backbones


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False,
                  **kwargs) -> FSDPStrategy:
    """FSDP that wraps every backbone block class as its own unit (and checkpoints it when asked)."""
    blocks = set(backbones.block_classes())
    return FSDPStrategy(auto_wrap_policy=blocks, sharding_strategy=sharding_strategy,
                        activation_checkpointing_policy=blocks if activation_checkpointing else None, **kwargs)
