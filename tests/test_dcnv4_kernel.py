"""The fused DCNv4 aggregation (backbones.kernel.dcnv4): float64 parity with the pure-PyTorch path and the
per-point reference at every ISA level this CPU runs, the custom op's contract, HRVMamba on it against the
pure-PyTorch path, and the fallback when no kernel is built.

Error measure and bounds as in test_scan_kernel: max |got - expected| / max |expected| over the tensor,
5e-6 forward and 1e-5 for gradients. An output is a sum of 4P (36 here) products, a value gradient entry a
sum over the few output pixels whose samples touch it, an offset/mask gradient a sum over a group's channels,
so fp32 round-off stays near 1e-7-5e-7 and the bounds leave a 10x margin, while a wrong corner, point order,
sign or missing term is an error of order 1.
"""

from __future__ import annotations

import pytest
import timm
import torch

from backbones import dcnv4
from backbones.dcnv4 import dcnv4_sample
from backbones.kernel.dcnv4 import dcnv4_cpu, output_size
from tests.helpers import GRADIENT_NOISE_FLOOR, record_calls
from tests.oracle import oracle_dcnv4
from tests.test_scan_fast import relative_error
from tests.test_scan_kernel import assert_threads_and_levels_agree, isa, needs_kernel, no_kernel  # noqa: F401 (fixtures)

FORWARD_TOL, GRAD_TOL = 5e-6, 1e-5

# group, group channels, kernel_size, stride, pad, dilation, offset_scale, remove_center
CASES = {
    "3x3": (2, 16, 3, 1, 1, 1, 1.0, False),
    "odd channels, offset_scale 0.5": (3, 5, 3, 1, 1, 1, 0.5, False),
    "dilation 2, remove_center": (2, 21, 3, 1, 2, 2, 1.0, True),
    "wide group, offset_scale 1.7": (1, 37, 3, 1, 1, 1, 1.7, False),
    "stride 2": (2, 7, 3, 2, 1, 1, 1.0, False),
    "2x2, no pad": (2, 3, 2, 1, 0, 1, 1.0, False),
}


def make_inputs(batch: int, height: int, width: int, case: tuple, spread: float = 2.0, seed: int = 0):
    """value (channels last) and offset_mask with 5 unused padding columns, as the Linear's multiple-of-8
    width leaves them; offsets of +-``spread`` pixels send the border pixels' samples outside the map."""
    group, channels, kernel_size, stride, pad, dilation, _, remove_center = case
    g = torch.Generator().manual_seed(seed)
    points = kernel_size ** 2 - int(remove_center)
    out_h, out_w = (output_size(s, kernel_size, stride, pad, dilation) for s in (height, width))
    value = torch.randn(batch, height, width, group * channels, generator=g)
    offset_mask = torch.randn(batch, out_h, out_w, group * 3 * points + 5, generator=g) * spread
    return value, offset_mask


def sample_with_grads(fn, value, offset_mask, grad_out, case):
    leaves = [t.clone().requires_grad_() for t in (value, offset_mask)]
    out = fn(*leaves, case[0], *case[2:])
    return out.detach(), list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))


def assert_matches_float64(value, offset_mask, case) -> None:
    """The kernel (float32) against dcnv4_sample in float64 (and its gradients by autograd), and the forward
    against the per-point reference."""
    expected = dcnv4_sample(value.double(), offset_mask.double(), case[0], *case[2:])
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    got, grads = sample_with_grads(dcnv4_cpu, value, offset_mask, grad_out, case)
    expected, expected_grads = sample_with_grads(dcnv4_sample, value.double(), offset_mask.double(), grad_out, case)
    assert got.dtype == torch.float32 and relative_error(got, expected) <= FORWARD_TOL
    per_point = oracle_dcnv4(value.double(), offset_mask.double(), case[0], *case[2:])
    assert relative_error(got, per_point) <= FORWARD_TOL
    for name, grad, exact in zip(("value", "offset_mask"), grads, expected_grads):
        assert grad.shape == exact.shape and grad.dtype == torch.float32, name
        assert relative_error(grad, exact) <= GRAD_TOL, name
    points = case[2] ** 2 - int(case[7])
    assert not grads[1][..., case[0] * 3 * points:].any()  # the unused padding columns


@needs_kernel
@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_float64_at_every_level(case):
    """Channel counts below, at and above the vector widths (4, 8, 16) and not multiples of them; offsets
    that carry border pixels' samples outside the map."""
    value, offset_mask = make_inputs(2, 6, 7, case)
    assert_matches_float64(value, offset_mask, case)


