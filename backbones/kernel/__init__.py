"""The fused CPU selective scan: build, load, and call ``csrc/selective_scan.cpp``.

The same library holds Vim's fused causal conv + SiLU (``csrc/causal_conv.cpp``, wrapped in
``backbones.kernel.conv``) and HRVMamba's DCNv4 aggregation (``csrc/dcnv4.cpp``, wrapped in
``backbones.kernel.dcnv4``).

The kernel is optional. ``python -m backbones.kernel build`` compiles it (a few seconds, any C++17
compiler with OpenMP) into ``backbones/_kernels/``, once per instruction-set level: ``avx512``
(x86-64-v4, 16 floats per vector), ``avx2`` (x86-64-v3, 8) and ``baseline`` (x86-64 SSE2, or NEON on
aarch64, 4). Nothing is compiled at import time; without a built kernel everything runs on the
pure-PyTorch scan. At run time the highest level the CPU supports is used, or the one named by the
``MAMBALAB_SCAN_ISA`` environment variable (``avx512``, ``avx2`` or ``baseline``; ``none`` turns the
kernel off).

The library is C++ behind a plain C interface (no torch or Python headers, so it does not depend on the
torch version), called through ctypes. It is linked against the OpenMP runtime torch itself loaded, so
the scan shares torch's thread pool, and uses ``torch.get_num_threads()`` threads.

Two ``torch.library`` custom ops wrap it (``mambalab::selective_scan_cpu`` and its backward), with fake
implementations and a registered autograd formula, so torch.compile and torch.export treat the scan as
one opaque node. ONNX has no such op: ``backend="auto"`` runs the pure-PyTorch formulation while
``torch.onnx.export`` traces.

Precision: inputs in bfloat16/float16 are computed in float32 (the result is returned in the input
dtype); float64 inputs are never sent here (``backbones.ssm`` keeps them on the pure-PyTorch path).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

PACKAGE_DIR = Path(__file__).resolve().parent.parent
SOURCES = (PACKAGE_DIR / "csrc" / "selective_scan.cpp", PACKAGE_DIR / "csrc" / "causal_conv.cpp",
           PACKAGE_DIR / "csrc" / "dcnv4.cpp")  # one library
BUILD_DIR = PACKAGE_DIR / "_kernels"
MANIFEST = BUILD_DIR / "manifest.json"
ISA_ENV = "MAMBALAB_SCAN_ISA"
BUILD_COMMAND = "python -m backbones.kernel build"

_X86_LEVELS = {  # name: (floats per vector, compiler flags, x86-64 level needed)
    "avx512": (16, ["-march=x86-64-v4", "-mtune=generic"], 4),
    "avx2": (8, ["-march=x86-64-v3", "-mtune=generic"], 3),
    "baseline": (4, ["-march=x86-64", "-mtune=generic"], 1),
}
_OTHER_LEVELS = {"baseline": (4, [], 0)}


def isa_levels() -> dict[str, tuple[int, list[str], int]]:
    """The instruction-set levels built on this machine's architecture, best first."""
    return _X86_LEVELS if platform.machine().lower() in ("x86_64", "amd64") else _OTHER_LEVELS


