"""The fused CPU selective-scan kernel (backbones.kernel): float64-oracle parity at every ISA level this
CPU runs, route tables for every scan pattern, token pruning's aligned scan (per-step gaps), model parity
against the pure-PyTorch scan, the custom op under compile/export, the precision policy, and the fallback
when no kernel is built.

Error measure: max |got - expected| / max |expected| over the whole tensor (the issue's relative error).
Entries of a scan output or gradient are sums of many terms of both signs, so an entry-wise relative
error is unbounded near the zeros; scaling by the tensor's largest entry measures the error against the
size of what the tensor carries. fp32 round-off gives 2-7e-7 here; the bounds (5e-6 forward, 1e-5
gradients) are the issue's and leave a 10x margin, while any wrong index, sign or missing term shows up
as an error of order 1.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import timm
import torch

import backbones
from backbones import kernel, ssm
from backbones.scan_patterns import AtrousScan, BidirectionalScan, CrossScan, RouteConcat
from tests.oracle import oracle_aligned_scan, oracle_selective_scan
from tests.test_pruning import pruned_positions
from tests.test_scan_fast import NAMES, relative_error
from tests.test_ssm import make_inputs

BUILT = kernel.available()
needs_kernel = pytest.mark.skipif(not BUILT, reason=f"fused kernel not usable here: {kernel.status().reason}")
LEVELS = kernel.cpu_levels() if BUILT else []
FORWARD_TOL, GRAD_TOL = 5e-6, 1e-5


@pytest.fixture(params=LEVELS or [None])
def isa(request):
    """Run the test at each ISA level this CPU can run (the MAMBALAB_SCAN_ISA choice, made in-process)."""
    if request.param is None:
        pytest.skip(f"fused kernel not usable here: {kernel.status().reason}")
    kernel.select_isa(request.param)
    yield request.param
    kernel.select_isa(None)


def oracle_and_grads(fn, inputs: dict, grad_out: torch.Tensor, softplus: bool = True):
    """Output and input gradients of ``fn`` evaluated in float64 (the sequential scan, by autograd)."""
    leaves = {k: (v.double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=softplus)
    present = [k for k in NAMES if leaves.get(k) is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in present], grad_out.double())
    return y.detach(), dict(zip(present, grads))


def assert_matches(fn, reference, inputs: dict, softplus: bool = True, **kwargs) -> None:
    """fn (float32) against reference (float64): output within 5e-6, every input gradient within 1e-5."""
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=softplus, **kwargs)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = oracle_and_grads(lambda **a: reference(**a, **kwargs), inputs, grad_out, softplus)
    assert torch.isfinite(y).all()
    assert relative_error(y, expected) <= FORWARD_TOL, relative_error(y, expected)
    present = list(expected_grads)
    grads = torch.autograd.grad(y, [leaves[k] for k in present], grad_out)
    for name, grad in zip(present, grads):
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        err = relative_error(grad, expected_grads[name])
        assert err <= GRAD_TOL, f"gradient of {name}: relative error {err:.2e}"


# ----------------------------------------------------------------------------- the plain contract


@pytest.mark.parametrize("d_state", [1, 3, 4, 16])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("optional", [True, False])
@pytest.mark.parametrize("length", [1, 37, 70])
def test_forward_and_gradients_match_float64(isa, d_state, groups, optional, length):
    """20 channels and lengths 37/70: tails of every vector width (4, 8, 16) and of the 32/64-step chunks."""
    inputs = make_inputs(batch=2, channels=20, length=length, d_state=d_state, groups=groups, with_z=optional,
                         with_D=optional, with_bias=optional)
    assert_matches(kernel.selective_scan, ssm.scan_sequential, inputs, softplus=optional)


def test_matches_the_independent_oracle(isa):
    inputs = make_inputs(batch=2, channels=5, length=19, d_state=3, groups=None)
    expected = oracle_selective_scan(**inputs, delta_softplus=True)
    assert relative_error(kernel.selective_scan(**inputs, delta_softplus=True), expected) <= FORWARD_TOL


@pytest.mark.parametrize("d_state", [1, 16])
def test_decay_up_to_a_thousand_is_exact(isa, d_state):
    """|A * dt| up to ~1000 per step (|A| up to 16, dt up to 60): no division anywhere, so nothing overflows."""
    inputs = make_inputs(batch=2, channels=20, length=70, d_state=d_state, groups=2, dt_scale=60.0)
    inputs["A"] = inputs["A"] * (16 / d_state)
    A, dt = inputs["A"], torch.nn.functional.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    assert (A.abs().amax() * dt.amax()).item() > 900
    assert_matches(kernel.selective_scan, ssm.scan_sequential, inputs)


@needs_kernel
@pytest.mark.parametrize("aligned", [False, True])
def test_isa_levels_agree_and_threads_do_not_change_results(aligned):
    """Reductions run in a fixed order: any thread count gives the same bits; levels agree to round-off."""
    inputs = make_inputs(batch=3, channels=40, length=150, d_state=16, groups=2)
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    gaps = gaps_of(route_positions(3, 2, 150, 400), 2) if aligned else None

    def run():
        for leaf in leaves.values():
            if leaf is not None:
                leaf.grad = None
        y = kernel.selective_scan(**leaves, delta_softplus=True, gaps=gaps)
        y.square().sum().backward()
        return [y.detach()] + [leaves[k].grad for k in NAMES if leaves[k] is not None]

    assert_threads_and_levels_agree(run)


def assert_threads_and_levels_agree(run) -> None:
    """``run()``'s tensors are the same bits at 1 and 2 threads, and within 1e-6 at every ISA level."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(2)
        double = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(single, double))
    for level in LEVELS:
        kernel.select_isa(level)
        try:
            other = run()
        finally:
            kernel.select_isa(None)
        for a, b in zip(single, other):
            assert relative_error(b, a.double()) <= 1e-6, level