@needs_kernel
@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("remove_center", [False, True])
def test_samples_on_pixel_borders_and_the_map_edge(remove_center):
    """Whole and half pixel offsets put samples exactly on pixel centres (fx = 0, the floor's one-sided
    slope), half-way between them, and exactly at -1 and at the map size (outside: all corners zero). The
    map is 4 x 8 so that grid_sample's normalisation (2x + 1) / size - 1 round-trips exactly in float64
    and both paths see the same floor."""
    case = (2, 6, 3, 1, 1, 1, 1.0, remove_center)
    value, offset_mask = make_inputs(1, 4, 8, case)
    offset_mask = torch.round(offset_mask * 2) / 2  # multiples of 0.5 in [-4, 4]
    assert_matches_float64(value, offset_mask, case)
    exact_sample = value.double()[:, 1:2, 3:4]  # one point of group 0 at pixel (y=1, x=3), zero elsewhere
    single = torch.zeros_like(offset_mask)
    single[0, 1, 3, 2 * (case[2] ** 2 - int(remove_center)) + 0] = 1.0  # point (0, 0) with mask 1 ...
    single[0, 1, 3, 0:2] = 1.0  # ... moved by (+1, +1) from (x=2, y=0) to (x=3, y=1)
    out = dcnv4_cpu(value, single, case[0], *case[2:])
    assert torch.equal(out[0, 1, 3, :6], exact_sample[0, 0, 0, :6].float()) and not out[..., 6:].any()


@needs_kernel
def test_isa_levels_agree_and_threads_do_not_change_results():
    """The value gradient is scattered per (batch element, group) in a fixed order, so any thread count
    gives the same bits; the levels differ by round-off only."""
    case = CASES["dilation 2, remove_center"]
    value, offset_mask = make_inputs(3, 9, 11, case)
    grad_out = torch.randn(3, 9, 11, 42, generator=torch.Generator().manual_seed(1))

    def run() -> list:
        out, grads = sample_with_grads(dcnv4_cpu, value, offset_mask, grad_out, case)
        return [out, *grads]

    assert_threads_and_levels_agree(run)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    """A bfloat16/float16 input is computed in float32 and the result rounded once: exactly the float32 op
    on the same (rounded) values, rounded to ``dtype``; dcnv4_sample sends it to the kernel."""
    case = CASES["3x3"]
    value, offset_mask = (t.to(dtype) for t in make_inputs(1, 5, 6, case))
    expected = dcnv4_cpu(value.float(), offset_mask.float(), case[0], *case[2:]).to(dtype)
    leaf = value.clone().requires_grad_()
    got = dcnv4_sample(leaf, offset_mask, case[0], *case[2:])
    assert got.dtype == dtype and torch.equal(got, expected)
    got.float().square().sum().backward()
    assert leaf.grad.dtype == dtype


@needs_kernel
def test_refuses_what_it_cannot_compute():
    case = CASES["3x3"]
    value, offset_mask = make_inputs(1, 4, 4, case)
    with pytest.raises(ValueError, match="float64"):
        dcnv4_cpu(value.double(), offset_mask, case[0], *case[2:])
    with pytest.raises(ValueError, match=r"expected \(1, 4, 4, >= 54\)"):
        dcnv4_cpu(value, offset_mask[..., :50], case[0], *case[2:])
    with pytest.raises(ValueError, match="not divisible by group=5"):
        dcnv4_cpu(value, offset_mask, 5, *case[2:])
    with pytest.raises(ValueError, match="kernel_size 1..8"):
        dcnv4_cpu(value, offset_mask, case[0], 9, 1, 4, 1, 1.0, False)


@needs_kernel
def test_opcheck():
    case = CASES["odd channels, offset_scale 0.5"]
    value, offset_mask = (t.requires_grad_() for t in make_inputs(2, 4, 5, case))
    torch.library.opcheck(dcnv4_cpu, (value, offset_mask, case[0], *case[2:]))


# ----------------------------------------------------------------------------- HRVMamba on the kernel


def count_kernel_calls(monkeypatch) -> list:
    """Record every call of the fused DCNv4 from dcnv4_sample."""
    return record_calls(monkeypatch, dcnv4, "dcnv4_cpu")


