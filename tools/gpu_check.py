"""Check mamba-ssm's CUDA kernel against our scans, and VMamba-T's speed against the official figures.

    python -m tools.gpu_check                      # everything, on cuda:0
    python -m tools.gpu_check --skip-throughput --families vmamba,vim --out gpu_check.json

One command for a CUDA machine with mamba-ssm built (``pip install -e '.[cuda]'``). It prints

1. the environment: GPU, driver-side CUDA, torch, cuDNN, TF32 flags, mamba-ssm / causal-conv1d versions
   and what each scan backend resolves to (``tools.doctor``);
2. scan checks: ``selective_scan`` with ``backend="mamba_ssm"`` and with our pure-PyTorch ``torch``
   backend, forward and every input gradient, against a float64 sequential scan (the ``reference``
   backend in float64) -- grouped and ungrouped B/C, with and without z / D / delta_bias, d_state 1 to
   16, lengths across the kernel's 2048-token chunks, float32 and bfloat16;
3. family checks: for each family its test model and one released variant, logits and every parameter
   gradient with mamba-ssm (float32) and with our torch scan (float32) against the same model in float64
   (torch scan), after re-drawing the scan parameters so that the scans carry the output (at
   initialisation they are a 1e-6 part of it); mamba-ssm passes where its error is within
   ``--error-factor`` of ours (or below ``--floor``). TF32 is off for the checks, so float32 means float32;
4. throughput of VMamba-T (``vmamba_tiny_s1l8``) at batch 128, 224², with the official protocol
   (``analyze/utils.py`` of the VMamba repo: 50 warm-up and 30 timed calls; training = forward, loss and
   backward without an optimizer step), in float32 and under fp16 autocast, for both backends, next to
   the published 1686 img/s inference and 571 img/s training (A100, batch 128).

Exit status: 0 when every check passes, 1 when one fails, 2 when this machine cannot run the checks
(no CUDA device, or mamba-ssm not usable -- the reason is printed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Callable, NamedTuple, Optional

import timm
import torch
import torch.nn.functional as F
from torch import Tensor

import backbones
from backbones import ssm
from backbones.ss2d import RouteSSM

REAL_VARIANTS = {"vmamba": "vmamba_tiny_s1l8", "msvmamba": "msvmamba_nano", "efficientvmamba": "efficientvmamba_tiny",
                 "groupmamba": "groupmamba_tiny", "hrvmamba": "hrvmamba_small", "vim": "vim_tiny_patch16_224",
                 "mhs": "mhs_vmamba_tiny"}
"""One released variant per family (the smallest classifier; MHS-VM's encoder, whose release is a segmentation
model), checked besides the family's test model."""

OFFICIAL_THROUGHPUT = dict(model="vmamba_tiny_s1l8", inference_img_s=1686, train_img_s=571, gpu="A100", batch=128,
                           source="VMamba README / assets/performance.md (VMamba-T[s1l8])")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


class ScanCase(NamedTuple):
    """One selective-scan configuration: shapes, optional inputs and the dtype of u, delta, B, C, z."""

    batch: int
    channels: int
    length: int
    d_state: int
    groups: Optional[int]  # None: ungrouped (batch, d_state, length) B/C
    with_z: bool
    with_D_and_bias: bool
    dtype: torch.dtype = torch.float32


SCAN_CASES = (
    ScanCase(2, 64, 256, 16, None, True, True),  # Mamba's layout: ungrouped B/C, gated
    ScanCase(2, 384, 197, 16, 2, False, True),  # Vim-Ti: two directions as two groups
    ScanCase(2, 384, 3136, 1, 4, False, True),  # VMamba-T stage 1 (fewer channels): four routes, two chunks
    ScanCase(1, 32, 4100, 4, 2, True, False),  # three chunks, no D / delta_bias
    ScanCase(2, 64, 256, 16, 2, True, True, torch.bfloat16),
    ScanCase(2, 384, 3136, 1, 4, False, True, torch.bfloat16),
)
TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2)}
"""(forward, gradient) relative error allowed against float64: float32 accumulation loses ~1e-6 per step
and atomics reorder the gradient sums; bfloat16 inputs are rounded to 8 bits (2^-8 ~ 4e-3) before the
float32 scan. A plumbing error -- wrong argument, group or chunk -- is of order 1."""