@needs_kernel
def test_environment_variable_forces_a_level_in_a_fresh_process():
    code = "from backbones import kernel; s = kernel.status(); print(s.isa, '|', s.reason)"
    for level in LEVELS:
        env = dict(os.environ, MAMBALAB_SCAN_ISA=level)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.startswith(f"{level} |") and "MAMBALAB_SCAN_ISA" in out.stdout
    refused = {"sse9": "MAMBALAB_SCAN_ISA='sse9' is not one of", "none": "disabled by MAMBALAB_SCAN_ISA"}
    for value, reason in refused.items():
        env = dict(os.environ, MAMBALAB_SCAN_ISA=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.startswith("None |") and reason in out.stdout


# ----------------------------------------------------------------------------- routes read in place


PATTERNS = {
    "cross": (CrossScan(), (5, 7)),
    "bidirectional": (BidirectionalScan(), (37,)),
    "atrous_odd": (AtrousScan(), (5, 7)),
    "msvmamba_joined": (RouteConcat(CrossScan(), (2, 1, 3)), (4, 6)),
    "groupmamba_one_route": (RouteConcat(CrossScan(), (1,)), (5, 7)),
}


def scan_then_merge(u, delta, A, B, C, D, z, delta_bias, delta_softplus, pattern, spatial, merged, shared_u,
                    unpruned=None):
    """The pure-PyTorch meaning of a route-aware call: gather each route with ``pattern.scan``, scan it
    (float64 sequential loop; with ``unpruned`` (batch, K, length), the unpruned indices of each route's
    steps, the aligned scan), and merge with ``pattern.merge``."""
    batch, routes, channels, positions = delta.shape

    def gather(t):  # (b, K, c, P) per route -> (b, K, c, L) in route order, via pattern.scan
        maps = t.reshape(batch * routes, t.shape[2], *spatial)
        scanned = pattern.scan(maps)  # (b*K, K, c, L): route k of map k is what route k reads
        index = torch.arange(routes)
        return scanned.view(batch, routes, routes, t.shape[2], -1)[:, index, index]

    u4 = u.unsqueeze(1).expand(batch, routes, channels, positions) if shared_u else u
    xs, dts, Bs, Cs = gather(u4), gather(delta), gather(B), gather(C)
    length = xs.shape[-1]
    ys = ssm.selective_scan(xs.reshape(batch, routes * channels, length), dts.reshape(batch, -1, length), A, Bs, Cs,
                            D, None, delta_bias, delta_softplus, backend="reference",
                            positions=unpruned).view(batch, routes, channels, length)
    return pattern.merge(ys, spatial).flatten(2) if merged else ys


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("shared_u", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_routes_read_in_place_match_scan_and_merge(isa, name, merged, shared_u, channels_last):
    inputs = route_inputs(PATTERNS[name], shared_u, channels_last)
    pattern, spatial = PATTERNS[name]
    table = pattern.route_table(spatial)

    def fused(**kw):
        return kernel.scan_routes(**kw, table=table, merge_weight=pattern.merge_weight, merged=merged)

    def reference(**kw):
        return scan_then_merge(**kw, pattern=pattern, spatial=spatial, merged=merged, shared_u=shared_u)

    assert_matches(fused, reference, inputs)


def route_inputs(pattern_and_spatial: tuple, shared_u: bool, channels_last: bool) -> dict:
    """Random inputs of a route-aware call of ``pattern`` on ``spatial``: 20 channels, d_state 4."""
    pattern, spatial = pattern_and_spatial
    table = pattern.route_table(spatial)
    routes, positions, channels, d_state = table.shape[0], int(torch.tensor(spatial).prod()), 20, 4
    g = torch.Generator().manual_seed(0)

    def tensor(*shape):
        t = torch.randn(*shape, generator=g)
        # channels-last: channels innermost in memory (the SS2D layout); else positions innermost
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if channels_last else t

    return dict(
        u=tensor(2, channels, positions) if shared_u else tensor(2, routes, channels, positions),
        delta=tensor(2, routes, channels, positions) * 0.5, A=-torch.rand(routes * channels, d_state) * 4,
        B=torch.randn(2, routes, d_state, positions, generator=g),
        C=torch.randn(2, routes, d_state, positions, generator=g),
        D=torch.randn(routes * channels, generator=g), z=None,
        delta_bias=torch.randn(routes * channels, generator=g) * 0.5)


# ----------------------------------------------------------------------------- token pruning: per-step gaps


def route_positions(batch: int, groups: int, length: int, full: int) -> torch.Tensor:
    """(batch, groups, length) unpruned indices of each group's (route's) tokens out of ``full``: group 0 a
    forward route (increasing), the others reversed routes (decreasing: their previous step is the next token
    in memory)."""
    maps = [pruned_positions(batch, length, full, seed=1 + k) for k in range(groups)]
    return torch.stack([m if k == 0 else full - 1 - m for k, m in enumerate(maps)], dim=1)


def gaps_of(positions: torch.Tensor, groups: int) -> torch.Tensor:
    """The kernel's gaps argument, (batch, groups or 1, length) float32, from ``ssm.position_gaps``."""
    return ssm.position_gaps(positions, groups).squeeze(2).float()


@pytest.mark.parametrize("d_state", [1, 3, 16])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("optional", [True, False])
@pytest.mark.parametrize("length,full", [(37, 60), (70, 700)])
def test_aligned_gaps_match_the_reparametrised_float64_scan(isa, d_state, groups, optional, length, full):
    """The kernel's native gaps against the rule, ``aligned_inputs`` before the float64 sequential scan. Keeping
    37 of 60 leaves many gaps of 0 and 1; 70 of 700 gaps of ~9 and up to ~50, where exp(A (dt + g dt_prev))
    wipes the state (for d_state 16, |A| up to 16). Grouped: route 1 runs reversed (decreasing positions).
    d_state 16 at length 70 crosses the 64-step chunks of backward (gaps hand gradient across them)."""
    inputs = make_inputs(batch=2, channels=20, length=length, d_state=d_state, groups=groups, with_z=optional,
                         with_D=optional, with_bias=optional)
    positions = route_positions(2, groups, length, full) if groups else pruned_positions(2, length, full)
    gaps = gaps_of(positions, groups or 1)
    assert gaps.max() >= (30 if full == 700 else 1) and (gaps == 0).any()

    def fused(**kw):
        return kernel.selective_scan(**kw, gaps=gaps)

    def rule(**kw):
        return ssm.selective_scan(**kw, backend="reference", positions=positions)

    assert_matches(fused, rule, inputs, softplus=optional)


def test_aligned_gaps_cross_chunk_boundaries(isa):
    """d_state 3 (the kernel's generic-N path, 256-step chunks) over 300 steps: the forward's step before each
    chunk and backward's recomputed one must agree, and step 256's gap gradient must reach step 255."""
    inputs = make_inputs(batch=1, channels=10, length=300, d_state=3, groups=2)
    positions = route_positions(1, 2, 300, 900)
    gaps = gaps_of(positions, 2)
    assert_matches(lambda **kw: kernel.selective_scan(**kw, gaps=gaps),
                   lambda **kw: ssm.selective_scan(**kw, backend="reference", positions=positions), inputs)


def test_aligned_gaps_match_the_independent_oracle(isa):
    """Forward and every gradient against ``oracle_aligned_scan``, which steps through the unpruned sequence
    (pruned positions decay only) rather than using the reparametrisation."""
    inputs = make_inputs(batch=2, channels=5, length=19, d_state=3)
    positions = pruned_positions(2, 19, 45)
    gaps = gaps_of(positions, 1)
    assert_matches(lambda **kw: kernel.selective_scan(**kw, gaps=gaps),
                   lambda **kw: oracle_aligned_scan(**kw, positions=positions), inputs)


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("d_state", [1, 3, 16])
def test_zero_gaps_are_the_plain_kernel(isa, groups, d_state):
    """All gaps 0 (keep ratio 1): the gapped kernel adds exact zeros, so output and gradients equal the plain
    kernel's bit for bit."""
    inputs = make_inputs(batch=2, channels=20, length=70, d_state=d_state, groups=groups)
    results = []
    for gaps in (None, torch.zeros(2, groups or 1, 70)):
        leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
        y = kernel.selective_scan(**leaves, delta_softplus=True, gaps=gaps)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        results.append([y.detach()] + [leaves[k].grad for k in NAMES])
    for name, plain, gapped in zip(("y", *NAMES), *results):
        assert torch.equal(plain, gapped), name


@pytest.mark.parametrize("name", ["bidirectional", "cross", "atrous_odd"])
@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_routes_read_in_place_take_gaps_in_table_order(isa, name, merged, channels_last):
    """Per-route gaps follow each route's table order (the reversed Vim route reads its previous step from the
    next token in memory; atrous routes jump across the map and have padding steps), against gather ->
    reparametrised float64 scan -> merge."""
    inputs = route_inputs(PATTERNS[name], False, channels_last)
    pattern, spatial = PATTERNS[name]
    table = pattern.route_table(spatial)
    routes, length = table.shape
    positions = torch.stack([pruned_positions(2, length, 3 * length, seed=k) for k in range(routes)], dim=1)
    gaps = gaps_of(positions, routes)

    def fused(**kw):
        return kernel.scan_routes(**kw, table=table, merge_weight=pattern.merge_weight, merged=merged, gaps=gaps)

    def reference(**kw):
        return scan_then_merge(**kw, pattern=pattern, spatial=spatial, merged=merged, shared_u=False,
                               unpruned=positions)

    assert_matches(fused, reference, inputs)


@needs_kernel
def test_bad_gaps_are_refused():
    inputs = make_inputs(batch=2, channels=4, length=13, d_state=4, groups=2)
    for bad in (torch.zeros(2, 3, 13), torch.zeros(2, 2, 12), torch.zeros(2, 2, 13, dtype=torch.float64)):
        with pytest.raises(ValueError, match="gaps must be a float32"):
            kernel.selective_scan(**inputs, gaps=bad)


# ----------------------------------------------------------------------------- models

FAMILIES = [name for name in backbones.list_backbones() if name.startswith("test_")]


@needs_kernel
@pytest.mark.parametrize("name", FAMILIES)
def test_models_match_the_pure_pytorch_scan(name):
    """Logits, every stage's features and every parameter gradient, fused kernel vs the torch backend, same
    (perturbed, so that no zero-initialised layer hides a branch) weights. The two differ by fp32 rounding
    only (pixel-order projections, another summation order): measured <= 5e-7 on features and <= 5e-6
    on gradients; a wrong route, weight or gradient term would be O(1).

    Gradients are judged against the float64 model: some models amplify fp32 rounding in their gradients
    (MHS's scan route attention: both fp32 backends are up to ~2e-4 off float64 there), so the fused
    kernel may be off by the pure-PyTorch scan's own fp32 error (x3) on top of the 5e-5 floor."""
    torch.manual_seed(0)
    reference = timm.create_model(name, scan_backend="torch").eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = timm.create_model(name, scan_backend="fused").eval()
    fused.load_state_dict(reference.state_dict())
    oracle = copy.deepcopy(reference).double()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = [m(x) for m in (reference, fused)]
    assert relative_error(logits[1], logits[0].double()) <= 5e-6
    stages = [m.forward_intermediates(x, intermediates_only=True) for m in (reference, fused)]
    for expected, got in zip(*stages):
        assert relative_error(got, expected.double()) <= 5e-6
    stages.append(oracle.forward_intermediates(x.double(), intermediates_only=True))
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in stages[0]]
    for outputs in stages:
        torch.autograd.backward(outputs, [c.to(outputs[0].dtype) for c in cotangents])
    for (param_name, p), q, exact in zip(reference.named_parameters(), fused.parameters(), oracle.parameters()):
        if p.grad is not None:
            fp32_noise = relative_error(p.grad, exact.grad)
            assert relative_error(q.grad, exact.grad) <= 5e-5 + 3 * fp32_noise, param_name


@needs_kernel
def test_auto_picks_the_kernel_on_cpu_and_the_pure_scan_for_onnx(monkeypatch):
    assert ssm.resolve_backend("auto", torch.device("cpu")) == "fused"
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert ssm.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="CPU tensors"):
        ssm.resolve_backend("fused", torch.device("meta"))


