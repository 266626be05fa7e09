"""Benchmark our backbones against timm baselines, the scan formulations, and the scan's share of time.

Four modes (all in one process, interleaved, with the baseline measured in the same run):

``python -m tools.benchmark [--models vmamba_tiny_s1l8,convnext_tiny,...]``
    Per model: parameters, FLOPs, forward and training-step throughput (images/s: warm-up, repeats,
    median; the order of models is rotated every repeat), peak memory, and speed ratios against
    ``--baseline`` (per-repeat ratios, median). FLOPs follow the official VMamba/Mamba convention:
    ``torch.utils.flop_counter`` multiply-adds (counted once, like fvcore's "flops", which is what
    papers call GFLOPs) plus 9*B*L*D*N per selective scan (+B*D*L each for D and z), which
    flop_counter cannot see. Writes ``benchmark.md``, ``benchmark.csv``, ``benchmark.png`` and
    ``benchmark.json`` (with the exact command, threads, allocator, load) to ``--out``.

Token pruning (``backbones.pruning``) is a model suffix: ``--models vim_tiny_patch16_224,vim_tiny_patch16_224+prune=
aligned:0.8,vim_tiny_patch16_224+prune=naive:0.8 --baseline vim_tiny_patch16_224`` times pruned and unpruned Vim in
one run (pruning at the authors' blocks for the family, in both modes; FLOPs count the pruned scans' lengths).

``python -m tools.benchmark --families``
    Every family against the timm model nearest to it in FLOPs: for each of ``--models`` (default: one tiny
    model per family) the baseline is the ``--candidates`` model whose FLOPs (same convention, at its own
    input size) are closest on a log scale; all models and baselines run interleaved in one process and
    each ratio refers to the model's own baseline.

``python -m tools.benchmark --scan``
    Micro-benchmark of the scan formulations (chunked, odd/even, time-major unbind loop, our
    sequential reference, the mamba-ssm-style indexed loop, mamba-ssm's kernel on CUDA and our fused
    CPU kernel where it is built) on VMamba-T stage-1 shapes (or ``--scan-shapes``): forward and
    forward+backward time, and peak memory as a multiple of the (batch, channels, d_state, length)
    fp32 state history.

``python -m tools.benchmark --profile vmamba_tiny_s1l8``
    Where a model's time goes: forward and training step with the real scan vs with the scan
    replaced by a stub (y = D*u, through ``ssm.use_backend``), the time measured inside the scan
    calls (``ssm.observe``), and the top operators of one forward from torch.profiler.

Peak memory on CPU is the peak-RSS increase of one call in a fresh child process (so that other
models' cached memory does not hide it); on CUDA it is ``max_memory_allocated``. Timings on a
shared machine are noisy: read the ratios measured in the same run, and see the recorded load.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import backbones
from backbones import kernel as fused_kernel
from backbones import ssm

DEFAULT_MODELS = ("vmamba_tiny_s1l8", "convnext_tiny", "swin_tiny_patch4_window7_224", "deit_small_patch16_224",
                  "resnet50")
FAMILY_MODELS = ("vim_tiny_patch16_224", "vmamba_tiny_s1l8", "msvmamba_tiny", "efficientvmamba_tiny", "groupmamba_tiny",
                 "hrvmamba_tiny")
TIMM_CANDIDATES = ("deit_tiny_patch16_224", "deit_small_patch16_224", "regnety_008", "efficientnet_b0", "resnet18",
                   "resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "hrnet_w18_small_v2", "hrnet_w18")
DEFAULT_SCAN_SHAPES = ("2x768x3136x1", "8x768x3136x1", "1x768x3136x16", "2x768x3136x16")
SCAN_FORMULATIONS = ("chunked", "oddeven", "unbind", "sequential", "mamba_ref", "mamba_ssm", "fused")
DEFAULT_FORMULATIONS = ("chunked", "oddeven", "unbind", "fused")


# ----------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict:
    """What a number depends on: versions, threads, allocator, device flags, machine load."""
    from tools.doctor import loaded_allocator

    info = {
        "command": "python -m tools.benchmark " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "clock": "cpu" if clock is CLOCKS["cpu"] else "wall", "scan_kernel": fused_kernel.status().reason,
        "allocator": loaded_allocator() or "glibc", "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "device": str(device), "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: elapsed time. ``cpu``: CPU seconds of this process, all threads together; on a machine
shared with other jobs it does not count the time others hold the cores, so 1-thread comparisons stay
meaningful under load (at more threads it also counts OpenMP's spin-waits)."""
clock = CLOCKS["wall"]


def timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Seconds per call of ``fn`` averaged over ``iters`` calls (on the ``--clock`` chosen)."""
    synchronize(device)
    start = clock()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (clock() - start) / iters


def peak_rss_bytes() -> int:
    """This process's peak resident set size since the last reset (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the peak-RSS counter to the current RSS (Linux clear_refs 5); return that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return peak_rss_bytes()


def child_peak_memory(probe: dict) -> Optional[float]:
    """Run ``probe`` in a fresh interpreter and return the peak-RSS increase of its one call (bytes)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, "-m", "tools.benchmark", "--probe", json.dumps(probe)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        print(f"memory probe failed for {probe}: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- scan hooks


def scan_flops_of(model: torch.nn.Module, images: Tensor) -> int:
    """Sum of 9*B*L*D*N (+D, z terms) over the scans of one forward."""
    calls: list[ssm.ScanCall] = []
    with ssm.observe(calls.append), torch.inference_mode():
        model(images)
    return sum(ssm.selective_scan_flops(c.batch, c.length, c.channels, c.d_state, with_D=c.with_D, with_z=c.with_z)
               for c in calls)


def stub_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
              z: Optional[Tensor] = None, *args) -> Tensor:
    """The scan replaced by its skip term y = D*u (gated by z): what the model costs without a scan.

    Run a model with it through ``ssm.use_backend(stub_scan)``."""
    y = u * D.to(u.dtype)[:, None] if D is not None else u.clone()
    return y * F.silu(z) if z is not None else y


# ----------------------------------------------------------------------------- models


def prune_option(name: str, spec: str) -> dict:
    """``MODE:RATIO`` (e.g. ``aligned:0.8``) -> the ``prune`` option of model ``name``, at the pruning blocks the
    paper's authors use for its family (``backbones.pruning.PAPER_SETTINGS``), pruning in training too."""
    from backbones.pruning import PAPER_SETTINGS

    mode, _, ratio = spec.partition(":")
    family = next((key for key in PAPER_SETTINGS if name.startswith(key)), None)
    if family is None:
        raise ValueError(f"{name}+prune={spec}: no pruning settings for this model "
                         f"(known: {', '.join(PAPER_SETTINGS)})")
    return dict(PAPER_SETTINGS[family], keep_ratio=float(ratio or PAPER_SETTINGS[family]["keep_ratio"]), mode=mode,
                train=True)


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    """A timm model; ``ours:backend`` (e.g. ``vmamba_tiny_s1l8:torch``) picks our model's scan backend, and
    ``+prune=MODE:RATIO`` (e.g. ``vim_tiny_patch16_224+prune=aligned:0.8``) turns on token pruning."""
    import timm

    name, _, prune = name.partition("+prune=")
    name, _, backend = name.partition(":")
    kwargs = {"scan_backend": backend or "auto"} if name in backbones.list_backbones() else {}
    if prune:
        kwargs["prune"] = prune_option(name, prune)
    return timm.create_model(name, **kwargs).to(device)


def nearest_by_flops(models: list[str], candidates: list[str], device: torch.device) -> dict[str, str]:
    """For each model, the candidate whose FLOPs per image (MACs + scan, each at its own input size) are closest
    on a log scale, i.e. by ratio rather than difference."""
    def flops(name: str) -> float:
        model = build_model(name, device)
        macs, scan = model_flops(model, torch.randn(1, *input_size(model, None), device=device))
        return macs + scan

    candidate_flops = {name: flops(name) for name in candidates}
    nearest = {}
    for name in models:
        own = flops(name)
        nearest[name] = min(candidates, key=lambda c: abs(math.log(candidate_flops[c] / own)))
        print(f"{name}: {own / 1e9:.2f} GFLOPs -> {nearest[name]} ({candidate_flops[nearest[name]] / 1e9:.2f})",
              file=sys.stderr)
    return nearest


def input_size(model: torch.nn.Module, image_size: Optional[int]) -> tuple[int, int, int]:
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return (size[0], image_size, image_size) if image_size else size