def test_float64_and_empty_inputs_stay_on_the_pytorch_path(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    case = CASES["3x3"]
    value, offset_mask = make_inputs(1, 4, 4, case)
    dcnv4_sample(value.double(), offset_mask.double(), case[0], *case[2:])
    assert dcnv4_sample(value[:0], offset_mask[:0], case[0], *case[2:]).shape == (0, 4, 4, 32)
    assert calls == []


@needs_kernel
def test_hrvmamba_on_the_kernel_matches_the_pytorch_path(monkeypatch):
    """Logits and every parameter gradient of test_hrvmamba with its DCNv4 layers on the kernel against the
    same model on the pure-PyTorch DCNv4 (float64 as the judge of the gradients, as in test_scan_kernel's
    model parity). The offset/mask projections are perturbed so that samples leave the regular grid."""
    calls = count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    reference = timm.create_model("test_hrvmamba", num_classes=5)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.add_((0.3 if "offset_mask" in name else 0.02) * torch.randn_like(p))
    fused = timm.create_model("test_hrvmamba", num_classes=5)
    fused.load_state_dict(reference.state_dict())
    oracle = timm.create_model("test_hrvmamba", num_classes=5).double()
    oracle.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    grad_out = torch.randn(2, 5)
    with monkeypatch.context() as pure:
        pure.setattr(dcnv4, "_runs_fused", lambda *args: False)
        outputs = [reference(x)]
    assert calls == []
    outputs += [fused(x), oracle(x.double())]
    assert len(calls) == sum(isinstance(m, dcnv4.DCNv4) for m in fused.modules()) > 0
    # Training-mode BatchNorm over the 1x1 and 2x2 branches amplifies float32 round-off: the logits of either
    # DCNv4 path are 1e-7 to 1e-5 from float64 (seeds 0-3), the gradients up to ~5e-3. The kernel must be at
    # that level (twice the model's worst float32 PyTorch-path error for gradients), not an O(1) miss.
    assert relative_error(outputs[1], outputs[2]) <= 2e-5
    with monkeypatch.context() as pure:
        pure.setattr(dcnv4, "_runs_fused", lambda *args: False)
        outputs[0].backward(grad_out)
    for out in outputs[1:]:
        out.backward(grad_out.to(out.dtype))
    # Biases ahead of a BatchNorm have gradients that are zero by construction: there both float32 paths
    # must stay at the rounding floor of the model's largest gradient instead.
    floor = GRADIENT_NOISE_FLOOR * max(p.grad.abs().max().item() for p in oracle.parameters())
    checked = []
    for (name, p), q, exact in zip(reference.named_parameters(), fused.parameters(), oracle.parameters()):
        if exact.grad.abs().max() < floor:
            assert max(p.grad.abs().max(), q.grad.abs().max()) < floor, name
        else:
            checked.append((name, relative_error(q.grad, exact.grad), relative_error(p.grad, exact.grad)))
    fp32_noise = max(noise for _, _, noise in checked)
    assert all(error <= 5e-5 + 2 * fp32_noise for _, error, _ in checked), checked


@pytest.mark.usefixtures("no_kernel")
def test_without_a_built_kernel_hrvmamba_runs_the_pytorch_dcnv4(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    model = timm.create_model("test_hrvmamba")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == [] and all(p.grad is not None for p in model.parameters())
    case = CASES["3x3"]
    with pytest.raises(RuntimeError, match="python -m backbones.kernel build"):
        dcnv4_cpu(*make_inputs(1, 4, 4, case), case[0], *case[2:])


@needs_kernel
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks and grid constants, as expected
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated, still what exporters use
def test_traced_graphs_keep_the_pytorch_dcnv4(monkeypatch):
    """torch.export (and so ONNX's dynamo exporter) and jit tracing record the grid_sample formulation,
    which every runtime has, not the library's custom op."""
    calls = count_kernel_calls(monkeypatch)
    layer = dcnv4.DCNv4(8, group=2).eval()
    x = torch.randn(1, 8, 5, 6)
    exported = torch.export.export(layer, (x,))
    traced = torch.jit.trace(layer, x, check_trace=False)
    assert calls == []
    assert "grid_sampler" in str(exported.graph) and "dcnv4_cpu" not in str(exported.graph)
    assert "grid_sampler" in str(traced.graph)
    eager = layer(x)
    assert len(calls) == 1
    assert relative_error(exported.module()(x), eager.double()) <= FORWARD_TOL
