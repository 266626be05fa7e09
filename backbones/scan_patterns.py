"""Scan patterns: how a feature map becomes K 1-D route sequences, and how K outputs merge back.

A pattern is a small stateless module with two methods that are each other's adjoint:

- ``scan(x)``: (batch, channels, *spatial) -> (batch, K, channels, length)
- ``merge(y, spatial)``: (batch, K, channels, length) -> (batch, channels, *spatial)

Every route position reads one pixel (or padding), and every merge puts each route output back on the
pixel it read, summed and scaled by ``merge_weight``. ``route_table`` derives that pixel index table
from ``scan`` itself; the fused CPU kernel reads and writes routes through it instead of materialising
``scan``'s copies (``RouteSSM.scan_map``).

Everything that differs between families' 2-D selective scans (VMamba's cross scan, Vim's
bidirectional 1-D scan, EfficientVMamba's atrous scan, GroupMamba's one direction per group,
MSVMamba's joined half-resolution routes) is a pattern; the selective-scan parameters and the SS2D
module around them stay the same.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ScanPattern(nn.Module):
    """Base class; subclasses set ``num_routes`` (and ``merge_weight`` if not 1) and implement
    ``scan``/``merge``."""

    num_routes: int
    merge_weight: float = 1.0

    def scan(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def merge(self, y: Tensor, spatial: Sequence[int]) -> Tensor:
        raise NotImplementedError

    def route_table(self, spatial: Sequence[int]) -> Tensor:
        """(num_routes, length) int32 on the CPU: the row-major pixel each route position reads, -1 for padding.

        Scanning a map of pixel numbers gives it, so ``scan`` stays the only description of the routes.
        Cached per spatial size (built afresh, as plain tensor ops, while torch.compile/export trace).
        """
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self._pixel_table(spatial)
        cache = self.__dict__.setdefault("_route_tables", {})
        key = tuple(int(size) for size in spatial)
        if key not in cache:
            cache[key] = self._pixel_table(spatial)
        return cache[key]

    def _pixel_table(self, spatial: Sequence[int]) -> Tensor:
        with torch.inference_mode(False):  # a table built under inference_mode could not be saved for backward
            numbers = torch.arange(1, math.prod(spatial) + 1).reshape(1, 1, *spatial)
            return (self.scan(numbers)[0, :, 0] - 1).to(torch.int32).contiguous()

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
    merge_weight = 0.5

    def scan(self, x: Tensor) -> Tensor:
        return torch.stack((x, x.flip(-1)), dim=1)

    def merge(self, y: Tensor, spatial: Sequence[int]) -> Tensor:
        return 0.5 * (y[:, 0] + y[:, 1].flip(-1))


class AtrousScan(ScanPattern):
    """EfficientVMamba's atrous selective scan (ES2D, step 2).

    The map is zero-padded at the bottom/right to even height and width and split into its four 2x2
    polyphase sub-grids; each sub-grid is one route of length ceil(H/2) * ceil(W/2), in the order
    the official checkpoints index their parameters:

    0. even rows, even columns, row-major
    1. odd rows, even columns, column-major
    2. even rows, odd columns, row-major
    3. odd rows, odd columns, column-major

    Every pixel is scanned exactly once, so ``merge`` scatters each route back to its own pixels
    (no summation) and crops the padding. The routes are a quarter as long as a cross scan's, which
    is where the model's savings come from.
    """

    num_routes = 4

    def scan(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        x = F.pad(x, (0, width % 2, 0, height % 2))
        grid = x.reshape(batch, channels, (height + 1) // 2, 2, (width + 1) // 2, 2)
        routes = (grid[:, :, :, 0, :, 0], grid[:, :, :, 1, :, 0].transpose(2, 3),
                  grid[:, :, :, 0, :, 1], grid[:, :, :, 1, :, 1].transpose(2, 3))
        return torch.stack([route.flatten(2) for route in routes], dim=1)

    def merge(self, y: Tensor, spatial: Sequence[int]) -> Tensor:
        height, width = spatial
        rows, cols = (height + 1) // 2, (width + 1) // 2
        batch, _, channels, _ = y.shape
        even_even = y[:, 0].reshape(batch, channels, rows, cols)
        odd_even = y[:, 1].reshape(batch, channels, cols, rows).transpose(2, 3)
        even_odd = y[:, 2].reshape(batch, channels, rows, cols)
        odd_odd = y[:, 3].reshape(batch, channels, cols, rows).transpose(2, 3)
        # (b, c, rows, 2, cols, 2): index [i, p, j, q] is pixel (2i + p, 2j + q).
        even_rows = torch.stack((even_even, even_odd), dim=-1)
        odd_rows = torch.stack((odd_even, odd_odd), dim=-1)
        grid = torch.stack((even_rows, odd_rows), dim=3)
        return grid.reshape(batch, channels, 2 * rows, 2 * cols)[:, :, :height, :width]


class RouteConcat(ScanPattern):
    """Some routes of another pattern joined end to end into ONE route.

    MSVMamba scans three directions of its half-resolution map as one long sequence with a single
    parameter set, so the state carries over from one direction into the next.

    The inner pattern only says which pixel each route position reads: scanning a map of pixel
    numbers gives those indices, so ``scan`` is a single gather of the chosen routes and ``merge``
    its adjoint, a single scatter-add (for sum-merging patterns such as ``CrossScan`` this is the
    inner merge of just the chosen routes). Positions the inner pattern fills with padding read zero.

    Args:
        pattern: a pattern whose routes gather pixels (each route value is one pixel or padding).
        routes: indices of the inner routes, in sequence order.
    """

    num_routes = 1

    def __init__(self, pattern: ScanPattern, routes: Sequence[int]) -> None:
        super().__init__()
        if not routes or len(set(routes)) != len(routes) or not all(0 <= r < pattern.num_routes for r in routes):
            raise ValueError(f"routes must be distinct indices below {pattern.num_routes}, got {routes}")
        self.pattern = pattern
        self.routes = tuple(routes)

    def _sources(self, spatial: Sequence[int], device: torch.device) -> Tensor:
        """Pixel index + 1 read by each position of the joined route (0 = padding), shape (length,)."""
        return (self.pattern.route_table(spatial)[list(self.routes)].flatten().long() + 1).to(device)

    def scan(self, x: Tensor) -> Tensor:
        flat = F.pad(x.flatten(2), (1, 0))
        return flat.index_select(2, self._sources(x.shape[2:], x.device)).unsqueeze(1)

    def merge(self, y: Tensor, spatial: Sequence[int]) -> Tensor:
        batch, _, channels, _ = y.shape
        out = y.new_zeros(batch, channels, math.prod(spatial) + 1)
        out = out.index_add(2, self._sources(spatial, y.device), y[:, 0])
        return out[:, :, 1:].reshape(batch, channels, *spatial)

    def extra_repr(self) -> str:
        return f"routes={self.routes}"


class RouteTable(ScanPattern):
    """Routes given as tables of source pixels, each route scanned forwards and then reversed.

    ``routes(height, width)`` returns an ``(R, height * width)`` integer tensor whose row r lists the row-major
    pixel read at each step of route r; every row must visit each pixel exactly once. The pattern scans
    K = 2R sequences in MHS-VM's order: route 0, route 0 reversed, route 1, route 1 reversed, ... Any route
    shape (snake, zigzag, spiral) is then one gather to scan and one gather by the inverse table to bring a
    route's outputs back to row-major order (``unscan``); ``merge`` is its adjoint, the sum of the unscanned
    routes. The tables are built once per map size and device and kept (not saved with the weights).

    Args:
        routes: ``(height, width) -> (R, height * width)`` source pixels of the R base routes.
    """

    def __init__(self, routes: Callable[[int, int], Tensor]) -> None:
        super().__init__()
        self.routes = routes
        self.num_routes = 2 * len(routes(1, 1))
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _tables_for(self, spatial: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """(K, L) source pixel of every route position, and (K, L) route position of every pixel.

        While compiling or exporting, tables not yet built in eager mode are built inside the graph (as
        constants to fold), without the permutation check, which is data-dependent, and without caching.
        """
        key = (tuple(spatial), device)
        tables = self._tables.get(key)
        if tables is None:
            compiling = torch.compiler.is_compiling()
            height, width = spatial
            routes = torch.as_tensor(self.routes(height, width), dtype=torch.long, device="cpu")
            pixels = torch.arange(height * width).expand(len(routes), -1)
            if not compiling and (routes.shape != pixels.shape or not torch.equal(routes.sort(dim=1).values, pixels)):
                raise ValueError(f"{getattr(self.routes, '__name__', self.routes)} must give routes that visit each "
                                 f"of the {height}x{width} pixels exactly once, got a table of shape "
                                 f"{tuple(routes.shape)} that does not")
            sources = torch.stack([step for route in routes for step in (route, route.flip(0))])
            tables = (sources.to(device), sources.argsort(dim=1).to(device))
            if not compiling:
                self._tables[key] = tables
        return tables

    def sources(self, spatial: Sequence[int], device: torch.device) -> Tensor:
        """The ``(K, height * width)`` table of the row-major pixel read at each position of each route."""
        return self._tables_for(spatial, device)[0]

    def scan(self, x: Tensor) -> Tensor:
        batch, channels = x.shape[:2]
        sources = self.sources(x.shape[2:], x.device)
        flat = x.flatten(2).index_select(2, sources.flatten())
        return flat.view(batch, channels, *sources.shape).transpose(1, 2)

    def unscan(self, y: Tensor, spatial: Sequence[int]) -> Tensor:
        """(batch, K, channels, length) in route order -> the same outputs with each route in row-major order."""
        positions = self._tables_for(spatial, y.device)[1]
        return y.gather(3, positions[None, :, None].expand_as(y))

    def merge(self, y: Tensor, spatial: Sequence[int]) -> Tensor:
        batch, _, channels, _ = y.shape
        return self.unscan(y, spatial).sum(1).reshape(batch, channels, *spatial)

    def extra_repr(self) -> str:
        return f"routes={getattr(self.routes, '__name__', self.routes)}, num_routes={self.num_routes}"
