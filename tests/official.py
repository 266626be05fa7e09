"""Official checkpoint layouts and forwards, written from the official repositories for the tests.

Layouts are state dicts (or key mappings) under the names and shapes the official module trees give; the
Vim forward is the released models' maths in float64. The family tests load them strictly into our models
and the converter tests run them through ``tools.convert``; nothing here is downloaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests.oracle import oracle_selective_scan

# The scaled-down Vim of the layout below: token width, blocks, SSM state size (Vim-Ti's structure otherwise).
VIM_DIM, VIM_DEPTH, VIM_D_STATE = 8, 2, 3


def _stem_shapes(c0: int, overlapping: bool, patch_names: tuple = ("0", "2")) -> dict:
    """The VMamba code base's stem (MSVMamba's too): the patch-4 conv and norm under ``patch_embed.<name>``,
    or the v2 overlapping stem (``patch_embed.{0,2,5,7}``: conv, norm, conv, norm)."""
    if not overlapping:
        conv, norm = (f"patch_embed.{name}" for name in patch_names)
        return {f"{conv}.weight": (c0, 3, 4, 4), f"{conv}.bias": (c0,), f"{norm}.weight": (c0,), f"{norm}.bias": (c0,)}
    return {"patch_embed.0.weight": (c0 // 2, 3, 3, 3), "patch_embed.0.bias": (c0 // 2,),
            "patch_embed.2.weight": (c0 // 2,), "patch_embed.2.bias": (c0 // 2,),
            "patch_embed.5.weight": (c0, c0 // 2, 3, 3), "patch_embed.5.bias": (c0,),
            "patch_embed.7.weight": (c0,), "patch_embed.7.bias": (c0,)}


def _downsample_shapes(prefix: str, c: int, out: int, merging: bool) -> dict:
    """The VMamba code base's downsampling: patch merging (``reduction``, ``norm``) or v2's conv (``1``) and
    norm (``3``)."""
    if merging:
        return {prefix + "reduction.weight": (out, 4 * c), prefix + "norm.weight": (4 * c,),
                prefix + "norm.bias": (4 * c,)}
    return {prefix + "1.weight": (out, c, 3, 3), prefix + "1.bias": (out,), prefix + "3.weight": (out,),
            prefix + "3.bias": (out,)}


def _ssm_block_shapes(prefix: str, c: int, d: int, routes: int, d_state: int, norm: str = "norm",
                      op: str = "op") -> dict:
    """A VMamba-code block's pre-norm and its 2-D scan's per-route SSM parameters and output norm."""
    rank = math.ceil(c / 16)
    return {prefix + f"{norm}.weight": (c,), prefix + f"{norm}.bias": (c,),
            prefix + f"{op}.x_proj_weight": (routes, rank + 2 * d_state, d),
            prefix + f"{op}.dt_projs_weight": (routes, d, rank), prefix + f"{op}.dt_projs_bias": (routes, d),
            prefix + f"{op}.A_logs": (routes * d, d_state), prefix + f"{op}.Ds": (routes * d,),
            prefix + f"{op}.out_norm.weight": (d,), prefix + f"{op}.out_norm.bias": (d,)}


def vmamba_official(depths, dims, d_state, ssm_ratio, gated, conv_bias, mlp_ratio, generation, num_classes,
                    meta=False) -> dict:
    """An official VMamba state dict: v0 release names (``patch_embed.proj``, ``ln_1``, ``self_attention``,
    ``layers.i.downsample.reduction``, ``norm``, ``head``) or v2 release names (``patch_embed.{0,2,5,7}``,
    ``norm``/``op``/``norm2``/``mlp``, ``layers.i.downsample.{1,3}``, ``classifier.{norm,head}``)."""
    g = torch.Generator().manual_seed(0)
    shapes = _stem_shapes(dims[0], generation != "v0", ("proj", "norm"))
    norm, op = ("ln_1", "self_attention") if generation == "v0" else ("norm", "op")
    for i, (depth, c) in enumerate(zip(depths, dims)):
        d = int(ssm_ratio * c)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update(_ssm_block_shapes(p, c, d, 4, d_state, norm, op))
            shapes.update({p + f"{op}.in_proj.weight": (2 * d if gated else d, c),
                           p + f"{op}.conv2d.weight": (d, 1, 3, 3), p + f"{op}.out_proj.weight": (c, d)})
            if conv_bias:
                shapes[p + f"{op}.conv2d.bias"] = (d,)
            if mlp_ratio:
                hidden = int(mlp_ratio * c)
                shapes.update({p + "norm2.weight": (c,), p + "norm2.bias": (c,), p + "mlp.fc1.weight": (hidden, c),
                               p + "mlp.fc1.bias": (hidden,), p + "mlp.fc2.weight": (c, hidden),
                               p + "mlp.fc2.bias": (c,)})
        if i + 1 < len(dims):
            shapes.update(_downsample_shapes(f"layers.{i}.downsample.", c, dims[i + 1], generation == "v0"))
    head = ("norm", "head") if generation == "v0" else ("classifier.norm", "classifier.head")
    shapes.update({f"{head[0]}.weight": (dims[-1],), f"{head[0]}.bias": (dims[-1],),
                   f"{head[1]}.weight": (num_classes, dims[-1]), f"{head[1]}.bias": (num_classes,)})
    if meta:
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def msvmamba_official(depths, dims, ssm_ratio, d_state, generation, gated, ffn_ratio, num_classes=1000):
    """An official-layout state dict, written from the official module structure (names and shapes)."""
    g = torch.Generator().manual_seed(0)
    shapes = _stem_shapes(dims[0], generation != "v1")
    for i, (depth, c) in enumerate(zip(depths, dims)):
        d, hidden = int(ssm_ratio * c), int(ffn_ratio * c)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update(_ssm_block_shapes(p, c, d, 2, d_state))
            shapes.update({
                p + "op.se.fc.0.weight": (d // 8, d), p + "op.se.fc.2.weight": (d, d // 8),
                p + "op.in_proj.weight": (2 * d if gated else d, c),
                p + "op.conv2d.weight": (d, 1, 3, 3), p + "op.conv2d.bias": (d,),
                p + "op.conv2d_b1.weight": (d, 1, 7, 7), p + "op.conv2d_b1.bias": (d,),
                p + "op.out_proj.weight": (c, d), p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                p + "convFFN.linear1.weight": (hidden, c, 1, 1), p + "convFFN.linear1.bias": (hidden,),
                p + "convFFN.dwc.weight": (hidden, 1, 3, 3), p + "convFFN.dwc.bias": (hidden,),
                p + "convFFN.linear2.weight": (c, hidden, 1, 1), p + "convFFN.linear2.bias": (c,),
            })
        if i + 1 < len(dims):
            shapes.update(_downsample_shapes(f"layers.{i}.downsample.", c, dims[i + 1], generation == "v1"))
    shapes.update({"classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],),
                   "classifier.head.weight": (num_classes, dims[-1]), "classifier.head.bias": (num_classes,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def efficientvmamba_official(depths, dims, d_state=16, ssm_ratio=2.0, num_classes=1000):
    """A released-layout state dict, written from the official module structure (names and shapes)."""
    g = torch.Generator().manual_seed(0)
    bn = lambda p, c: {p + "weight": (c,), p + "bias": (c,), p + "running_mean": (c,), p + "running_var": (c,),  # noqa: E731
                       p + "num_batches_tracked": ()}
    shapes = {"patch_embed.0.weight": (dims[0], 3, 4, 4), "patch_embed.0.bias": (dims[0],),
              "patch_embed.2.weight": (dims[0],), "patch_embed.2.bias": (dims[0],)}
    for i, (depth, c) in enumerate(zip(depths, dims)):
        if i < 2:
            d = int(ssm_ratio * c)
            for j in range(depth):
                p = f"layers.{i}.blocks.{j}."
                shapes.update(_ssm_block_shapes(p, c, d, 4, d_state))
                shapes.update({
                    p + "op.in_proj.weight": (2 * d, c),
                    p + "op.conv2d.weight": (d, 1, 3, 3), p + "op.conv2d.bias": (d,), p + "op.out_proj.weight": (c, d),
                    p + "conv_branch.0.weight": (c, 1, 3, 3), p + "conv_branch.0.bias": (c,),
                    p + "conv_branch.3.weight": (c, c, 1, 1), p + "conv_branch.3.bias": (c,),
                    p + "se.norm.weight": (c,), p + "se.norm.bias": (c,),
                    p + "se.global_reduce.weight": (c // 8, c), p + "se.global_reduce.bias": (c // 8,),
                    p + "se.channel_select.weight": (c, c // 8), p + "se.channel_select.bias": (c,),
                    **bn(p + "conv_branch.1.", c),
                })
            down = f"layers.{i}.downsample."
        else:
            mid = 4 * c
            for j in range(1, depth + 1):
                p = f"layers.{i}.{j}."
                shapes.update({
                    p + "conv_pw.0.weight": (mid, c, 1, 1), **bn(p + "conv_pw.1.", mid),
                    p + "conv_dw.0.weight": (mid, 1, 3, 3), **bn(p + "conv_dw.1.", mid),
                    p + "se.conv_reduce.weight": (mid // 8, mid, 1, 1), p + "se.conv_reduce.bias": (mid // 8,),
                    p + "se.conv_expand.weight": (mid, mid // 8, 1, 1), p + "se.conv_expand.bias": (mid,),
                    p + "conv_pw2.0.weight": (c, mid, 1, 1), **bn(p + "conv_pw2.1.", c),
                })
            down = f"layers.{i}.{depth + 2}."
        if i + 1 < len(dims):
            shapes.update({down + "reduction.weight": (dims[i + 1], 4 * c), down + "norm.weight": (4 * c,),
                           down + "norm.bias": (4 * c,)})
    shapes.update({"classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],),
                   "classifier.head.weight": (num_classes, dims[-1]), "classifier.head.bias": (num_classes,)})
    return {k: (torch.randn(s, generator=g) if s else torch.tensor(7)) for k, s in shapes.items()}


def groupmamba_official_key(key: str) -> str:
    """Our key -> the official one, written out from the official module tree (inverse of the rules)."""
    stem = {"conv1": "conv.0", "bn1": "conv.1", "conv2": "conv.3", "bn2": "conv.4", "conv3": "conv.6", "bn3": "conv.7"}
    parts = key.split(".")
    if parts[0] == "stem":
        return "patch_embed1." + ".".join([stem.get(parts[1], parts[1]), *parts[2:]])
    if parts[0] == "stages":
        stage = int(parts[1]) + 1
        if parts[2] == "downsample":
            return f"patch_embed{stage}." + ".".join([{"conv": "proj"}.get(parts[3], parts[3]), *parts[4:]])
        if parts[2] == "norm":
            return f"norm{stage}." + ".".join(parts[3:])
        prefix, rest = f"block{stage}.{parts[3]}.", parts[4:]
    elif parts[0] == "cls_block":
        prefix, rest = "post_network.0.", parts[1:]
    else:
        return {"norm": "norm4", "head_dist": "dist_head"}.get(parts[0], parts[0]) + "." + ".".join(parts[1:])
    if rest[0] == "mixer":
        rest[0] = "attn"
        if rest[1] == "groups":
            rest = ["attn", f"mamba_g{int(rest[2]) + 1}", *[p for p in rest[3:] if p != "ssm"]]
        elif rest[1] == "affinity":
            rest = ["attn", *rest[2:]]
    if rest[:2] == ["mlp", "dwconv"]:
        rest = ["mlp", "dwconv", "dwconv", *rest[2:]]
    return prefix + ".".join(rest)


def hrvmamba_official_key(key: str) -> str:
    """Our key -> the official one (inverse of the rules, written out from the official DVSS block)."""
    parts = key.split(".")
    if "branches" not in parts:
        return key
    at = parts.index("branches") + 3  # stageN.m.branches.b.k.<block part>
    head, rest = parts[:at], parts[at:]
    if rest[:2] == ["local", "norm"]:
        rest = ["norm0", *rest[2:]]
    elif rest[:2] == ["local", "convs"]:
        rest = ["conv2d", *rest[2:]]
    elif rest[0] == "norm1":
        rest = ["norm", *rest[1:]]
    elif rest[0] == "mixer":
        rest = ["op", *[p for p in rest[1:] if p != "ssm"]]
    return ".".join(head + rest)


def vim_official(num_classes: int = 5, grid: int = 2, seed: int = 0) -> dict:
    """Random weights under the released checkpoints' key names and shapes (Vim-Ti layout, scaled down)."""
    g = torch.Generator().manual_seed(seed)
    d_inner, rank = 2 * VIM_DIM, 1  # dt_rank = ceil(VIM_DIM / 16)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    sd = {"cls_token": rand(1, 1, VIM_DIM), "pos_embed": rand(1, grid * grid + 1, VIM_DIM),
          "patch_embed.proj.weight": rand(VIM_DIM, 3, 16, 16, scale=0.05), "patch_embed.proj.bias": rand(VIM_DIM),
          "head.weight": rand(num_classes, VIM_DIM), "head.bias": rand(num_classes), "norm_f.weight": 1 + rand(VIM_DIM)}
    for i in range(VIM_DEPTH):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1 + rand(VIM_DIM)
        sd[p + "mixer.in_proj.weight"] = rand(2 * d_inner, VIM_DIM)
        sd[p + "mixer.out_proj.weight"] = rand(VIM_DIM, d_inner)
        for suffix in ("", "_b"):
            sd[p + f"mixer.conv1d{suffix}.weight"] = rand(d_inner, 1, 4)
            sd[p + f"mixer.conv1d{suffix}.bias"] = rand(d_inner)
            sd[p + f"mixer.x_proj{suffix}.weight"] = rand(rank + 2 * VIM_D_STATE, d_inner)
            sd[p + f"mixer.dt_proj{suffix}.weight"] = rand(d_inner, rank)
            sd[p + f"mixer.dt_proj{suffix}.bias"] = rand(d_inner) - 2.0
        s4d_real = torch.log(torch.arange(1, VIM_D_STATE + 1.0)).repeat(d_inner, 1)
        sd[p + "mixer.A_log"] = s4d_real + rand(d_inner, VIM_D_STATE)
        sd[p + "mixer.A_b_log"] = s4d_real + rand(d_inner, VIM_D_STATE)
        sd[p + "mixer.D"] = 1 + rand(d_inner)
        sd[p + "mixer.D_b"] = 1 + rand(d_inner)
    return sd


