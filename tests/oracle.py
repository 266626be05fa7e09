"""Independent per-element references for parity tests: a float64 sequential selective scan written from the
recurrence, and DCNv4's aggregation one output pixel, group and kernel point at a time."""

from __future__ import annotations

import math

import torch


def _float64_steps(u, delta, A, B, C, delta_bias, delta_softplus):
    """The inputs in float64, delta turned into the step size (bias added, softplus applied)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.where(delta > 20, delta, torch.log1p(torch.exp(delta)))
    return u, delta, A, B, C


def oracle_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Step-by-step float64 evaluation of h_t = exp(dt A) h + dt B u, y = C h + D u (times silu z)."""
    u, delta, A, B, C = _float64_steps(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, channels, length = u.shape
    groups = 1 if B.dim() == 3 else B.shape[1]
    per_group = channels // groups
    y = torch.zeros(batch, channels, length, dtype=torch.float64)
    for b in range(batch):
        for d in range(channels):
            g = d // per_group
            Bd = B[b] if B.dim() == 3 else B[b, g]
            Cd = C[b] if C.dim() == 3 else C[b, g]
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(length):
                dt = delta[b, d, t]
                h = torch.exp(dt * A[d]) * h + dt * Bd[:, t] * u[b, d, t]
                out = (Cd[:, t] * h).sum()
                if D is not None:
                    out = out + D[d].double() * u[b, d, t]
                if z is not None:
                    zt = z[b, d, t].double()
                    out = out * zt / (1 + math.exp(-zt))
                y[b, d, t] = out
    return y


def oracle_aligned_scan(u, delta, A, B, C, positions, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The pruning-aware aligned scan (Zhan et al., NeurIPS 2024) stepped over the UNPRUNED sequence in float64.

    ``positions`` (batch, length) are the kept tokens' unpruned indices, increasing (ungrouped B/C). Every
    unpruned index from the first kept one to the last is visited: a kept index runs the ordinary step with
    its own dt, a pruned index only decays the state, exp(dt_prev A) h, with dt_prev the step of the last
    kept token before it (it has no token, hence no input); outputs are read at kept indices.
    """
    u, delta, A, B, C = _float64_steps(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, channels, length = u.shape
    y = torch.zeros(batch, channels, length, dtype=torch.float64)
    for b in range(batch):
        kept = {int(p): t for t, p in enumerate(positions[b])}
        first, last = int(positions[b, 0]), int(positions[b, -1])
        for d in range(channels):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            dt_prev = None
            for index in range(first, last + 1):
                if index not in kept:
                    h = torch.exp(dt_prev * A[d]) * h
                    continue
                t = kept[index]
                dt = delta[b, d, t]
                h = torch.exp(dt * A[d]) * h + dt * B[b, :, t] * u[b, d, t]
                dt_prev = dt
                out = (C[b, :, t] * h).sum()
                if D is not None:
                    out = out + D[d].double() * u[b, d, t]
                if z is not None:
                    zt = z[b, d, t].double()
                    out = out * zt / (1 + torch.exp(-zt))  # differentiable in z
                y[b, d, t] = out
    return y


def oracle_dcnv4(value, offset_mask, group, kernel_size, stride, pad, dilation, offset_scale, remove_center):
    """DCNv4 as its CUDA kernel computes it: one output pixel, group and kernel point at a time."""
    batch, height, width, channels = value.shape
    per_group = channels // group
    out_h, out_w = offset_mask.shape[1:3]
    points = [(i, j) for i in range(kernel_size) for j in range(kernel_size)
              if not (remove_center and i == kernel_size // 2 and j == kernel_size // 2)]
    half = dilation * (kernel_size - 1) // 2
    out = torch.zeros(batch, out_h, out_w, channels, dtype=value.dtype)
    for n in range(batch):
        for yo in range(out_h):
            for xo in range(out_w):
                for g in range(group):
                    base = g * 3 * len(points)
                    for p, (i, j) in enumerate(points):
                        dx = float(offset_mask[n, yo, xo, base + 2 * p])
                        dy = float(offset_mask[n, yo, xo, base + 2 * p + 1])
                        weight = offset_mask[n, yo, xo, base + 2 * len(points) + p]
                        x = xo * stride - pad + half - half * offset_scale + (i * dilation + dx) * offset_scale
                        y = yo * stride - pad + half - half * offset_scale + (j * dilation + dy) * offset_scale
                        if not (-1 < x < width and -1 < y < height):
                            continue
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, xx, corner in ((y0, x0, (1 - (y - y0)) * (1 - (x - x0))),
                                               (y0, x0 + 1, (1 - (y - y0)) * (x - x0)),
                                               (y0 + 1, x0, (y - y0) * (1 - (x - x0))),
                                               (y0 + 1, x0 + 1, (y - y0) * (x - x0))):
                            if 0 <= yy < height and 0 <= xx < width:
                                out[n, yo, xo, g * per_group:(g + 1) * per_group] += (
                                    weight * corner * value[n, yy, xx, g * per_group:(g + 1) * per_group])
    return out
