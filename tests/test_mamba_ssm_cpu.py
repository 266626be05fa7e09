"""The ``mamba_ssm`` backend run end to end without a GPU.

mamba-ssm's real Python package (installed by ``make test`` without its CUDA build) runs its
``SelectiveScanFn`` on CPU tensors, with ``tests/selective_scan_cuda_cpu.py`` standing in for the
compiled extension. So our whole path -- dtype and contiguity handling, grouped and ungrouped B/C,
the custom op and its backward op, the chunk states handed from forward to backward -- runs and is
checked against the float64 oracle, down to what the extension receives.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import sys

import pytest
import timm
import torch

import backbones
from backbones import ssm
from tests import selective_scan_cuda_cpu as extension
from tests.test_scan_fast import NAMES, check_against_oracle, oracle_with_grads, relative_error
from tests.test_ssm import make_inputs
from tools import gpu_check

INTERFACE = "mamba_ssm.ops.selective_scan_interface"
TEST_MODELS = sorted(name for name in backbones.list_backbones() if name.startswith("test_"))


@pytest.fixture(scope="module")
def mamba_ssm_imported():
    """mamba-ssm imported for real, its ``selective_scan_cuda`` replaced by the CPU stand-in."""
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm's Python package is not installed (`make test` installs it without its CUDA build)")
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "selective_scan_cuda", extension)
        patch.setattr(importlib.import_module(INTERFACE), "selective_scan_cuda", extension)
        yield sys.modules[INTERFACE]
    for name in set(sys.modules) - before:
        if name.partition(".")[0] == "mamba_ssm":
            del sys.modules[name]


@pytest.fixture
def kernel(mamba_ssm_imported):
    """mamba-ssm's ``SelectiveScanFn``, allowed on CPU tensors for the test."""
    extension.calls.clear()
    with ssm.mamba_ssm_on_cpu_for_tests():
        yield ssm.mamba_ssm_status()[0]


mamba_scan = functools.partial(ssm.selective_scan, backend="mamba_ssm")


def test_the_hook_imports_the_real_function_and_only_while_it_is_active(mamba_ssm_imported):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with ssm.mamba_ssm_on_cpu_for_tests():
        assert ssm.mamba_ssm_status() == (mamba_ssm_imported.SelectiveScanFn, "available")
        assert mamba_ssm_imported.selective_scan_cuda is extension
        assert ssm.resolve_backend("mamba_ssm", cpu) == "mamba_ssm"
        assert ssm.resolve_backend("auto", cpu) != "mamba_ssm"  # auto never picks it for CPU tensors
        assert ssm.resolve_backend("auto", cuda, torch.float32) == "mamba_ssm"
        assert ssm.resolve_backend("auto", cuda, torch.float64) == "torch"  # the kernel has no float64
    if not torch.cuda.is_available():
        assert ssm.mamba_ssm_status() == (None, "no CUDA device is visible to torch")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            ssm.selective_scan(**make_inputs(length=3, d_state=2), backend="mamba_ssm")


@pytest.mark.parametrize("d_state", [1, 4, 16])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("optional", [True, False])
def test_matches_the_oracle_forward_and_every_gradient(kernel, d_state, groups, optional):
    inputs = make_inputs(length=13, d_state=d_state, groups=groups, with_z=optional, with_D=optional,
                         with_bias=optional)
    for softplus in (True, False):
        extension.calls.clear()
        check_against_oracle(mamba_scan, inputs, softplus=softplus)
        # the forward, then the backward op: forward again (for the chunk states), backward
        assert [kind for kind, _ in extension.calls] == ["fwd", "fwd", "bwd"]
        received, gradient = extension.calls[0][1], extension.calls[2][1]
        assert received["B"][0] == (2, groups or 1, d_state, 13)  # ungrouped B/C reach the kernel as one group
        assert received["A"][1] == torch.float32 and received["delta_softplus"] is softplus
        assert (received["z"] is None) is (not optional) and (received["D"] is None) is (not optional)
        assert gradient["x"][0] == (2, 4, 1, 2 * d_state)  # the chunk states of the forward it reran
        assert (gradient["out"] is None) is (not optional)  # the pre-gate output, needed for dz