def vim_reference_mixer(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """The released models' v2 bidirectional mixer in float64: per direction its own causal conv, x/dt
    projections, A and D on the (reversed, for the backward one) sequence, each gated by silu(z) of its
    own order, the backward output flipped back, the sum halved, then out_proj."""
    w = {k[len(prefix):]: v.double() for k, v in sd.items() if k.startswith(prefix)}
    x = x.double()
    xz = x @ w["in_proj.weight"].T
    u, z = xz.chunk(2, dim=-1)
    u, z = u.transpose(1, 2), z.transpose(1, 2)
    d_inner = u.shape[1]

    def direction(u, z, b):
        conv = F.conv1d(F.pad(u, (3, 0)), w[f"conv1d{b}.weight"], w[f"conv1d{b}.bias"], groups=d_inner)
        conv = F.silu(conv)
        x_dbl = torch.einsum("cd,bdl->bcl", w[f"x_proj{b}.weight"], conv)
        rank = w[f"dt_proj{b}.weight"].shape[1]
        dt = torch.einsum("dr,brl->bdl", w[f"dt_proj{b}.weight"], x_dbl[:, :rank])
        B, C = x_dbl[:, rank: rank + VIM_D_STATE], x_dbl[:, rank + VIM_D_STATE:]
        A = -torch.exp(w["A_log" if not b else "A_b_log"])
        return oracle_selective_scan(conv, dt, A, B, C, D=w["D" if not b else "D_b"], z=z,
                                     delta_bias=w[f"dt_proj{b}.bias"], delta_softplus=True)

    y = (direction(u, z, "") + direction(u.flip(-1), z.flip(-1), "_b").flip(-1)) / 2
    return y.transpose(1, 2) @ w["out_proj.weight"].T


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()


def vim_reference_model(sd: dict, images: torch.Tensor) -> torch.Tensor:
    """The released classifier in float64: patches, class token at the middle, position embedding,
    Add -> Norm -> Mixer blocks, final add + norm, the middle token to the head."""
    tokens = F.conv2d(images.double(), sd["patch_embed.proj.weight"].double(), sd["patch_embed.proj.bias"].double(),
                      stride=16).flatten(2).transpose(1, 2)
    middle = tokens.shape[1] // 2
    cls = sd["cls_token"].double().expand(tokens.shape[0], -1, -1)
    hidden = torch.cat((tokens[:, :middle], cls, tokens[:, middle:]), dim=1) + sd["pos_embed"].double()
    residual = None
    for i in range(VIM_DEPTH):
        residual = hidden if residual is None else residual + hidden
        hidden = vim_reference_mixer(sd, f"layers.{i}.mixer.", _rms_norm(residual, sd[f"layers.{i}.norm.weight"]))
    final = _rms_norm(residual + hidden, sd["norm_f.weight"])
    return final[:, middle] @ sd["head.weight"].double().T + sd["head.bias"].double()
