"""Scan patterns: how a feature map becomes K 1-D route sequences, and how K outputs merge back.

A pattern is a small stateless module with two methods that are each other's adjoint:

- ``scan(x)``: (batch, channels, *spatial) -> (batch, K, channels, length)
- ``merge(y, spatial)``: (batch, K, channels, length) -> (batch, channels, *spatial)

Everything that differs between families' 2-D selective scans (VMamba's cross scan, Vim's
bidirectional 1-D scan, EfficientVMamba's atrous scan, GroupMamba's one direction per group) is a
pattern; the selective-scan parameters and the SS2D module around them stay the same.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class ScanPattern(nn.Module):
    """Base class; subclasses set ``num_routes`` and implement ``scan``/``merge``."""

    num_routes: int

    def scan(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def merge(self, y: Tensor, spatial: Sequence[int]) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_routes={self.num_routes}"


class CrossScan(ScanPattern):
    """VMamba's 4-route cross scan of a 2-D map.

    Routes, in the order the official checkpoints index their parameters: row-major,
    column-major, reversed row-major, reversed column-major. Merging maps every route back to
    row-major order and sums them, so each pixel sees context from all four directions.
    """

    num_routes = 4

    def scan(self, x: Tensor) -> Tensor:
        rows = x.flatten(2)
        cols = x.transpose(2, 3).flatten(2)
        forward = torch.stack((rows, cols), dim=1)
        return torch.cat((forward, forward.flip(-1)), dim=1)

    def merge(self, y: Tensor, spatial: Sequence[int]) -> Tensor:
        height, width = spatial
        batch, _, channels, _ = y.shape
        forward = y[:, :2] + y[:, 2:].flip(-1)
        rows = forward[:, 0]
        cols = forward[:, 1].reshape(batch, channels, width, height).transpose(2, 3).flatten(2)
        return (rows + cols).reshape(batch, channels, height, width)


class BidirectionalScan(ScanPattern):
    """Vim's bidirectional 1-D scan: the token sequence forwards and reversed.

    ``merge`` averages the two directions (the released Vim models divide their sum by 2).
    """

    num_routes = 2

    def scan(self, x: Tensor) -> Tensor:
        return torch.stack((x, x.flip(-1)), dim=1)

    def merge(self, y: Tensor, spatial: Sequence[int]) -> Tensor:
        return 0.5 * (y[:, 0] + y[:, 1].flip(-1))