def relative_error(got: Tensor, expected: Tensor) -> float:
    """max |got - expected| / max |expected| (absolute when expected is all zero)."""
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- scan checks


def scan_inputs(case: ScanCase, device: torch.device, seed: int = 0) -> dict:
    """Random scan inputs in the case's shapes with Mamba's step-size init and S4D-real A."""
    g = torch.Generator().manual_seed(seed)
    shape_bc = ((case.batch, case.d_state, case.length) if case.groups is None
                else (case.batch, case.groups, case.d_state, case.length))
    step = torch.exp(torch.rand(case.channels, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = dict(
        u=torch.randn(case.batch, case.channels, case.length, generator=g),
        delta=0.5 * torch.randn(case.batch, case.channels, case.length, generator=g),
        A=-torch.arange(1, case.d_state + 1, dtype=torch.float32).repeat(case.channels, 1),
        B=torch.randn(*shape_bc, generator=g), C=torch.randn(*shape_bc, generator=g),
        D=torch.randn(case.channels, generator=g) if case.with_D_and_bias else None,
        z=torch.randn(case.batch, case.channels, case.length, generator=g) if case.with_z else None,
        delta_bias=step + torch.log(-torch.expm1(-step)) if case.with_D_and_bias else None)
    low = ("u", "delta", "B", "C", "z")
    return {k: None if v is None else v.to(device=device, dtype=case.dtype if k in low else torch.float32)
            for k, v in inputs.items()}


def scan_and_grads(inputs: dict, backend: str, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, dict]:
    """Output and every input gradient (for a fixed random output gradient) of one scan, in ``dtype`` if given."""
    leaves = {k: None if v is None else v.detach().to(dtype or v.dtype).requires_grad_() for k, v in inputs.items()}
    out = ssm.selective_scan(**leaves, delta_softplus=True, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    present = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in present], grad_out)
    return out.detach(), dict(zip(present, grads))


def check_scan(case: ScanCase, device: torch.device) -> dict:
    """Errors of the mamba_ssm and torch backends against float64, for one case."""
    inputs = scan_inputs(case, device)
    exact_out, exact_grads = scan_and_grads(inputs, "reference", torch.float64)
    result = {"case": case._asdict() | {"dtype": str(case.dtype)}}
    for backend in ("mamba_ssm", "torch"):
        out, grads = scan_and_grads(inputs, backend)
        result[backend] = {"forward": relative_error(out, exact_out),
                           "gradients": {k: relative_error(g, exact_grads[k]) for k, g in grads.items()}}
    forward_tol, grad_tol = TOLERANCES[case.dtype]
    kernel = result["mamba_ssm"]
    result["passed"] = kernel["forward"] <= forward_tol and max(kernel["gradients"].values()) <= grad_tol
    return result


# ----------------------------------------------------------------------------- family checks


@torch.no_grad()
def make_scans_matter(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every scan's step-size bias, skip weight D and B/C projection so that the scans carry the model.

    At initialisation the steps are tiny and the D*u skip and the residuals dominate: swapping B and C in
    the kernel changes test_vmamba's logits by ~1e-6, which no comparison can tell from rounding.
    """
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, RouteSSM):
            module.dt_projs_bias.uniform_(-1.0, 1.0, generator=g)  # steps softplus(~+-1): ~0.3 to 1.3
            module.Ds.uniform_(-0.1, 0.1, generator=g)
            module.x_proj_weight.mul_(4.0)


def logits_and_grads(model: torch.nn.Module, images: Tensor, backend: str) -> tuple[Tensor, dict, set]:
    """Logits, parameter gradients of mean(logits^2), and the backends the scans ran on."""
    calls: list[ssm.ScanCall] = []
    with ssm.use_backend(backend), ssm.observe(calls.append):
        logits = model(images)
        logits.square().mean().backward()
    grads = {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, {call.backend for call in calls}


def check_model(name: str, device: torch.device, batch: int = 2, error_factor: float = 10.0,
                floor: float = 1e-5) -> dict:
    """mamba_ssm vs torch (both float32) against the float64 model: logits and every parameter gradient."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()  # eval: no dropout / drop-path, so all runs see one function
    make_scans_matter(model)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    images = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0)).to(device)
    runs = {}
    for label, backend, dtype in (("float64", "torch", torch.float64), ("torch", "torch", torch.float32),
                                  ("mamba_ssm", "mamba_ssm", torch.float32)):
        replica = copy.deepcopy(model).to(device=device, dtype=dtype)
        runs[label] = logits_and_grads(replica, images.to(dtype), backend)
    exact_logits, exact_grads, _ = runs["float64"]
    errors = {label: {"logits": relative_error(runs[label][0], exact_logits),
                      "gradients": {k: relative_error(g, exact_grads[k]) for k, g in runs[label][1].items()}}
              for label in ("torch", "mamba_ssm")}

    def share_of_bound(kernel_error: float, our_error: float) -> float:
        return kernel_error / max(floor, error_factor * our_error)

    gradients = errors["mamba_ssm"]["gradients"]
    worst = max(((k, share_of_bound(gradients[k], e)) for k, e in errors["torch"]["gradients"].items()),
                key=lambda item: item[1])
    passed = (runs["mamba_ssm"][2] == {"mamba_ssm"} and runs["torch"][2] == {"torch"} and worst[1] <= 1.0
              and share_of_bound(errors["mamba_ssm"]["logits"], errors["torch"]["logits"]) <= 1.0)
    return {"model": name, "backends_seen": {k: sorted(v[2]) for k, v in runs.items()},
            "logits_error": {k: e["logits"] for k, e in errors.items()},
            "worst_gradient": {"parameter": worst[0], "mamba_ssm": gradients[worst[0]],
                               "torch": errors["torch"]["gradients"][worst[0]]},
            "passed": passed}


