"""The shared selective-state-space layers: per-route SSM parameters and the SS2D mixer."""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernel import scan_routes
from .scan_patterns import CrossScan, ScanPattern
from .ssm import ScanCall, chosen_backend, observed, position_gaps, selective_scan


def resolve_dt_rank(dt_rank: Union[int, str], d_model: int) -> int:
    """Mamba's ``dt_rank="auto"`` rule: ceil(d_model / 16)."""
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


class RouteSSM(nn.Module):
    """K independent selective-scan parameter sets applied to K route sequences in one scan call.

    Each route k has its own input projection to (dt, B, C), its own low-rank dt projection and
    bias, its own A (S4D-real init) and skip D. Storing them stacked with a leading K axis makes the
    projections one einsum each and lets the K routes run as the groups of a single grouped
    selective scan -- the layout VMamba's checkpoints use.

    Args:
        d_inner: channels per route.
        num_routes: K, the number of routes (and of parameter sets).
        d_state: N, the SSM state size per channel.
        dt_rank: rank of the dt projection.
        dt_min, dt_max: range of the initial step size (log-uniform).
        dt_init_floor: smallest initial step size.
        dt_scale: scale of the dt projection's uniform init.
        scan_backend: selective-scan backend (see ``backbones.ssm``).
    """

    def __init__(self, d_inner: int, num_routes: int, d_state: int, dt_rank: int, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        self.d_inner, self.num_routes, self.d_state, self.dt_rank = d_inner, num_routes, d_state, dt_rank
        self.scan_backend = scan_backend
        self.x_proj_weight = nn.Parameter(torch.empty(num_routes, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(num_routes, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(num_routes, d_inner))
        self.A_logs = nn.Parameter(torch.empty(num_routes * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(num_routes * d_inner))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.reset_parameters(dt_min, dt_max, dt_init_floor, dt_scale)

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                         dt_scale: float = 1.0) -> None:
        """Mamba's initialisation, all in one place.

        x_proj as nn.Linear would be; dt_proj weight uniform in +-dt_rank^-0.5; dt bias the inverse
        softplus of a step drawn log-uniformly in [dt_min, dt_max]; A = -(1..N) (S4D-real); D = 1.
        """
        bound = self.d_inner ** -0.5
        self.x_proj_weight.uniform_(-bound, bound)
        dt_bound = self.dt_rank ** -0.5 * dt_scale
        self.dt_projs_weight.uniform_(-dt_bound, dt_bound)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        states = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(torch.log(states).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def _parameter_sets(self, routes: slice, num_routes: int, channels: int) -> tuple[Tensor, ...]:
        """x_proj and dt_proj weights, A = -exp(A_log), D and dt bias of the parameter sets ``routes``."""
        A_logs = self.A_logs.view(self.num_routes, self.d_inner, self.d_state)[routes].flatten(0, 1)
        if A_logs.shape[0] != num_routes * channels:
            raise ValueError(f"got {num_routes} routes of {channels} channels for parameter sets {routes} "
                             f"of a RouteSSM with {self.num_routes} routes of {self.d_inner} channels")
        Ds = self.Ds.view(self.num_routes, self.d_inner)[routes].flatten()
        return (self.x_proj_weight[routes], self.dt_projs_weight[routes], -torch.exp(A_logs.float()), Ds,
                self.dt_projs_bias[routes].flatten())

    def forward(self, xs: Tensor, routes: slice = slice(None), positions: Optional[Tensor] = None) -> Tensor:
        """(batch, K', d_inner, length) -> same shape.

        ``routes`` picks the K' parameter sets the input routes use (all K by default). Route groups
        of different lengths (e.g. a full- and a half-resolution scan) thus share one stacked
        parameter layout and run as separate calls. ``positions`` (batch, K', length): for pruned
        sequences, each route's tokens' unpruned indices (``selective_scan``'s aligned scan).
        """
        batch, num_routes, channels, length = xs.shape
        x_proj, dt_proj, A, Ds, dt_bias = self._parameter_sets(routes, num_routes, channels)
        projected = torch.einsum("bkdl,kcd->bkcl", xs, x_proj)
        dts, Bs, Cs = torch.split(projected, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_proj)
        ys = selective_scan(
            xs.reshape(batch, num_routes * channels, length),
            dts.reshape(batch, num_routes * channels, length),
            A,
            Bs.contiguous(),
            Cs.contiguous(),
            D=Ds,
            delta_bias=dt_bias,
            delta_softplus=True,
            backend=self.scan_backend,
            positions=positions,
        )
        return ys.reshape(batch, num_routes, channels, length)

    def uses_fused_routes(self, x: Tensor) -> bool:
        """Whether scans of ``x`` run on the fused CPU kernel, which reads routes in place (``forward_pixels``).

        False while torch.fx traces ``x``: the traced graph takes the route-copy path, whose ``selective_scan``
        (an FX leaf) still picks the backend, the kernel included, when the graph runs."""
        if isinstance(x, torch.fx.Proxy):
            return False
        return chosen_backend(self.scan_backend, x) == "fused"

    def scan_map(self, x: Tensor, pattern: ScanPattern, routes: slice = slice(None), merge: bool = True) -> Tensor:
        """Scan ``pattern``'s routes of the map x (batch, d_inner, *spatial) and merge them back.

        Returns (batch, d_inner, *spatial), or with ``merge=False`` the route outputs (batch, K', d_inner,
        length). This is ``pattern.merge(self(pattern.scan(x), routes))``, computed without the route
        copies when the scan runs on the fused kernel.
        """
        if self.uses_fused_routes(x):
            return self.forward_pixels(x, pattern, routes, merge)
        ys = self(pattern.scan(x), routes)
        return pattern.merge(ys, x.shape[2:]) if merge else ys

    def forward_pixels(self, x: Tensor, pattern: ScanPattern, routes: slice = slice(None), merge: bool = True,
                       per_route: bool = False, positions: Optional[Tensor] = None,
                       gate: Optional[Tensor] = None) -> Tensor:
        """The routes of ``pattern`` scanned on the fused kernel with every tensor kept in pixel order.

        x is the map (batch, d_inner, *spatial) that every route reads, or with ``per_route`` each route's
        own map in pixel order, (batch, K', d_inner, *spatial). x_proj and dt_proj act on each position
        alone, so they run in pixel order as well; the kernel reads route k's step t at the pixel
        ``pattern.route_table`` names and adds its output back there (times ``pattern.merge_weight``),
        which is exactly scan -> RouteSSM -> merge. Returns the merged (batch, d_inner, *spatial) map (a
        channels-last view), or with ``merge=False`` the route outputs (batch, K', d_inner, length).
        ``positions`` (batch, *spatial): for pruned sequences, each token's unpruned index (the aligned scan,
        as ``forward``'s); each route's gaps follow its own scan order, so a reversed route is still read in place.
        ``gate`` (batch, d_inner, *spatial): every route's output is multiplied by silu(gate) at its pixel
        (Mamba's z branch, applied before the merge).
        """
        spatial = x.shape[3 if per_route else 2:]
        table = pattern.route_table(spatial)
        u = x.flatten(-len(spatial))
        channels = u.shape[-2]
        x_proj, dt_proj, A, Ds, dt_bias = self._parameter_sets(routes, table.shape[0], channels)
        if per_route:
            projected = torch.einsum("bkdp,kcd->bpkc", u, x_proj)
        else:
            if u.stride(1) != 1:  # one copy to channels-last, so that every route reads whole vectors
                u = u.transpose(1, 2).contiguous().transpose(1, 2)
            projected = F.linear(u.transpose(1, 2), x_proj.flatten(0, 1)).unflatten(-1, (table.shape[0], -1))
        dts, Bs, Cs = torch.split(projected, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dts = torch.einsum("bpkr,kdr->bkdp", dts, dt_proj)
        gaps = None
        if positions is not None:
            route_positions = pattern.scan(positions.unsqueeze(1))[:, :, 0]
            gaps = position_gaps(route_positions, table.shape[0]).squeeze(2).float()
        call = ScanCall("fused", u.shape[0], table.shape[0] * channels, table.shape[1], self.d_state, table.shape[0],
                        True, False, u.dtype, u.device, 0.0)
        z = None if gate is None else gate.flatten(-len(spatial))
        y = observed(lambda: scan_routes(u, dts, A, Bs.permute(0, 2, 3, 1), Cs.permute(0, 2, 3, 1), Ds, z,
                                         delta_bias=dt_bias, delta_softplus=True, table=table,
                                         merge_weight=pattern.merge_weight, merged=merge, gaps=gaps), call)
        return y.unflatten(-1, spatial) if merge else y


class SS2D(nn.Module):
    """2-D selective scan mixer with VMamba's parameterisation, on channels-last maps.

    in_proj -> (optional z split) -> depthwise conv -> act -> scan pattern -> RouteSSM -> merge ->
    out_norm -> (times silu(z)) -> out_proj. The released VMamba v2 models drop the z gate
    (``gated=False``); the vanilla v0 models keep it.

    Args:
        d_model: input/output channels.
        d_state: SSM state size N.
        ssm_ratio: expansion of the inner width (d_inner = ssm_ratio * d_model).
        dt_rank: rank of the dt projection, or "auto" for ceil(d_model / 16).
        d_conv: depthwise conv kernel size; below 2 disables the conv.
        conv_bias: whether the depthwise conv has a bias.
        gated: keep Mamba's multiplicative z branch.
        act_layer: activation after the depthwise conv.
        norm_layer: normalisation of the merged scan output.
        pattern: how the map is scanned; VMamba's 4-route cross scan by default.
        dropout: dropout after out_proj.
        scan_backend: selective-scan backend.
        conv_layer: ``d_inner -> module`` building the spatial mixer used in place of the depthwise conv
            (NCHW in and out), e.g. HRVMamba's deformable ``DCNv4``; ``d_conv``/``conv_bias`` are then unused.
    """

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank: Union[int, str] = "auto",
                 d_conv: int = 3, conv_bias: bool = True, gated: bool = True,
                 act_layer: Callable[[], nn.Module] = nn.SiLU,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, pattern: Optional[ScanPattern] = None,
                 dropout: float = 0.0, scan_backend: str = "auto",
                 conv_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        self.gated = gated
        self.in_proj = nn.Linear(d_model, 2 * d_inner if gated else d_inner, bias=False)
        if conv_layer is not None:
            self.conv2d = conv_layer(d_inner)
        else:
            self.conv2d = (nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                     bias=conv_bias) if d_conv > 1 else None)
        self.act = act_layer()
        self.pattern = pattern if pattern is not None else CrossScan()
        self.ssm = RouteSSM(d_inner, self.pattern.num_routes, d_state, resolve_dt_rank(dt_rank, d_model),
                            scan_backend=scan_backend)
        self.out_norm = norm_layer(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(batch, height, width, d_model) -> same shape."""
        x = self.in_proj(x)
        if self.gated:
            x, z = x.chunk(2, dim=-1)
        x = x.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = self.act(x)
        y = self.out_norm(self.ssm.scan_map(x, self.pattern).permute(0, 2, 3, 1))
        if self.gated:
            y = y * F.silu(z)
        return self.dropout(self.out_proj(y))
