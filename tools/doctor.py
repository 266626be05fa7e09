"""Report what this machine can run: scan backends (and why not), the fused kernel, torch/CUDA, threads, allocator.

Usage: ``python -m tools.doctor`` (``--json`` for a machine-readable dump). Nothing is installed or
changed; the report is what ``scan_backend: auto`` will pick and what limits speed here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import sys
from typing import Optional

import torch

from backbones import kernel as fused_kernel
from backbones import ssm

_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
_GLIBC_HINT = "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def loaded_allocator() -> Optional[str]:
    """Name of a preloaded malloc replacement mapped into this process, if any (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        text = os.environ.get("LD_PRELOAD", "")
    return next((name for name in _ALLOCATORS if f"lib{name}" in text), None)


def aligned_scan_report() -> str:
    """Which path token pruning's aligned scan (``selective_scan(..., positions=)``) takes here for CPU tensors."""
    if ssm.native_aligned_scan("auto", torch.empty(0)):
        return ("CPU: native in the fused kernel (each step's gap in the scan's decay, forward and backward; "
                "Vim's aligned blocks read both routes in place); the other backends run ssm.aligned_inputs' "
                "reparametrisation of (u, delta) before their plain scan")
    return (f"CPU: the {ssm.resolve_backend('auto', torch.device('cpu'))} backend after ssm.aligned_inputs' "
            "reparametrisation of (u, delta), with Vim's route copies (the fused kernel, which takes the gaps "
            f"natively, is not usable: {fused_kernel.status().reason})")


def backend_report() -> dict[str, str]:
    """Each scan backend -> 'usable: ...' or 'not usable: <reason>'."""
    kernel, reason = ssm.mamba_ssm_status()
    cuda = torch.cuda.is_available()
    auto_cpu = ssm.resolve_backend("auto", torch.device("cpu"))
    auto_cuda = ssm.resolve_backend("auto", torch.device("cuda")) if cuda else None
    return {
        "torch": "usable: chunked scan with hand-written backward in eager mode; odd/even parallel scan "
                 "while torch.compile / torch.export / ONNX trace",
        "reference": "usable: sequential loop over time (slow; cross-check only)",
        "mamba_ssm": "usable: CUDA kernel via mambalab::selective_scan_cuda" if kernel is not None
                     else f"not usable: {reason}",
        "fused": ("usable: " if fused_kernel.available() else "not usable: ") + fused_kernel.status().reason,
        "auto": f"CPU tensors -> {auto_cpu}" + (f"; CUDA tensors -> {auto_cuda}" if cuda else ""),
    }


def collect() -> dict:
    """Everything the report prints, as a dict."""
    cuda = torch.cuda.is_available()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    allocator = loaded_allocator()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "allocator": allocator or "glibc malloc (no tcmalloc/jemalloc preloaded)",
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "cxx_compiler_for_inductor": shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++"),
        "packages": {name: _version(name) for name in ("timm", "mamba-ssm", "causal-conv1d", "onnx",
                                                         "onnxruntime", "onnxscript")},
        "scan_backends": backend_report(),
        "aligned_scan": aligned_scan_report(),
        "fused_kernel": kernel_report(),
    }


def kernel_report() -> dict:
    """What the fused CPU kernel was built with and what this CPU can run."""
    manifest = json.loads(fused_kernel.MANIFEST.read_text()) if fused_kernel.MANIFEST.exists() else {}
    return {
        "build_dir": str(fused_kernel.BUILD_DIR),
        "built_levels": sorted(manifest.get("levels", {})),
        "runnable_levels": fused_kernel.cpu_levels() if manifest else [],
        "selected_level": fused_kernel.status().isa,
        f"{fused_kernel.ISA_ENV}": os.environ.get(fused_kernel.ISA_ENV),
        "openmp_runtime": manifest.get("openmp"),
        "built_with": manifest.get("compiler_version"),
        "compiler_here": fused_kernel.find_compiler(),
    }


def render(info: dict) -> str:
    """The human-readable report."""
    lines = ["mambalab doctor", "", "scan backends:"]
    lines += [f"  {name:<10} {text}" for name, text in info["scan_backends"].items()]
    lines += [f"  {'aligned':<10} {info['aligned_scan']}"]
    lines += ["", "fused CPU kernel (python -m backbones.kernel build):"]
    lines += [f"  {key:<26} {value}" for key, value in info["fused_kernel"].items()]
    lines += ["", "torch:"]
    for key in ("python", "platform", "torch", "torch_cuda_build", "cuda_available", "cuda_devices", "cudnn",
                "tf32_matmul", "cpu_capability", "cxx_compiler_for_inductor"):
        lines.append(f"  {key:<26} {info[key]}")
    lines += ["", "threads and memory:"]
    for key in ("cpus_usable", "torch_threads", "torch_interop_threads", "OMP_NUM_THREADS", "allocator",
                "GLIBC_TUNABLES"):
        lines.append(f"  {key:<26} {info[key]}")
    lines += ["", "packages:"]
    lines += [f"  {name:<26} {version or 'not installed'}" for name, version in info["packages"].items()]
    if not info["allocator"].startswith(_ALLOCATORS):
        lines += ["", "hint: large CPU temporaries are page-faulted in on every allocation with glibc malloc;",
                  "  preloading tcmalloc (Debian/Ubuntu: apt-get install libtcmalloc-minimal4, then",
                  "  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4) or setting",
                  f"  {_GLIBC_HINT}", "  makes big elementwise ops several times faster (see docs/benchmarks.md)."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))


if __name__ == "__main__":
    main()
