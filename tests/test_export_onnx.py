"""Backbones compile without graph breaks, export with torch.export, and run in onnxruntime."""

from __future__ import annotations

import shutil

import pytest
import timm
import torch

import backbones
from backbones import ssm
from tests.helpers import parameters_reached

TEST_VARIANTS = [name for name in backbones.list_backbones() if name.startswith("test_")]


def _model_and_input(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, scan_backend="torch").eval()
    return model, torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_compile_traces_every_backbone_in_one_graph(name):
    model, x = _model_and_input(name)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_training_step_matches_eager():
    """fullgraph=True through forward and backward (aot_eager: no C++ compiler needed)."""
    model, x = _model_and_input("test_vmamba")
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().mean().backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # every parameter, even at 1x1
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    # Every parameter outside the scan gets a real gradient; the scan's dt/A ones get 1e-8..1e-10 of the largest
    # at init (step sizes ~1e-3), and a 1x1 last stage's A none at all, so they are compared below only.
    assert parameters_reached(p for n, p in model.named_parameters() if ".ssm." not in n) == 1.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_scan_is_traced_as_plain_tensor_ops():
    """While tracing, the torch backend switches to the odd/even scan (no data-dependent branches)."""
    seen = []

    def probe(u: torch.Tensor) -> torch.Tensor:
        seen.append(ssm.is_tracing(u))
        return u * 2

    torch.compile(probe, fullgraph=True, backend="eager")(torch.ones(3))
    assert seen == [True]
    assert not ssm.is_tracing(torch.ones(3))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="Inductor needs a C++ compiler")
def test_inductor_compile_matches_eager():
    model, x = _model_and_input("test_vmamba")
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_torch_export_with_dynamic_batch():
    model, x = _model_and_input("test_vmamba")
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    for size in (1, 3):
        images = torch.randn(size, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(images), model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, x = _model_and_input("test_vmamba")
    path = tmp_path / "test_vmamba.onnx"
    torch.onnx.export(model, (x,), path, dynamo=True, input_names=["images"], output_names=["logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == expected.shape
    assert abs(got - expected).max() <= 1e-4