# ----------------------------------------------------------------------------- throughput


def images_per_second(step: Callable[[], None], batch: int, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize(device)
    return batch * iters / (time.perf_counter() - start)


def measure_throughput(name: str, backend: str, amp: bool, device: torch.device, batch: int, warmup: int,
                       iters: int) -> dict:
    """Inference and training (forward + loss + backward) images/s of one model, backend and precision."""
    model = timm.create_model(name, scan_backend=backend).to(device)
    images = torch.randn(batch, *model.pretrained_cfg.get("input_size", (3, 224, 224)), device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)

    def inference() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            model(images)

    def train() -> None:
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    row = {"backend": backend, "precision": "fp16 autocast" if amp else "fp32"}
    for mode, step, train_mode in (("inference", inference, False), ("train", train, True)):
        model.train(train_mode)
        try:
            row[f"{mode}_img_s"] = images_per_second(step, batch, device, warmup, iters)
        except torch.cuda.OutOfMemoryError:
            row[f"{mode}_img_s"] = None
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- main


def family_name(name: str) -> str:
    return backbones.family_of(name).__name__.rsplit(".", 1)[-1]


def family_names() -> list[str]:
    return sorted({family_name(name) for name in backbones.list_backbones()})


def family_test_model(family: str) -> str:
    """The family's ``test_*`` model (``test_<family>``, or e.g. ``test_mhs_vmamba`` for the MHS family)."""
    return next(name for name in backbones.list_backbones() if name.startswith("test_") and family_name(name) == family)


def describe_scan(row: dict) -> str:
    case, kernel, ours = row["case"], row["mamba_ssm"], row["torch"]
    return (f"  {'ok  ' if row['passed'] else 'FAIL'} {case['batch']}x{case['channels']}x{case['length']} "
            f"N={case['d_state']} groups={case['groups']} z={case['with_z']} D/bias={case['with_D_and_bias']} "
            f"{case['dtype']}: forward {kernel['forward']:.1e} | {ours['forward']:.1e}, worst gradient "
            f"{max(kernel['gradients'].values()):.1e} | {max(ours['gradients'].values()):.1e}")


def describe_model(row: dict) -> str:
    worst = row["worst_gradient"]
    return (f"  {'ok  ' if row['passed'] else 'FAIL'} {row['model']}: logits {row['logits_error']['mamba_ssm']:.1e} | "
            f"{row['logits_error']['torch']:.1e}, worst gradient ({worst['parameter']}) {worst['mamba_ssm']:.1e} | "
            f"{worst['torch']:.1e}; scans ran on {row['backends_seen']}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0", help="CUDA device (default: %(default)s)")
    parser.add_argument("--families", default="all",
                        help=f"comma-separated families to check, or all: {', '.join(family_names())}")
    parser.add_argument("--skip-scans", action="store_true", help="skip the scan checks")
    parser.add_argument("--skip-models", action="store_true", help="skip the family checks")
    parser.add_argument("--skip-throughput", action="store_true", help="skip the VMamba-T throughput")
    parser.add_argument("--batch", type=int, default=OFFICIAL_THROUGHPUT["batch"], help="throughput batch size")
    parser.add_argument("--warmup", type=int, default=50, help="throughput warm-up calls (official: 50)")
    parser.add_argument("--iters", type=int, default=30, help="throughput timed calls (official: 30)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmul/cuDNN for the throughput runs")
    parser.add_argument("--error-factor", type=float, default=10.0,
                        help="family checks: mamba-ssm's error may be this many times our torch scan's")
    parser.add_argument("--floor", type=float, default=1e-5,
                        help="family checks: errors below this always pass (float32 rounding through a model is "
                             "~1e-6; a wrong argument or group shows as 1e-4 or more)")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this new file")
    args = parser.parse_args(argv)
    if args.out and os.path.exists(args.out):
        parser.error(f"--out {args.out} exists; name a new file (results never overwrite a file)")
    known = family_names()
    args.families = known if args.families == "all" else [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(args.families) - set(known))
    if unknown:
        parser.error(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                     f"choose from {', '.join(known)} or all")
    return args


def environment(device: torch.device) -> dict:
    from tools import doctor

    info = doctor.collect()
    props = torch.cuda.get_device_properties(device)
    info.update(device=str(device), gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check needs a CUDA device, and torch {torch.__version__} sees none "
              f"(built for CUDA {torch.version.cuda}); run it on a GPU machine", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"gpu_check runs on a CUDA device, got --device {args.device}", file=sys.stderr)
        return 2
    kernel, reason = ssm.mamba_ssm_status()
    results = {"environment": environment(device)}
    for key in ("gpu", "compute_capability", "torch", "torch_cuda_build", "cudnn", "packages", "scan_backends"):
        print(f"{key:<20} {results['environment'][key]}")
    if kernel is None:
        print(f"mamba-ssm cannot run here: {reason}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if not args.skip_scans:
        print("\nscan checks (relative error vs float64; mamba_ssm | torch):")
        results["scans"] = [check_scan(case, device) for case in SCAN_CASES]
        for row in results["scans"]:
            print(describe_scan(row))
    if not args.skip_models:
        print(f"\nfamily checks (logits and gradients vs the float64 model; mamba_ssm | torch, "
              f"factor {args.error_factor}):")
        results["models"] = []
        for family in args.families:
            for name in (family_test_model(family), REAL_VARIANTS[family]):
                results["models"].append(check_model(name, device, error_factor=args.error_factor, floor=args.floor))
                print(describe_model(results["models"][-1]))
    if not args.skip_throughput:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        official = OFFICIAL_THROUGHPUT
        print(f"\n{official['model']} throughput, batch {args.batch}, 224², TF32 {'on' if args.tf32 else 'off'} "
              f"(official: {official['inference_img_s']} inference / {official['train_img_s']} training img/s on "
              f"{official['gpu']}, batch {official['batch']}):")
        results["throughput"] = []
        for backend in ("mamba_ssm", "torch"):
            for amp in (False, True):
                row = measure_throughput(official["model"], backend, amp, device, args.batch, args.warmup, args.iters)
                torch.cuda.empty_cache()
                results["throughput"].append(row)
                cells = []
                for mode, key in (("inference", "inference_img_s"), ("train", "train_img_s")):
                    value = row[f"{mode}_img_s"]
                    cells.append(f"{mode} out of memory" if value is None else
                                 f"{mode} {value:.0f} img/s ({value / official[key]:.2f}x official)")
                print(f"  {backend:<9} {row['precision']:<13} " + ", ".join(cells))
    failed = [r for r in results.get("scans", []) + results.get("models", []) if not r["passed"]]
    print(f"\n{'all checks passed' if not failed else f'{len(failed)} check(s) FAILED'}")
    if args.out:
        with open(args.out, "x") as f:
            json.dump(results, f, indent=2, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