def model_flops(model: torch.nn.Module, images: Tensor) -> tuple[float, float]:
    """(multiply-adds from flop_counter, scan FLOPs by the 9BLDN rule), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(images[:1])
    return counter.get_total_flops() / 2, scan_flops_of(model, images[:1])


def make_steps(model: torch.nn.Module, images: Tensor, amp: Optional[torch.dtype]) -> dict[str, Callable[[], None]]:
    """Closures for one forward (inference) and one training step (forward, backward, AdamW)."""
    labels = torch.randint(0, 1000, (images.shape[0],), device=images.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = (lambda: torch.autocast(images.device.type, dtype=amp)) if amp else contextlib.nullcontext

    def forward() -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            model(images)

    def train() -> None:
        model.train()
        with autocast():
            outputs = model(images)  # distilled models (GroupMamba, DeiT-distilled) train on (class, distill) logits
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            loss = sum(F.cross_entropy(logits, labels) for logits in outputs) / len(outputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {"forward": forward, "train": train}


def run_models(args: argparse.Namespace, device: torch.device,
               baseline_of: Optional[dict[str, str]] = None) -> list[dict]:
    """Time every model interleaved; ratios refer to ``baseline_of[name]`` (default: ``--baseline`` for all)."""
    baseline_of = baseline_of or {name: args.baseline for name in args.models}
    names = list(dict.fromkeys(name for model in args.models for name in (baseline_of[model], model)))
    baseline_of = {**{name: name for name in names}, **baseline_of}
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    rows, steps = {}, {}
    for name in names:
        model = build_model(name, device)
        images = torch.randn(args.batch, *input_size(model, args.image_size), device=device)
        macs, scan = model_flops(model, images)
        if args.compile:
            model = torch.compile(model)
        rows[name] = dict(model=name, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                          gmacs=macs / 1e9, scan_gflops=scan / 1e9, total_gflops=(macs + scan) / 1e9)
        steps[name] = make_steps(model, images, amp)
        for mode in args.modes:
            for _ in range(args.warmup):
                steps[name][mode]()
    times = {(name, mode): [] for name in names for mode in args.modes}
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            for mode in args.modes:
                times[name, mode].append(timed(steps[name][mode], device, args.iters))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    for name in names:
        for mode in args.modes:
            per_repeat = times[name, mode]
            base = times[baseline_of[name], mode]
            rows[name]["baseline"] = baseline_of[name]
            rows[name][f"{mode}_img_s"] = args.batch / statistics.median(per_repeat)
            rows[name][f"{mode}_img_s_best"] = args.batch / min(per_repeat)
            rows[name][f"{mode}_ratio"] = statistics.median(b / t for t, b in zip(per_repeat, base))
            rows[name][f"{mode}_peak_mb"] = measure_model_memory(args, device, name, mode, steps[name][mode])
    return [rows[name] for name in names]


def measure_model_memory(args: argparse.Namespace, device: torch.device, name: str, mode: str,
                         step: Callable[[], None]) -> Optional[float]:
    if not args.memory:
        return None
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    peak = child_peak_memory(dict(kind="model", name=name, mode=mode, batch=args.batch,
                                  image_size=args.image_size, precision=args.precision, compile=args.compile))
    return None if peak is None else peak / 2**20


# ----------------------------------------------------------------------------- scan micro-benchmark


def scan_inputs(batch: int, channels: int, length: int, d_state: int, device: torch.device,
                routes: int = 4) -> dict:
    """VMamba-like scan inputs: K routes as B/C groups, Mamba's dt init, S4D-real A."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = torch.exp(torch.rand(channels, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = dict(
        u=torch.randn(batch, channels, length, generator=g),
        delta=0.1 * torch.randn(batch, channels, length, generator=g),
        A=-torch.arange(1, d_state + 1, dtype=torch.float32).repeat(channels, 1),
        B=torch.randn(batch, routes, d_state, length, generator=g),
        C=torch.randn(batch, routes, d_state, length, generator=g),
        D=torch.ones(channels), delta_bias=dt + torch.log(-torch.expm1(-dt)))
    return {k: v.to(device) for k, v in inputs.items()}