def chunk_length(d_state: int) -> int:
    """Steps between the states the forward saves for backward: a power of two near 1024 / d_state in
    [32, 1024], so that one chunk's recomputed history (~(9 + 4 * d_state) * chunk vectors per thread)
    stays in L2 while chunks stay long (measured fastest on VMamba's and Vim's shapes)."""
    return max(32, min(1024, 1 << (1024 // d_state).bit_length() - 1))


# ----------------------------------------------------------------------------- build


def find_compiler() -> Optional[str]:
    """The C++ compiler to use: $CXX, else c++, g++ or clang++ on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def torch_openmp_library() -> Optional[str]:
    """Path of the OpenMP runtime torch has loaded into this process (Linux), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    for stem in ("libgomp", "libiomp5", "libomp"):
        found = sorted(p for p in paths if os.path.basename(p).startswith(stem) and ".so" in p)
        if found:
            return found[0]
    return None


def _source_hash() -> str:
    return hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES)).hexdigest()


def _replace(path: Path, write) -> None:
    """Write ``path`` through a temporary file beside it and an atomic rename, so that a process that has
    the old library mapped keeps it intact."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _compile(compiler: str, flags: list[str], width: int, openmp: Optional[str], out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in SOURCES]
        common = ["-O3", "-std=c++17", "-fPIC", "-fno-math-errno", "-Wall", f"-DMLS_WIDTH={width}", *flags]
        for source, obj in zip(SOURCES, objects):
            subprocess.run([compiler, *common, *(["-fopenmp"] if openmp else []), "-c", str(source), "-o", obj],
                           check=True, capture_output=True, text=True)
        # link against torch's own OpenMP runtime (not -fopenmp's), so one thread pool serves both
        _replace(out, lambda partial: subprocess.run(
            [compiler, "-shared", *objects, *([openmp] if openmp else []), "-o", str(partial)],
            check=True, capture_output=True, text=True))


def build(levels: Optional[Sequence[str]] = None, verbose: bool = True) -> dict:
    """Compile the kernel for ``levels`` (default: every level of this architecture; the baseline level is
    always built) into BUILD_DIR."""
    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++/clang++); the pure-PyTorch scan "
                           "will be used")
    known = isa_levels()
    levels = list(dict.fromkeys([*(levels or known), "baseline"]))  # baseline also answers "which level runs here"
    unknown = [name for name in levels if name not in known]
    if unknown:
        raise ValueError(f"unknown ISA level(s) {unknown}; this {platform.machine()} machine has {list(known)}")
    openmp = torch_openmp_library()
    BUILD_DIR.mkdir(exist_ok=True)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    files = {name: f"selective_scan_{name}.so" for name in levels}
    with concurrent.futures.ThreadPoolExecutor(len(levels)) as pool:
        jobs = {name: pool.submit(_compile, compiler, known[name][1], known[name][0], openmp, BUILD_DIR / files[name])
                for name in levels}
        for name, job in jobs.items():
            try:
                job.result()
            except subprocess.CalledProcessError as err:
                raise RuntimeError(f"compiling the {name} kernel failed:\n{err.stderr}") from err
    manifest = dict(source_sha256=_source_hash(), compiler=compiler, compiler_version=version[0] if version else "",
                    openmp=openmp, machine=platform.machine(), levels=files)
    _replace(MANIFEST, lambda partial: partial.write_text(json.dumps(manifest, indent=2)))
    _reset()
    if verbose:
        print(f"built {', '.join(levels)} with {compiler} into {BUILD_DIR} "
              f"(OpenMP: {openmp or 'none, single-threaded'})")
    return manifest


# ----------------------------------------------------------------------------- load


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("batch", ctypes.c_int64), ("route", ctypes.c_int64),
                ("inner", ctypes.c_int64), ("pos", ctypes.c_int64)]


class _Problem(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("routes", ctypes.c_int64), ("channels", ctypes.c_int64),
                ("d_state", ctypes.c_int64), ("length", ctypes.c_int64), ("positions", ctypes.c_int64),
                ("table", ctypes.c_void_p), ("gaps", ctypes.c_void_p), ("gaps_batch", ctypes.c_int64),
                ("gaps_route", ctypes.c_int64), ("u", _Tensor), ("delta", _Tensor), ("z", _Tensor), ("B", _Tensor),
                ("C", _Tensor), ("y", _Tensor), ("A", ctypes.c_void_p), ("D", ctypes.c_void_p),
                ("delta_bias", ctypes.c_void_p), ("softplus", ctypes.c_int32), ("merged", ctypes.c_int32),
                ("merge_weight", ctypes.c_float), ("states", ctypes.c_void_p), ("chunk", ctypes.c_int64),
                ("threads", ctypes.c_int32)]


class _Grads(ctypes.Structure):
    _fields_ = [("gy", _Tensor), ("du", _Tensor), ("ddelta", _Tensor), ("dz", _Tensor), ("dB", _Tensor),
                ("dC", _Tensor), ("dA", ctypes.c_void_p), ("dD", ctypes.c_void_p), ("dbias", ctypes.c_void_p),
                ("accumulate", ctypes.c_int32)]


class KernelStatus(NamedTuple):
    """Whether the fused kernel can run here, which level, and why (not)."""

    library: Optional[ctypes.CDLL]
    isa: Optional[str]
    reason: str


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.mls_forward.argtypes = [ctypes.POINTER(_Problem)]
    lib.mls_backward.argtypes = [ctypes.POINTER(_Problem), ctypes.POINTER(_Grads)]
    lib.mls_last_error.restype = ctypes.c_char_p
    return lib


def cpu_levels() -> list[str]:
    """The built levels this CPU can run, best first (asks the baseline build for the CPU's x86-64 level)."""
    manifest = json.loads(MANIFEST.read_text())
    level = _open(BUILD_DIR / manifest["levels"]["baseline"]).mls_cpu_level()  # 0 off x86
    return [name for name, (_, _, needs) in isa_levels().items() if name in manifest["levels"] and needs <= level]


def _probe(isa: Optional[str]) -> KernelStatus:
    if not MANIFEST.exists():
        compiler = find_compiler()
        how = (f"build it with `{BUILD_COMMAND}` (compiler: {compiler})" if compiler
               else "no C++ compiler found to build it (install g++ or clang++, then run "
                    f"`{BUILD_COMMAND}`)")
        return KernelStatus(None, None, f"the fused kernel is not built: {how}")
    wanted = isa or os.environ.get(ISA_ENV) or None
    if wanted == "none":
        return KernelStatus(None, None, f"disabled by {ISA_ENV}=none")
    try:
        manifest = json.loads(MANIFEST.read_text())
        if manifest.get("source_sha256") != _source_hash():
            return KernelStatus(None, None, f"the built kernel is older than its source: rebuild with "
                                            f"`{BUILD_COMMAND}`")
        runnable = cpu_levels()
    except (OSError, ValueError, KeyError) as err:
        return KernelStatus(None, None, f"the build in {BUILD_DIR} is unusable ({err}): rebuild with `{BUILD_COMMAND}`")
    if wanted is not None and wanted not in isa_levels():
        return KernelStatus(None, None, f"{ISA_ENV}={wanted!r} is not one of {', '.join(isa_levels())}, none")
    if wanted is not None and wanted not in runnable:
        return KernelStatus(None, None, f"ISA level {wanted!r} is not built or this CPU cannot run it "
                                        f"(runnable: {', '.join(runnable) or 'none'})")
    if not runnable:
        return KernelStatus(None, None, "no built level runs on this CPU")
    chosen = wanted or runnable[0]
    try:
        library = _open(BUILD_DIR / manifest["levels"][chosen])
    except OSError as err:
        return KernelStatus(None, None, f"the {chosen} kernel does not load ({err}); rebuild with `{BUILD_COMMAND}`")
    how = f"forced by {ISA_ENV}" if wanted and not isa else ("selected" if isa else "best level of this CPU")
    threads = "OpenMP threads shared with torch" if manifest.get("openmp") else "single-threaded (no OpenMP)"
    return KernelStatus(library, chosen, f"{chosen} build ({how}), {threads}")


_status: Optional[KernelStatus] = None
_forced_isa: Optional[str] = None


def _reset() -> None:
    global _status
    _status = None


def status() -> KernelStatus:
    """The kernel this process uses (loaded on first call), or why there is none."""
    global _status
    if _status is None:
        _status = _probe(_forced_isa)
    return _status


@torch.compiler.assume_constant_result
def available() -> bool:
    """True when the fused kernel is built and runs on this CPU."""
    return status().library is not None


def select_isa(isa: Optional[str]) -> KernelStatus:
    """Use ISA level ``isa`` from now on in this process (None: back to the environment / best level)."""
    global _forced_isa
    _forced_isa = isa
    _reset()
    return status()


def _library() -> ctypes.CDLL:
    lib = status().library
    if lib is None:
        raise RuntimeError(f"scan backend 'fused' cannot run: {status().reason}")
    return lib


# ----------------------------------------------------------------------------- calling the kernel


def _ctensor(t: Optional[Tensor]) -> _Tensor:
    """A 4-D (batch, route, channel, position) view; 3-D tensors are shared by all routes (route stride 0)."""
    if t is None:
        return _Tensor(None, 0, 0, 0, 0)
    if t.dim() == 3:
        s = t.stride()
        return _Tensor(t.data_ptr(), s[0], 0, s[1], s[2])
    return _Tensor(t.data_ptr(), *t.stride())


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float()


def _params(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().float().contiguous()


def _output_shape(batch: int, routes: int, channels: int, length: int, positions: int, merged: bool,
                  routed: bool) -> tuple[int, ...]:
    if merged:
        return (batch, positions, channels)
    return (batch, routes, length, channels) if routed else (batch, routes, channels, length)


def _y_tensor(y: Tensor, merged: bool, routed: bool) -> _Tensor:
    """The kernel's view of an output from ``_output_shape``."""
    s = y.stride()
    if merged:
        return _Tensor(y.data_ptr(), s[0], 0, s[2], s[1])
    return _Tensor(y.data_ptr(), s[0], s[1], s[3], s[2]) if routed else _Tensor(y.data_ptr(), *s)


def _problem(u, delta, A, B, C, D, z, delta_bias, table, gaps, softplus, merge_weight, merged, y,
             states) -> _Problem:
    batch, routes, channels, positions = delta.shape
    d_state = A.shape[1]
    length = positions if table is None else table.shape[1]
    gap_strides = (0, 0) if gaps is None else (gaps.stride(0), gaps.stride(1) if gaps.shape[1] > 1 else 0)
    return _Problem(batch, routes, channels, d_state, length, positions, _ptr(table), _ptr(gaps), *gap_strides,
                    _ctensor(u), _ctensor(delta),
                    _ctensor(z), _ctensor(B), _ctensor(C), _y_tensor(y, merged, table is not None), _ptr(A), _ptr(D),
                    _ptr(delta_bias), int(softplus), int(merged), merge_weight, _ptr(states), chunk_length(d_state),
                    torch.get_num_threads())


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
           delta_bias: Optional[Tensor], table: Optional[Tensor], gaps: Optional[Tensor]) -> None:
    if delta.dim() != 4:
        raise ValueError(f"delta must be (batch, routes, channels, positions), got {tuple(delta.shape)}")
    batch, routes, channels, positions = delta.shape
    for name, t in (("u", u), ("z", z)):
        if t is not None and tuple(t.shape) not in ((batch, channels, positions), tuple(delta.shape)):
            raise ValueError(f"{name} must be {tuple(delta.shape)} or shared {(batch, channels, positions)}, "
                             f"got {tuple(t.shape)}")
    d_state = A.shape[-1]
    if tuple(A.shape) != (routes * channels, d_state):
        raise ValueError(f"A must be {(routes * channels, d_state)}, got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, routes, d_state, positions):
            raise ValueError(f"{name} must be {(batch, routes, d_state, positions)}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (routes * channels,):
            raise ValueError(f"{name} must be {(routes * channels,)}, got {tuple(t.shape)}")
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is not None and (t.device.type != "cpu" or not t.is_floating_point() or t.dtype == torch.float64):
            raise ValueError(f"the fused scan takes float32/bfloat16/float16 CPU tensors; {name} is "
                             f"{t.dtype} on {t.device}")
    if table is not None:
        if table.dtype != torch.int32 or table.dim() != 2 or table.shape[0] != routes or not table.is_contiguous():
            raise ValueError(f"table must be a contiguous int32 (routes={routes}, length) tensor")
        if table.numel() and (int(table.min()) < -1 or int(table.max()) >= positions):
            raise ValueError(f"table entries must lie in [-1, {positions}); got [{int(table.min())}, "
                             f"{int(table.max())}]")
    if gaps is not None:
        length = positions if table is None else table.shape[1]
        if (gaps.dtype != torch.float32 or gaps.dim() != 3 or gaps.shape[0] != batch
                or gaps.shape[1] not in (1, routes) or gaps.shape[2] != length or gaps.stride(2) != 1):
            raise ValueError(f"gaps must be a float32 (batch={batch}, 1 or routes={routes}, length={length}) tensor "
                             f"contiguous along length; got {gaps.dtype} {tuple(gaps.shape)}")


@torch.library.custom_op("mambalab::selective_scan_cpu", mutates_args=())
def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], table: Optional[Tensor],
                       delta_softplus: bool, merge_weight: float, merged: bool,
                       save_states: bool, gaps: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The fused scan of routes read through ``table`` (see ``scan_routes``); returns (y, chunk states)."""
    _check(u, delta, A, B, C, D, z, delta_bias, table, gaps)
    lib = _library()
    batch, routes, channels, positions = delta.shape
    d_state = A.shape[1]
    length = positions if table is None else table.shape[1]
    y = torch.empty(_output_shape(batch, routes, channels, length, positions, merged, table is not None))
    states = torch.empty((batch, routes, -(-length // chunk_length(d_state)), d_state, channels)
                         if save_states else (0,))
    inputs = (_f32(u), _f32(delta), _params(A), _f32(B), _f32(C), _params(D), _f32(z), _params(delta_bias))
    problem = _problem(*inputs, table, gaps, delta_softplus, merge_weight, merged, y,
                       states if save_states else None)
    if lib.mls_forward(ctypes.byref(problem)):
        raise RuntimeError(f"fused selective scan: {lib.mls_last_error().decode()}")
    return y.to(u.dtype), states


@selective_scan_cpu.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, table, delta_softplus, merge_weight, merged, save_states, gaps=None):
    batch, routes, channels, positions = delta.shape
    d_state = A.shape[1]
    length = positions if table is None else table.shape[1]
    y = u.new_empty(_output_shape(batch, routes, channels, length, positions, merged, table is not None))
    states = delta.new_empty((batch, routes, -(-length // chunk_length(d_state)), d_state, channels)
                             if save_states else (0,), dtype=torch.float32)
    return y, states


@torch.library.custom_op("mambalab::selective_scan_cpu_backward", mutates_args=())
def selective_scan_cpu_backward(grad: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                                table: Optional[Tensor], states: Tensor, delta_softplus: bool, merge_weight: float,
                                merged: bool, gaps: Optional[Tensor] = None) -> list[Tensor]:
    """Gradients of the given (non-None) inputs u, delta, A, B, C, D, z, delta_bias, in that order."""
    _check(u, delta, A, B, C, D, z, delta_bias, table, gaps)
    lib = _library()
    inputs = (_f32(u), _f32(delta), _params(A), _f32(B), _f32(C), _params(D), _f32(z), _params(delta_bias))
    uf, deltaf, Af, Bf, Cf, Df, zf, biasf = inputs
    gy = grad.float().contiguous()
    problem = _problem(*inputs, table, gaps, delta_softplus, merge_weight, merged, gy, states)
    du, ddelta = torch.empty_like(uf), torch.empty_like(deltaf)
    dz = None if zf is None else torch.empty_like(zf)
    dB, dC = torch.zeros(Bf.shape), torch.zeros(Cf.shape)
    dA = torch.empty_like(Af)
    dD = None if Df is None else torch.empty_like(Df)
    dbias = None if biasf is None else torch.empty_like(biasf)
    shared = u.dim() == 3 or (z is not None and z.dim() == 3)
    grads = _Grads(_y_tensor(gy, merged, table is not None), _ctensor(du), _ctensor(ddelta), _ctensor(dz),
                   _ctensor(dB), _ctensor(dC), _ptr(dA), _ptr(dD), _ptr(dbias), int(shared or table is not None))
    if lib.mls_backward(ctypes.byref(problem), ctypes.byref(grads)):
        raise RuntimeError(f"fused selective scan backward: {lib.mls_last_error().decode()}")
    results = (du, ddelta, dA, dB, dC, dD, dz, dbias)
    originals = (u, delta, A, B, C, D, z, delta_bias)
    return [g.to(t.dtype) for g, t in zip(results, originals) if t is not None]


@selective_scan_cpu_backward.register_fake
def _(grad, u, delta, A, B, C, D, z, delta_bias, table, states, delta_softplus, merge_weight, merged, gaps=None):
    return [torch.empty_like(t) for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, table, softplus, merge_weight, merged, _, gaps = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, table, gaps, output[1])
    ctx.options = (softplus, merge_weight, merged)
    ctx.output_shape = output[0].shape


def _backward(ctx, grad: Optional[Tensor], _grad_states: Optional[Tensor]):
    *saved, table, gaps, states = ctx.saved_tensors
    if states.numel() == 0:
        raise RuntimeError("mambalab::selective_scan_cpu ran with save_states=False; call it through "
                           "backbones.kernel.scan_routes so that training keeps the chunk states")
    if grad is None:
        grad = torch.zeros(ctx.output_shape)
    grads = iter(selective_scan_cpu_backward(grad, *saved, table, states, *ctx.options, gaps))
    return (*(next(grads) if t is not None else None for t in saved), None, None, None, None, None, None)


selective_scan_cpu.register_autograd(_backward, setup_context=_setup_context)


def _needs_states(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def scan_routes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                table: Optional[Tensor] = None, merge_weight: float = 1.0, merged: bool = True,
                gaps: Optional[Tensor] = None) -> Tensor:
    """Selective scan of K routes that read their tokens in place, through an index table.

    Args:
        u: (batch, K, channels, positions), or (batch, channels, positions) read by every route.
        delta: (batch, K, channels, positions).
        A: (K * channels, d_state); D, delta_bias: (K * channels,) (route k owns rows k * channels...).
        B, C: (batch, K, d_state, positions).
        z: like u, or None.
        table: (K, length) int32: the position route k reads at step t, -1 for padding (which reads zeros,
            as scanning a zero-padded map does); None: step t reads position t.
        merge_weight, merged: with ``merged``, the result is (batch, channels, positions): merge_weight times
            the sum, over routes and steps, of each step's output at the position it read (a scan
            pattern's merge); otherwise per route and step, (batch, K, channels, length).
        gaps: (batch, K or 1, length) float32, for token pruning's aligned scan: step t of route k decays the
            state with dt_t + gaps[b, k, t] * dt_{t-1} (dt_{t-1}: the route's previous step, in table order;
            see ``backbones.ssm.aligned_inputs``); None: the plain scan. Not differentiated (counts).

    Any strides work; channel-contiguous (channels-last) inputs are read with plain vector loads. The
    merged result is a channels-last view.
    """
    save = _needs_states(u, delta, A, B, C, D, z, delta_bias)
    y, _ = selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, table, delta_softplus, merge_weight, merged, save,
                              gaps)
    if merged:
        return y.transpose(1, 2)
    return y.transpose(2, 3) if table is not None else y


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False, gaps: Optional[Tensor] = None) -> Tensor:
    """``backbones.ssm.selective_scan``'s contract on the fused kernel (B/C groups are the routes); ``gaps``
    (batch, groups or 1, length): the aligned scan's skipped positions per step (see ``scan_routes``)."""
    batch, channels, length = u.shape
    B, C = (t if t.dim() == 4 else t.unsqueeze(1) for t in (B, C))
    groups = B.shape[1]
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups of B/C")
    split = (groups, channels // groups)
    y = scan_routes(u.unflatten(1, split), delta.unflatten(1, split), A, B, C, D,
                    None if z is None else z.unflatten(1, split), delta_bias, delta_softplus, merged=False, gaps=gaps)
    return y.flatten(1, 2)
