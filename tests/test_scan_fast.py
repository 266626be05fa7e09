"""The fast pure-PyTorch scan: exactness against the float64 oracle (forward and every input
gradient), bounded memory, stability for large |A*delta|, the precision policy and the CUDA op wrapper."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F

import backbones  # noqa: F401  (registers the models with timm)
from backbones import ssm
from tests.oracle import oracle_selective_scan
from tests.test_ssm import make_inputs

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected| (the issue's error measure; absolute if expected is 0)."""
    scale = expected.abs().max().clamp_min(1e-30)
    return ((got.double() - expected).abs().max() / scale).item()


def oracle_with_grads(inputs: dict, grad_out: torch.Tensor, softplus: bool) -> tuple[torch.Tensor, dict]:
    """Oracle output and its input gradients in float64.

    The oracle evaluates the z gate with Python floats, so its z gradient is formed here from the
    ungated oracle output: d/dz [y * silu(z)] = y * silu'(z).
    """
    leaves = {k: v.double().requires_grad_() for k, v in inputs.items() if v is not None}
    args = dict(leaves, z=None)
    ungated = oracle_selective_scan(**args, delta_softplus=softplus)
    y = ungated
    if inputs["z"] is not None:
        z = inputs["z"].double()
        y = ungated * F.silu(z)
    present = [k for k in leaves if k != "z"]
    grads = dict(zip(present, torch.autograd.grad(y, [leaves[k] for k in present], grad_out.double())))
    if inputs["z"] is not None:
        sig = torch.sigmoid(z)
        grads["z"] = grad_out.double() * ungated.detach() * sig * (1 + z * (1 - sig))
    return y.detach(), grads


def check_against_oracle(fn, inputs: dict, softplus: bool = True, tol: float = 1e-5) -> None:
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=softplus)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = oracle_with_grads(inputs, grad_out, softplus)
    assert torch.isfinite(y).all()
    assert relative_error(y, expected) <= tol, relative_error(y, expected)
    present = [k for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in present], grad_out)
    for name, grad in zip(present, grads):
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape
        err = relative_error(grad, expected_grads[name])
        assert err <= tol, f"gradient of {name}: relative error {err:.2e}"


# Small chunks and tiny blocks so that one call has several row slabs, several token blocks,
# several chunks per block and a shorter final chunk (37 = 4 * 8 + 5).
SMALL = functools.partial(ssm.scan_chunked, chunk_len=8, block_elements=512)


@pytest.mark.parametrize("d_state", [1, 16])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("optional", [True, False])
def test_chunked_matches_oracle_forward_and_all_gradients(d_state, groups, optional):
    inputs = make_inputs(length=37, d_state=d_state, groups=groups, with_z=optional, with_D=optional,
                         with_bias=optional)
    check_against_oracle(SMALL, inputs)


@pytest.mark.parametrize("length", [1, 5, 64, 130])
def test_chunked_default_plan_and_awkward_lengths(length):
    inputs = make_inputs(batch=1, channels=4, length=length, d_state=4, groups=2)
    check_against_oracle(ssm.scan_chunked, inputs, softplus=False)


@pytest.mark.parametrize("dt_scale", [3.0, 12.0])
def test_large_decay_is_exact(dt_scale):
    """|A*delta| per step up to ~190 (S4D-real A = -(1..16)): the ratio trick alone would give NaN."""
    inputs = make_inputs(length=70, d_state=16, groups=2, dt_scale=dt_scale)
    check_against_oracle(functools.partial(ssm.scan_chunked, chunk_len=16, block_elements=4096), inputs)


def test_mixed_chunks_some_over_the_decay_limit():
    inputs = make_inputs(length=48, d_state=16, groups=2, with_bias=False, dt_scale=0.2)
    inputs["delta"][:, :, 20:28] *= 40.0  # one chunk of 16 exceeds the limit, the others do not
    dA = (inputs["delta"].unsqueeze(-1) * inputs["A"].abs()[None, :, None, :]).amax(dim=(0, 1, 3))
    sums = dA.unflatten(0, (3, 16)).sum(1)
    assert (sums > ssm.LOG_DECAY_LIMIT).any() and (sums < ssm.LOG_DECAY_LIMIT).any()
    check_against_oracle(functools.partial(ssm.scan_chunked, chunk_len=16), inputs, softplus=False)


def test_blocking_does_not_change_results():
    inputs = make_inputs(batch=2, channels=8, length=100, d_state=16, groups=4)
    reference = ssm.scan_chunked(**inputs, delta_softplus=True)
    for chunk_len, block_elements in [(8, 1), (16, 3000), (64, 1 << 30), (100, 1 << 12)]:
        got = ssm.scan_chunked(**inputs, delta_softplus=True, chunk_len=chunk_len, block_elements=block_elements)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_gradcheck_float64_with_chunks_blocks_and_large_decay():
    inputs = make_inputs(batch=1, channels=4, length=19, d_state=3, groups=2, dt_scale=60.0, dtype=torch.float64)
    tensors = [inputs[n].requires_grad_() for n in NAMES]

    def fn(*args):
        return ssm.scan_chunked(**dict(zip(NAMES, args)), delta_softplus=True, chunk_len=4, block_elements=24)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5)