def _timemajor_unbind(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """A well-written Python loop: contiguous time-major (L, b, d, n) tensors, one unbind, one stack."""
    dt = F.softplus(delta + delta_bias[:, None]) if delta_softplus else delta + delta_bias[:, None]
    length, batch, channels = u.shape[2], u.shape[0], u.shape[1]

    def time_major_groups(BC: Tensor) -> Tensor:  # (b, g, n, l) -> (l, b, d, n)
        BC = (BC if BC.dim() == 4 else BC.unsqueeze(1)).permute(3, 0, 1, 2).contiguous()
        g, n = BC.shape[2], BC.shape[3]
        return BC.unsqueeze(3).expand(length, batch, g, channels // g, n).reshape(length, batch, channels, n)

    dt_t, u_t = dt.permute(2, 0, 1).contiguous(), u.permute(2, 0, 1).contiguous()
    decay = torch.exp(dt_t.unsqueeze(-1) * A)
    drive = (dt_t * u_t).unsqueeze(-1) * time_major_groups(B)
    state, states = torch.zeros_like(drive[0]), []
    for decay_t, drive_t in zip(decay.unbind(0), drive.unbind(0)):
        state = decay_t * state + drive_t
        states.append(state)
    y = (torch.stack(states) * time_major_groups(C)).sum(-1).permute(1, 2, 0)
    return y + D[:, None] * u


def _per_channel(BC: Tensor, channels: int) -> Tensor:
    """(b, n, l) or (b, g, n, l) B/C -> (b, channels, n, l): channel d reads group d // (channels / g)."""
    if BC.dim() == 3:
        return BC.unsqueeze(1).expand(-1, channels, -1, -1)
    return BC.repeat_interleave(channels // BC.shape[1], dim=1)


def _mamba_style_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The algorithm of mamba-ssm's ``selective_scan_ref``: (b, d, l, n) history indexed step by step."""
    dt = F.softplus(delta + delta_bias[:, None]) if delta_softplus else delta + delta_bias[:, None]
    Bx = _per_channel(B, u.shape[1]).transpose(2, 3)
    Cx = _per_channel(C, u.shape[1]).transpose(2, 3)
    decay = torch.exp(dt.unsqueeze(-1) * A[None, :, None, :])
    drive = (dt * u).unsqueeze(-1) * Bx
    state, ys = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), []
    for i in range(u.shape[2]):
        state = decay[:, :, i] * state + drive[:, :, i]
        ys.append((state * Cx[:, :, i]).sum(-1))
    return torch.stack(ys, dim=2) + D[:, None] * u


def scan_formulation(name: str) -> Callable:
    return {"chunked": ssm.scan_chunked, "oddeven": ssm.scan_oddeven, "unbind": _timemajor_unbind,
            "sequential": ssm.scan_sequential, "mamba_ref": _mamba_style_reference,
            "mamba_ssm": functools.partial(ssm.selective_scan, backend="mamba_ssm"),
            "fused": functools.partial(ssm.selective_scan, backend="fused")}[name]


def runnable(name: str, device: torch.device) -> bool:
    """Whether formulation ``name`` can run on ``device`` here (the kernels need their device and build)."""
    if name == "mamba_ssm":
        return device.type == "cuda"
    if name == "fused":
        return device.type == "cpu" and fused_kernel.available()
    return True


def scan_call(name: str, inputs: dict, mode: str) -> Callable[[], None]:
    fn = scan_formulation(name)
    leaves = {k: v.detach().clone().requires_grad_(mode == "fwd+bwd") for k, v in inputs.items()}

    def call() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(**leaves, delta_softplus=True)
        else:
            fn(**leaves, delta_softplus=True).sum().backward()

    return call


def parse_shape(text: str) -> tuple[int, ...]:
    """batch x channels x length x d_state [x routes (B/C groups, default 4)]."""
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError(f"scan shape {text!r} must be batch x channels x length x d_state "
                                         "[x routes]")
    return parts


def run_scan(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for shape in args.scan_shapes:
        batch, channels, length, d_state = shape[:4]
        inputs = scan_inputs(*shape[:4], device, *shape[4:])
        history = batch * channels * length * d_state * 4
        for mode in args.scan_modes:
            names = [n for n in args.formulations if runnable(n, device)]
            calls = {n: scan_call(n, inputs, mode) for n in names}
            for call in calls.values():
                call()
            times = {n: [] for n in names}
            for repeat in range(args.repeats):
                for n in names[repeat % len(names):] + names[:repeat % len(names)]:
                    times[n].append(timed(calls[n], device, 1))
            base = times.get(args.scan_baseline)
            for n in names:
                row = dict(shape="x".join(map(str, shape)), mode=mode, formulation=n,
                           ms_median=1e3 * statistics.median(times[n]), ms_min=1e3 * min(times[n]),
                           state_history_mb=history / 2**20)
                if base:
                    row["speedup_vs_" + args.scan_baseline] = statistics.median(b / t for t, b in zip(times[n], base))
                if args.memory:
                    peak = (child_peak_memory(dict(kind="scan", name=n, mode=mode, shape=list(shape)))
                            if device.type == "cpu" else None)
                    row["peak_mb"] = None if peak is None else peak / 2**20
                    row["peak_x_history"] = None if peak is None else peak / history
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- profile


def run_profile(args: argparse.Namespace, device: torch.device) -> dict:
    name = args.profile
    model = build_model(name, device)
    images = torch.randn(args.batch, *input_size(model, args.image_size), device=device)
    steps = make_steps(model, images, None)
    results = {"model": name, "batch": args.batch}
    for mode in args.modes:
        real, stubbed, scan_time = [], [], []
        steps[mode]()
        for _ in range(args.repeats):
            real.append(timed(steps[mode], device, args.iters))
            with ssm.use_backend(stub_scan):
                stubbed.append(timed(steps[mode], device, args.iters))
            if mode == "forward":
                calls: list[ssm.ScanCall] = []
                with ssm.observe(calls.append, synchronize=True):  # observers time on the wall clock: so does this
                    synchronize(device)
                    start = time.perf_counter()
                    steps[mode]()
                    synchronize(device)
                    total = time.perf_counter() - start
                scan_time.append(sum(call.seconds for call in calls) / total)
        med_real, med_stub = statistics.median(real), statistics.median(stubbed)
        results[mode] = dict(seconds=med_real, seconds_without_scan=med_stub, img_s=args.batch / med_real,
                             img_s_without_scan=args.batch / med_stub, scan_share_by_stub=1 - med_stub / med_real)
        if scan_time:
            results[mode]["scan_share_timed_inside"] = statistics.median(scan_time)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        steps["forward"]()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    results["top_ops"] = prof.key_averages().table(sort_by=sort, row_limit=args.top_ops)
    return results


# ----------------------------------------------------------------------------- output


def fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out_dir: str, stem: str, rows: list[dict], table: str, env: dict,
                  plot: Callable[[str], None]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(f"{header}\n\n{table}\n")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(dict(environment=env, rows=rows), f, indent=2)
    plot(os.path.join(out_dir, f"{stem}.png"))
    print(f"{header}\n\n{table}\n\nwritten to {out_dir}/{stem}.{{md,csv,json,png}}")


def plot_models(rows: list[dict], modes: list[str], baseline: str, path: str) -> None:
    """Images/s per model and mode, baselines in grey, each bar labelled with its ratio to ``baseline``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 0.6 * len(rows) + 1.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        names = [r["model"] for r in rows]
        values = [r[f"{mode}_img_s"] for r in rows]
        bars = ax.barh(names, values, color=["tab:gray" if r["baseline"] == r["model"] else "tab:blue" for r in rows])
        for bar, row in zip(bars, rows):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row[f'{mode}_ratio']:.2f}x",
                    va="center")
        ax.set_xlabel("images / s")
        ax.set_title(f"{mode} (ratio vs {baseline})")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scan(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["shape"], r["mode"]) for r in rows))
    names = list(dict.fromkeys(r["formulation"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r["ms_median"] for r in rows if (r["shape"], r["mode"]) == g and r["formulation"] == name),
                       float("nan")) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{s}\n{m}" for s, m in groups], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- memory probe (child)


def probe(spec: dict) -> float:
    """Child-process side of ``child_peak_memory``: build, reset the peak, run once, report the increase."""
    device = torch.device("cpu")
    if spec["kind"] == "model":
        model = build_model(spec["name"], device)
        images = torch.randn(spec["batch"], *input_size(model, spec["image_size"]))
        amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["precision"]]
        call = make_steps(torch.compile(model) if spec["compile"] else model, images, amp)[spec["mode"]]
        if spec["compile"]:
            call()  # compile first: the peak of interest is the compiled step's
    else:
        shape = spec["shape"]
        call = scan_call(spec["name"], scan_inputs(*shape[:4], device, *shape[4:]), spec["mode"])
    before = reset_peak_rss()
    call()
    return float(peak_rss_bytes() - before)


# ----------------------------------------------------------------------------- main


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--scan", action="store_true", help="micro-benchmark the scan formulations")
    mode.add_argument("--profile", metavar="MODEL", help="profile where MODEL's time goes (scan share)")
    mode.add_argument("--families", action="store_true",
                      help="each model against its nearest timm model in FLOPs (from --candidates)")
    mode.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--models", type=csv_list, default=None,
                        help="comma-separated timm names (ours or timm's; ours may end in :torch, :fused, ... to "
                             f"force a scan backend); default: {','.join(DEFAULT_MODELS)}, or with --families "
                             f"{','.join(FAMILY_MODELS)}")
    parser.add_argument("--candidates", type=csv_list, default=list(TIMM_CANDIDATES),
                        help="--families: timm models to pick each baseline from; default: %(default)s")
    parser.add_argument("--baseline", default="convnext_tiny", help="model the ratios refer to (added if missing)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="square input size (default: each model's)")
    parser.add_argument("--modes", type=csv_list, default=["forward", "train"],
                        help="forward (inference) and/or train (forward+backward+AdamW step)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32, or autocast to bf16/fp16")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per model and mode")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats (median reported)")
    parser.add_argument("--iters", type=int, default=1, help="calls per timed repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: CPU time of this process (robust to other jobs on a "
                             "shared machine; use with --threads 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every model (Inductor; needs a C++ compiler on CPU); warm-up compiles")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmul/cudnn on CUDA (recorded either way)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory measurement")
    parser.add_argument("--scan-shapes", type=lambda s: [parse_shape(p) for p in csv_list(s)],
                        default=[parse_shape(s) for s in DEFAULT_SCAN_SHAPES],
                        help="--scan: batch x channels x length x d_state [x routes] list; default: "
                             + ",".join(DEFAULT_SCAN_SHAPES))
    parser.add_argument("--formulations", type=csv_list, default=list(DEFAULT_FORMULATIONS),
                        help=f"--scan: any of {','.join(SCAN_FORMULATIONS)} (mamba_ref's backward is quadratic "
                             "in length: minutes at L=3136); default: %(default)s")
    parser.add_argument("--scan-modes", type=csv_list, default=["fwd", "fwd+bwd"], help="--scan: fwd and/or fwd+bwd")
    parser.add_argument("--scan-baseline", default="unbind", help="--scan: formulation the speed-ups refer to")
    parser.add_argument("--top-ops", type=int, default=15, help="--profile: operators listed")
    parser.add_argument("--out", default="outputs/benchmark", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = list(FAMILY_MODELS if args.families else DEFAULT_MODELS)
    unknown = set(args.formulations) - set(SCAN_FORMULATIONS)
    if unknown:
        parser.error(f"unknown formulation(s) {sorted(unknown)}; choose from {', '.join(SCAN_FORMULATIONS)}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    global clock
    args = parse_args(argv)
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        print(probe(json.loads(args.probe)))
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)
    env = environment(device)
    if args.scan:
        rows = run_scan(args, device)
        speed_key = "speedup_vs_" + args.scan_baseline
        columns = [("shape", "b x D x L x N"), ("mode", "mode"), ("formulation", "formulation"),
                   ("ms_median", "ms (median)"), ("ms_min", "ms (min)"), (speed_key, f"× vs {args.scan_baseline}"),
                   ("peak_mb", "peak MB"), ("peak_x_history", "peak / state history")]
        write_outputs(args.out, "scan", rows, markdown_table(rows, columns), env, lambda p: plot_scan(rows, p))
    elif args.profile:
        result = run_profile(args, device)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(dict(environment=env, **result), f, indent=2)
        print(json.dumps({k: v for k, v in result.items() if k != "top_ops"}, indent=2))
        print(result["top_ops"])
    else:
        baseline_of = nearest_by_flops(args.models, args.candidates, device) if args.families else None
        rows = run_models(args, device, baseline_of)
        columns = [("model", "model"), ("params_m", "params (M)"), ("total_gflops", "GFLOPs (MACs + scan)"),
                   ("scan_gflops", "scan GFLOPs (9BLDN)")]
        if args.families:
            columns.append(("baseline", "baseline (nearest FLOPs)"))
        for mode in args.modes:
            ratio_title = f"{mode} × baseline" if args.families else f"{mode} × {args.baseline}"
            columns += [(f"{mode}_img_s", f"{mode} img/s"), (f"{mode}_ratio", ratio_title),
                        (f"{mode}_peak_mb", f"{mode} peak MB")]
        table = markdown_table(rows, columns)
        table += ("\n\nGFLOPs = torch.utils.flop_counter multiply-adds (the papers' 'FLOPs') + 9·B·L·D·N per "
                  "selective scan (+B·D·L for D and for z), the official VMamba/Mamba convention; throughput is "
                  f"the median of {args.repeats} interleaved repeats at batch {args.batch}.")
        write_outputs(args.out, "benchmark", rows, table, env,
                      lambda p: plot_models(rows, args.modes, "its baseline" if args.families else args.baseline, p))


if __name__ == "__main__":
    main()
