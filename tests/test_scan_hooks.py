"""Choosing the scan backend for a region (``ssm.use_backend``) and observing scan calls (``ssm.observe``)."""

from __future__ import annotations

import threading

import pytest
import timm
import torch

from backbones import ssm
from tests.test_ssm import make_inputs


def backends_run(fn) -> list[str]:
    """The backend of every scan call ``fn()`` makes."""
    calls: list[ssm.ScanCall] = []
    with ssm.observe(calls.append):
        fn()
    return [call.backend for call in calls]


AUTO = ssm.resolve_backend("auto", torch.device("cpu"), torch.float32)
"""What ``auto`` picks for float32 CPU tensors here: ``fused`` where the kernel is built, else ``torch``."""


def scan(backend: str = "auto") -> torch.Tensor:
    return ssm.selective_scan(**make_inputs(length=9, d_state=4, groups=2), delta_softplus=True, backend=backend)


def test_region_decides_what_auto_means_for_a_whole_model():
    model = timm.create_model("test_vmamba").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        default = backends_run(lambda: model(x))
        with ssm.use_backend("reference"):
            inside = backends_run(lambda: model(x))
            reference = model(x)
        after = backends_run(lambda: model(x))
        expected = model(x)
    # test_vmamba: one block per stage; the fused kernel's route-aware path is reported as well
    assert len(default) == 4 and set(default) == {ssm.resolve_backend("auto", x.device, x.dtype)}
    assert inside == ["reference"] * 4 and after == default
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)


def test_explicit_backends_win_over_the_region():
    model = timm.create_model("test_vmamba", scan_backend="torch").eval()
    with ssm.use_backend("reference"), torch.no_grad():
        assert set(backends_run(lambda: model(torch.randn(1, 3, 32, 32)))) == {"torch"}
        assert backends_run(lambda: scan("torch")) == ["torch"]
    with ssm.use_backend("torch"):
        assert backends_run(lambda: scan("reference")) == ["reference"]


def test_regions_and_observers_nest_and_unwind():
    outer_calls, inner_calls = [], []
    with ssm.observe(outer_calls.append), ssm.use_backend("reference"):
        scan()
        with ssm.observe(inner_calls.append), ssm.use_backend("torch"):
            scan()
            with ssm.use_backend("auto"):  # back to the automatic choice for a sub-region
                scan()
        scan()
    scan()  # nothing observes this one
    assert [c.backend for c in outer_calls] == ["reference", "torch", AUTO, "reference"]
    assert [c.backend for c in inner_calls] == ["torch", AUTO]


def test_an_exception_leaves_no_region_or_observer_behind():
    calls = []
    with pytest.raises(KeyError):
        with ssm.observe(calls.append), ssm.use_backend("reference"):
            scan()
            raise KeyError("boom")
    scan()
    assert [c.backend for c in calls] == ["reference"]
    assert backends_run(scan) == [AUTO]


def test_a_failing_observer_propagates_and_is_removed():
    def fail(call: ssm.ScanCall) -> None:
        raise RuntimeError(f"observer saw {call.backend}")

    with pytest.raises(RuntimeError, match=f"observer saw {AUTO}"):
        with ssm.observe(fail):
            scan()
    scan()  # the failing observer is gone


def test_regions_are_local_to_their_thread():
    """Two threads in different regions at the same time, and a thread started inside a region."""
    barrier, seen, errors = threading.Barrier(2), {}, []

    def worker(backend: str) -> None:
        try:
            with ssm.use_backend(backend):
                barrier.wait(timeout=30)  # both regions are active now
                seen[backend] = backends_run(scan)
                barrier.wait(timeout=30)
        except Exception as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(b,)) for b in ("reference", "torch")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and seen == {"reference": ["reference"], "torch": ["torch"]}

    with ssm.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.update(child=backends_run(scan)))
        thread.start()
        thread.join(timeout=60)
    assert seen["child"] == [AUTO]  # a new thread starts from the automatic choice, like torch.no_grad


def test_a_function_can_stand_in_for_the_scan():
    def zero_scan(u, *args):
        return torch.zeros_like(u)

    with ssm.use_backend(zero_scan):
        assert backends_run(lambda: scan()) == ["zero_scan"]
        assert scan().abs().sum() == 0
        assert backends_run(lambda: scan("torch")) == ["torch"]  # explicit still wins


def test_unknown_names_are_refused_where_they_enter():
    with pytest.raises(ValueError, match="unknown scan backend 'fast'; choose one of auto, torch"):
        with ssm.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="choose one of"):
        scan("fast")


def test_scan_call_reports_shapes_dtype_and_time():
    calls: list[ssm.ScanCall] = []
    inputs = make_inputs(batch=3, channels=6, length=11, d_state=5, groups=3, with_z=False)
    with ssm.observe(calls.append):
        ssm.selective_scan(**inputs, delta_softplus=True)
        ssm.selective_scan(**dict(inputs, B=inputs["B"][:, 0], C=inputs["C"][:, 0], D=None), backend="reference")
    grouped, plain = calls
    assert grouped == grouped._replace(backend=AUTO, batch=3, channels=6, length=11, d_state=5, groups=3,
                                       with_D=True, with_z=False, dtype=torch.float32, device=torch.device("cpu"))
    assert (plain.backend, plain.groups, plain.with_D) == ("reference", 1, False)
    assert grouped.seconds > 0 and plain.seconds > 0


def test_traced_calls_are_not_reported_and_do_not_break_the_graph():
    model = timm.create_model("test_vmamba").eval()
    calls = []
    with ssm.observe(calls.append), ssm.use_backend("torch"):
        explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 32, 32))
    assert explanation.graph_break_count == 0 and not calls


def test_resolution_is_cached_until_reset(monkeypatch):
    resolved = []
    original = ssm.resolve_backend
    monkeypatch.setattr(ssm, "resolve_backend", lambda *args: resolved.append(args) or original(*args))
    ssm.reset_backend_cache()
    try:
        for _ in range(3):
            scan()
        assert resolved == [("auto", torch.device("cpu"), torch.float32)]
        ssm.reset_backend_cache()
        scan()
        assert len(resolved) == 2
    finally:
        ssm.reset_backend_cache()  # drop answers computed through the patched function