def _saved_numel(fn, inputs: dict) -> int:
    """Elements autograd keeps for backward (inputs saved by reference count as well)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel()
        return t

    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(**leaves, delta_softplus=True)
    return total


def test_memory_saved_for_backward_is_far_below_the_state_history():
    batch, channels, length, d_state = 2, 64, 256, 16
    inputs = make_inputs(batch=batch, channels=channels, length=length, d_state=d_state, groups=2)
    history = batch * channels * length * d_state
    chunked = _saved_numel(ssm.scan_chunked, inputs)
    assert chunked < 0.5 * history, chunked / history
    # the same measure on the autograd-through-the-scan formulation keeps several full histories
    assert _saved_numel(ssm.scan_oddeven, inputs) > 2 * history


def test_torch_backend_is_chunked_in_eager_and_oddeven_on_meta_tensors():
    inputs = make_inputs(length=9, d_state=4)
    assert not ssm.is_tracing(inputs["u"])
    meta = {k: (v.to("meta") if v is not None else None) for k, v in inputs.items()}
    assert ssm.is_tracing(meta["u"])
    out = ssm.selective_scan(**meta, delta_softplus=True, backend="torch")
    assert out.device.type == "meta" and out.shape == inputs["u"].shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    inputs = make_inputs(batch=2, channels=8, length=300, d_state=16, groups=2)
    low = {k: (v.to(dtype) if v is not None and k in ("u", "delta", "B", "C", "z") else v)
           for k, v in inputs.items()}
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in low.items()}
    got = ssm.selective_scan(**leaves, delta_softplus=True, backend="torch")
    assert got.dtype == dtype
    got.float().square().sum().backward()
    assert all(leaves[k].grad.dtype == low[k].dtype for k in low if low[k] is not None)
    # an fp32 scan of the same rounded inputs differs only by the final rounding to `dtype`
    upcast = {k: (v.float() if v is not None else None) for k, v in low.items()}
    expected = ssm.scan_sequential(**upcast, delta_softplus=True)
    ulp = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
    assert ((got.float() - expected).abs() <= ulp * expected.abs() + 1e-6).all()


def _train_losses(model: torch.nn.Module, autocast: bool, steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_bf16_autocast_training_matches_fp32():
    torch.manual_seed(0)
    model = timm.create_model("test_vmamba", num_classes=10, scan_backend="torch")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = _train_losses(model, autocast=False)
    model.load_state_dict(state)
    bf16 = _train_losses(model, autocast=True)
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert fp32[-1] < fp32[0]  # the steps do train
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.02 * abs(a), (fp32, bf16)


# ----------------------------------------------------------------------------- CUDA op wrapper


def test_cuda_op_fake_implementation_runs_on_meta_tensors():
    inputs = {k: (v.to("meta") if v is not None else None) for k, v in make_inputs(groups=2).items()}
    out = ssm.selective_scan_cuda_op(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                                     inputs["D"], inputs["z"], inputs["delta_bias"], True)
    assert out.device.type == "meta" and out.shape == inputs["u"].shape and out.dtype == inputs["u"].dtype
    grads = ssm.selective_scan_cuda_backward_op(out, *(inputs[k] for k in NAMES), True)
    assert [g.shape for g in grads] == [inputs[k].shape for k in NAMES]


class StandInKernel:
    """mamba-ssm's ``SelectiveScanFn`` contract (static forward/backward on a ctx) on CPU, for tests.

    forward is the sequential scan; backward returns the recognisable gradients (i + 1) * sum(dout)
    for argument i, so the wrapper's plumbing (order, missing inputs) can be checked exactly.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        with torch.no_grad():
            return ssm.scan_sequential(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    @staticmethod
    def backward(ctx, dout):
        return tuple(None if t is None else torch.full_like(t, i + 1.0) * dout.sum()
                     for i, t in enumerate(ctx.saved_tensors)) + (None, None)


@pytest.fixture
def stand_in_kernel(monkeypatch):
    """Pretend mamba-ssm is importable, with a CPU stand-in for its CUDA Function."""
    monkeypatch.setattr(ssm, "mamba_ssm_status", lambda: (StandInKernel, "stand-in for tests"))
    return StandInKernel


@pytest.mark.parametrize("optional", [True, False])
def test_cuda_op_wrapper_forward_backward_and_opcheck(stand_in_kernel, optional):
    inputs = make_inputs(length=11, d_state=4, groups=2, with_z=optional, with_D=optional, with_bias=optional)
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out = ssm.selective_scan_cuda_op(*(leaves[k] for k in NAMES), True)
    torch.testing.assert_close(out, ssm.scan_sequential(**inputs, delta_softplus=True))
    present = [k for k in NAMES if inputs[k] is not None]
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [leaves[k] for k in present], grad_out)
    for name, grad in zip(present, grads):
        torch.testing.assert_close(grad, torch.full_like(inputs[name], NAMES.index(name) + 1.0) * grad_out.sum())
    torch.library.opcheck(ssm.selective_scan_cuda_op, tuple(leaves[k] for k in NAMES) + (True,))


def test_mamba_ssm_backend_routes_through_the_op_on_cuda_devices(stand_in_kernel, monkeypatch):
    inputs = make_inputs(length=11, d_state=4, groups=2)
    calls = []
    monkeypatch.setattr(stand_in_kernel, "forward", staticmethod(
        lambda ctx, *args: calls.append(len(args)) or ssm.scan_sequential(*args)))
    out = ssm._scan_mamba_ssm(*(inputs[k] for k in NAMES), True)
    assert calls and out.dtype == inputs["u"].dtype
    torch.testing.assert_close(out, ssm.scan_sequential(**inputs, delta_softplus=True))


def test_cuda_op_traces_under_compile_without_graph_breaks(stand_in_kernel):
    inputs = make_inputs(length=11, d_state=4, groups=2)
    args = tuple(inputs[k] for k in NAMES) + (True,)
    explanation = torch._dynamo.explain(ssm.selective_scan_cuda_op)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