@needs_kernel
def test_float64_takes_the_pure_path_and_gradchecks():
    inputs = make_inputs(batch=1, channels=2, length=7, d_state=3, groups=2, dtype=torch.float64)
    tensors = [inputs[n].requires_grad_() for n in NAMES]

    def fn(*args):
        return ssm.selective_scan(**dict(zip(NAMES, args)), delta_softplus=True, backend="fused")

    assert fn(*tensors).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    inputs = make_inputs(batch=2, channels=24, length=100, d_state=16, groups=2)
    low = {k: (v.to(dtype) if v is not None and k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in low.items()}
    got = ssm.selective_scan(**leaves, delta_softplus=True, backend="fused")
    assert got.dtype == dtype
    got.float().square().sum().backward()
    assert all(leaves[k].grad.dtype == low[k].dtype for k in low if low[k] is not None)
    # a float32 scan of the same rounded inputs differs only by the final rounding to `dtype`
    expected = ssm.scan_sequential(**{k: (v.float() if v is not None else None) for k, v in low.items()},
                                   delta_softplus=True)
    ulp = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
    assert ((got.float() - expected).abs() <= ulp * expected.abs() + 1e-5).all()


@needs_kernel
def test_backward_keeps_chunk_states_not_the_state_history():
    batch, channels, length, d_state = 2, 64, 512, 16
    inputs = make_inputs(batch=batch, channels=channels, length=length, d_state=d_state, groups=2)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, states = kernel.selective_scan_cpu(leaves["u"].unflatten(1, (2, 32)), leaves["delta"].unflatten(1, (2, 32)),
                                          leaves["A"], inputs["B"], inputs["C"], None, None, None, None, True, 1.0,
                                          False, True)
    history = batch * channels * length * d_state
    assert states.numel() * kernel.chunk_length(d_state) == history


# ----------------------------------------------------------------------------- custom op: compile, export


def _op_args(table: bool, merged: bool, requires_grad: bool = True, aligned: bool = False) -> tuple:
    pattern, spatial = CrossScan(), (3, 5)
    g = torch.Generator().manual_seed(0)
    routes, channels, positions, d_state = 4, 6, 15, 2
    args = [torch.randn(2, routes, channels, positions, generator=g),
            torch.rand(2, routes, channels, positions, generator=g),
            -torch.rand(routes * channels, d_state, generator=g),
            torch.randn(2, routes, d_state, positions, generator=g),
            torch.randn(2, routes, d_state, positions, generator=g),
            torch.randn(routes * channels, generator=g), None, torch.randn(routes * channels, generator=g)]
    args = [a.requires_grad_(requires_grad) if a is not None else None for a in args]
    gaps = torch.randint(0, 5, (2, routes, positions), generator=g).float() if aligned else None
    return (*args, pattern.route_table(spatial) if table else None, True, 1.0, merged, requires_grad, gaps)


@needs_kernel
@pytest.mark.parametrize("table,merged,aligned", [(False, False, False), (True, True, False), (True, False, False),
                                                  (True, True, True)])
def test_opcheck(table, merged, aligned):
    torch.library.opcheck(kernel.selective_scan_cpu, _op_args(table, merged, aligned=aligned))


@needs_kernel
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_compiles_in_one_graph(name):
    """Route tables and the custom op trace without graph breaks."""
    torch.manual_seed(0)
    model = timm.create_model(name, scan_backend="fused").eval()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@needs_kernel
def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = timm.create_model("test_vmamba", scan_backend="fused")
    x = torch.randn(2, 3, 32, 32)
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().mean().backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@needs_kernel
def test_torch_export_keeps_the_fused_op():
    torch.manual_seed(0)
    model = timm.create_model("test_vim", scan_backend="fused").eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    assert "mambalab.selective_scan_cpu" in str(program.graph)
    assert "mambalab.causal_conv_silu_cpu" in str(program.graph)  # Vim's conv + SiLU (backbones.kernel.conv)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.slow
def test_onnx_export_traces_the_pure_scan_and_matches_the_kernel(tmp_path):
    """backend="auto" runs the kernel in eager mode, but ONNX has no such op: the export traces the
    pure-PyTorch formulation, and onnxruntime reproduces the eager (kernel) logits."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = timm.create_model("test_vmamba").eval()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "test_vmamba.onnx"
    torch.onnx.export(model, (x,), path, dynamo=True, input_names=["images"], output_names=["logits"])
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert relative_error(torch.from_numpy(got), expected.double()) <= 1e-5


# ----------------------------------------------------------------------------- no kernel


@pytest.fixture
def no_kernel(monkeypatch, tmp_path):
    """Pretend nothing was built (as on a machine without a compiler)."""
    monkeypatch.setattr(kernel, "MANIFEST", tmp_path / "manifest.json")
    kernel._reset()
    yield
    monkeypatch.undo()
    kernel._reset()


def test_without_a_built_kernel_everything_falls_back(no_kernel):
    from tools import doctor

    assert not kernel.available()
    assert ssm.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="python -m backbones.kernel build"):
        ssm.resolve_backend("fused", torch.device("cpu"))
    model = timm.create_model("test_vmamba").eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    report = doctor.backend_report()
    assert report["fused"].startswith("not usable: the fused kernel is not built")
    assert "CPU tensors -> torch" in report["auto"]
    assert doctor.aligned_scan_report().startswith("CPU: the torch backend after ssm.aligned_inputs'")


@needs_kernel
def test_doctor_says_which_kernel_runs():
    from tools import doctor

    report = doctor.backend_report()
    assert report["fused"].startswith(f"usable: {kernel.status().isa} build")
    assert "CPU tensors -> fused" in report["auto"]
    assert doctor.aligned_scan_report().startswith("CPU: native in the fused kernel")
