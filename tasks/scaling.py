"""The effective global batch of a run and the learning rate the linear scaling rule gives for it.

The global batch of one optimiser step is ``batch per device x devices x nodes x accumulated batches``. Recipes
state their learning rate per 512 images (``${linear_lr:base,batch,devices,nodes,accumulation}``), so the rate
follows that product. ``linear_lr_arguments`` reads the resolver's arguments back from a config, which lets the run
log (``effective_batch_report``) and the reproduction cards (``tools/cards.py``) show the base rate and the batch it
was scaled for, and warn when the trainer actually runs another batch (``devices: auto`` counts GPUs, which a
CPU trainer does not use).
"""

from __future__ import annotations

import logging
import re
from typing import Any, NamedTuple, Optional, Union

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("mambalab")

REFERENCE_BATCH = 512
LINEAR_LR = re.compile(r"^\$\{linear_lr:(?P<args>.*)\}$", re.S)


def count_devices(devices: Union[int, str, list, tuple]) -> int:
    """Devices per node as the trainer config gives them: an int, "auto"/-1 (all visible GPUs, 1 without CUDA),
    a list of device indices or a "0,1" string."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, int) and devices != -1:
        return devices
    if str(devices) in ("auto", "-1"):
        import torch

        return max(1, torch.cuda.device_count())
    return len([d for d in str(devices).split(",") if d.strip()])


def global_batch(batch_size: int, devices: Union[int, str, list, tuple] = 1, num_nodes: int = 1,
                 accumulate: int = 1) -> int:
    """Samples per optimiser step: ``batch_size x devices x num_nodes x accumulate``."""
    return int(batch_size) * count_devices(devices) * int(num_nodes) * int(accumulate)


class LinearLR(NamedTuple):
    """The arguments of a ``${linear_lr:...}`` learning rate, resolved."""

    base_lr: float
    batch_size: int
    devices: Any
    num_nodes: int
    accumulate: int
    reference_batch: int

    @property
    def global_batch(self) -> int:
        return global_batch(self.batch_size, self.devices, self.num_nodes, self.accumulate)

    @property
    def lr(self) -> float:
        return self.base_lr * self.global_batch / self.reference_batch


def split_arguments(text: str) -> list[str]:
    """Split a resolver's argument string at the commas outside nested ``${...}`` interpolations."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return parts + [current.strip()]


def linear_lr_arguments(cfg: DictConfig, key: str = "optimizer.lr") -> Optional[LinearLR]:
    """The resolved arguments of ``key`` when it is a ``${linear_lr:...}`` interpolation, else None."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return None
    raw = OmegaConf.to_container(parent, resolve=False)[leaf]
    match = LINEAR_LR.match(raw) if isinstance(raw, str) else None
    if match is None:
        return None
    probe = cfg.copy()
    with open_dict(probe):
        probe["_linear_lr_arguments"] = split_arguments(match["args"])
    values = list(probe["_linear_lr_arguments"])
    defaults = [None, None, None, 1, 1, REFERENCE_BATCH]
    values += defaults[len(values):]
    return LinearLR(float(values[0]), int(values[1]), values[2], int(values[3]), int(values[4]), int(values[5]))


def effective_batch_report(cfg: DictConfig, batch_size: int, devices: int, num_nodes: int, accumulate: int) -> str:
    """The run log's line on the global batch of one optimiser step and the learning rate; warns (and says so in
    the line) when the config's ``linear_lr`` scaled the rate for another batch than the trainer runs."""
    total = global_batch(batch_size, devices, num_nodes, accumulate)
    line = (f"effective global batch {total} = {batch_size} per device x {devices} device(s) x {num_nodes} node(s) "
            f"x {accumulate} accumulated batch(es)")
    lr = OmegaConf.select(cfg, "optimizer.lr")
    scaling = linear_lr_arguments(cfg)
    if scaling is None:
        return f"{line}; lr {lr:g} (not scaled with the batch)" if lr is not None else line
    line += f"; lr {scaling.lr:g} = {scaling.base_lr:g} x {scaling.global_batch} / {scaling.reference_batch}"
    if scaling.global_batch != total:
        log.warning("linear_lr scaled the learning rate for a global batch of %d, but the trainer runs %d per step "
                    "(devices it really uses x nodes x accumulation); give trainer.devices as the number of devices "
                    "used, or set optimizer.lr directly", scaling.global_batch, total)
        line += f" -- for a batch of {scaling.global_batch}, not {total}"
    return line