def test_aligned_scan_of_pruned_tokens_runs_through_it(kernel):
    """Token pruning's aligned scan on the mamba_ssm path: the reparametrised (u, delta) reach the kernel (no bias,
    no softplus, no D/z), and values and gradients match the torch path in float64 within fp32 rounding."""
    from tests.test_pruning import pruned_positions

    inputs = make_inputs(length=16, d_state=4, groups=2)
    positions = pruned_positions(2, 16, 40)
    routes = torch.stack((positions, positions.flip(-1)), dim=1)
    names = [n for n, v in inputs.items() if v is not None]

    def run(backend, dtype):
        leaves = {n: inputs[n].detach().to(dtype).requires_grad_() for n in names}
        out = ssm.selective_scan(**leaves, delta_softplus=True, backend=backend, positions=routes)
        out.sum().backward()
        return out, {n: leaves[n].grad for n in names}

    extension.calls.clear()
    got, got_grads = run("mamba_ssm", torch.float32)
    received = extension.calls[0][1]
    assert received["delta_softplus"] is False and received["delta_bias"] is None and received["D"] is None
    expected, expected_grads = run("torch", torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    for name in names:
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(got_grads[name].double(), expected_grads[name], rtol=1e-4, atol=1e-4 * scale,
                                   msg=name)


@pytest.mark.parametrize("groups", [None, 2])
def test_stand_in_agrees_with_mamba_ssms_own_reference(kernel, groups):
    """mamba-ssm's ``selective_scan_fn`` (its Function over the stand-in) against its ``selective_scan_ref``:
    the stand-in reads grouped B/C, D, z and the bias the way mamba-ssm defines them."""
    interface = sys.modules[INTERFACE]
    inputs = make_inputs(length=21, d_state=4, groups=groups)
    got = interface.selective_scan_fn(**inputs, delta_softplus=True)
    expected = interface.selective_scan_ref(**inputs, delta_softplus=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_long_sequences_hand_chunk_states_to_backward(kernel):
    length = extension.CHUNK_LEN + 52  # two chunks: the second starts from the first's saved state
    inputs = make_inputs(batch=1, channels=2, length=length, d_state=3, groups=2, dt_scale=0.05)
    check_against_oracle(mamba_scan, inputs)
    _, backward = extension.calls[-1]
    assert backward["x"][0] == (1, 2, 2, 6)


def test_strided_inputs_are_made_contiguous_where_the_kernel_needs_it(kernel):
    """Views whose last dim is strided, as a transposed projection or a slice of a parameter gives them."""
    dense = make_inputs(length=11, d_state=4, groups=2)
    last_dims = {"u": (1, 2), "delta": (1, 2), "z": (1, 2), "B": (2, 3), "C": (2, 3)}
    leaves = {k: dense[k].transpose(*dims).contiguous().requires_grad_() for k, dims in last_dims.items()}
    leaves.update(A=dense["A"].clone().requires_grad_(),
                  D=torch.stack((dense["D"], dense["D"]), 1).requires_grad_(),
                  delta_bias=torch.stack((dense["delta_bias"], dense["delta_bias"]), 1).requires_grad_())
    views = {k: leaves[k].transpose(*dims) for k, dims in last_dims.items()}
    views.update(A=leaves["A"], D=leaves["D"][:, 0], delta_bias=leaves["delta_bias"][:, 0])
    assert all(views[k].stride(-1) != 1 for k in NAMES if k != "A")
    y = mamba_scan(**views, delta_softplus=True)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = oracle_with_grads(dense, grad_out, softplus=True)
    assert relative_error(y, expected) <= 1e-5
    grads = dict(zip(NAMES, torch.autograd.grad(y, [views[k] for k in NAMES], grad_out)))
    for name in NAMES:
        assert relative_error(grads[name], expected_grads[name]) <= 1e-5, name


def test_mixed_input_dtypes_run_in_the_wider_one(kernel):
    inputs = make_inputs(length=9, d_state=4, groups=2)
    mixed = dict(inputs, u=inputs["u"].bfloat16(), z=inputs["z"].bfloat16())  # delta, B, C stay float32
    leaves = {k: v.clone().requires_grad_() for k, v in mixed.items()}
    out = mamba_scan(**leaves, delta_softplus=True)
    received = extension.calls[0][1]
    assert {received[k][1] for k in ("u", "delta", "B", "C", "z")} == {torch.float32}
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(leaves[k].grad.dtype == mixed[k].dtype for k in NAMES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_reach_the_kernel_unconverted(kernel, dtype):
    inputs = make_inputs(batch=2, channels=8, length=40, d_state=16, groups=2)
    low = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    got = mamba_scan(**low, delta_softplus=True)
    assert {extension.calls[0][1][k][1] for k in ("u", "delta", "B", "C", "z")} == {dtype}
    assert got.dtype == dtype
    upcast = {k: v.float() for k, v in low.items()}
    expected = ssm.scan_sequential(**upcast, delta_softplus=True)
    ulp = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # one rounding of the float32 result
    assert ((got.float() - expected).abs() <= ulp * expected.abs() + 1e-6).all()


def test_float64_and_bad_groups_are_refused_with_the_reason(kernel):
    with pytest.raises(RuntimeError, match="float64"):
        mamba_scan(**make_inputs(length=5, d_state=2, dtype=torch.float64))
    bad = make_inputs(channels=6, length=5, d_state=2, groups=4)
    with pytest.raises(ValueError, match="6 channels cannot be split into 4 groups"):
        mamba_scan(**bad)
    assert not extension.calls  # refused before the kernel was called


def test_custom_op_passes_opcheck_with_the_real_function(kernel):
    inputs = make_inputs(length=7, d_state=3, groups=2)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    torch.library.opcheck(ssm.selective_scan_cuda_op, tuple(leaves[k] for k in NAMES) + (True,))


@pytest.mark.parametrize("name", TEST_MODELS)
def test_every_family_matches_the_float64_model_through_it(kernel, name):
    """tools.gpu_check's family check, on CPU: logits and every parameter gradient through mamba-ssm's path
    in float32 are as close to the float64 model as our float32 torch path (within 10x, or below 1e-5),
    with the scans made to carry the output (a swapped B/C then shows as 1e-4 to 1e-1)."""
    result = gpu_check.check_model(name, torch.device("cpu"))
    assert result["passed"], result
    assert result["backends_seen"] == {"float64": ["torch"], "torch": ["torch"], "mamba_ssm": ["mamba_ssm"]}
    kinds = [kind for kind, _ in extension.calls]
    assert kinds.count("fwd") == 2 * kinds.count("bwd") > 0  # per scan: forward, then forward again and backward


def test_compiled_model_runs_the_op_forward_and_backward(kernel):
    torch.manual_seed(0)
    model = timm.create_model("test_vmamba", num_classes=10, scan_backend="mamba_ssm").eval()
    gpu_check.make_scans_matter(model)
    images = torch.randn(2, 3, 32, 32)
    eager_logits, eager_grads, _ = gpu_check.logits_and_grads(copy.deepcopy(model), images, "auto")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits, _, _ = gpu_check.logits_and_grads(compiled, images, "auto")
    assert extension.calls  # the compiled graph ran the kernel
    torch.testing.assert_close(logits, eager_logits)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], msg=name)


def test_python_only_install_says_how_to_get_the_kernel(mamba_ssm_imported, monkeypatch):
    """mamba-ssm as ``make`` installs it, without the stand-in, cannot import its extension; the reason says why."""
    for name in [n for n in sys.modules if n.partition(".")[0] in ("mamba_ssm", "selective_scan_cuda")]:
        monkeypatch.delitem(sys.modules, name)  # a fresh import, restored afterwards
    before = set(sys.modules)
    try:
        with ssm.mamba_ssm_on_cpu_for_tests():
            kernel, reason = ssm.mamba_ssm_status()
    finally:
        for name in set(sys.modules) - before:
            if name.partition(".")[0] == "mamba_ssm":
                del sys.modules[name]
    if importlib.util.find_spec("selective_scan_cuda") is None:  # else: a CUDA machine with the real extension
        assert kernel is None and "installed without its compiled CUDA extension" in reason
        assert "pip install --force-reinstall --no-deps --no-build-isolation mamba-ssm==2.3.1" in reason


@pytest.mark.parametrize("name", ["test_vmamba", "test_hrvmamba"])  # HRVMamba's logits depend least on a scan
def test_gpu_check_catches_a_swapped_argument(kernel, monkeypatch, name):
    """tools.gpu_check's checks pass the stand-in (above) and fail it once it swaps B and C in the forward."""
    case = gpu_check.ScanCase(2, 8, 40, 4, 2, with_z=True, with_D_and_bias=True)
    row = gpu_check.check_scan(case, torch.device("cpu"))
    assert row["passed"] and gpu_check.describe_scan(row).startswith("  ok   2x8x40 N=4 groups=2")
    json.dumps(row)  # what --out writes
    real_fwd = extension.fwd
    monkeypatch.setattr(extension, "fwd", lambda u, delta, A, B, C, *rest: real_fwd(u, delta, A, C, B, *rest))
    assert not gpu_check.check_scan(case, torch.device("cpu"))["passed"]
    row = gpu_check.check_model(name, torch.device("cpu"))
    assert not row["passed"] and gpu_check.describe_model(row).startswith(f"  FAIL {name}: logits")
