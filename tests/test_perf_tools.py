"""tools.doctor and tools.benchmark: they run end to end on tiny inputs and report what they claim."""

from __future__ import annotations

import csv
import json
import math

import pytest
import timm
import torch

import backbones
from backbones import kernel as fused_kernel
from backbones import ssm
from tools import benchmark, doctor, gpu_check


def test_doctor_reports_every_backend_and_why_not(capsys):
    info = doctor.collect()
    assert set(info["scan_backends"]) == set(ssm.BACKENDS)
    kernel, reason = ssm.mamba_ssm_status()
    if kernel is None:
        assert info["scan_backends"]["mamba_ssm"] == f"not usable: {reason}"
    assert f"CPU tensors -> {'fused' if fused_kernel.available() else 'torch'}" in info["scan_backends"]["auto"]
    assert info["torch_threads"] == torch.get_num_threads()
    doctor.main(["--json"])
    assert json.loads(capsys.readouterr().out)["torch"] == torch.__version__
    doctor.main([])
    text = capsys.readouterr().out
    assert "scan backends:" in text and "allocator" in text


def test_scan_flops_follow_the_9bldn_rule():
    model = timm.create_model("test_vmamba").eval()
    expected = 0
    for stage, dim in enumerate((8, 16, 32, 64)):  # test_vmamba: one block per stage, ssm_ratio 1, K = 4, N = 1
        length = (8 // 2 ** stage) ** 2
        expected += ssm.selective_scan_flops(1, length, 4 * dim, 1, with_D=True)
    assert benchmark.scan_flops_of(model, torch.randn(1, 3, 32, 32)) == expected


def test_stub_scan_removes_the_scan_but_keeps_shapes():
    model = timm.create_model("test_vmamba").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        real = model(x)
        with ssm.use_backend(benchmark.stub_scan):
            stubbed = model(x)
        again = model(x)
    assert stubbed.shape == real.shape and not torch.allclose(stubbed, real)
    torch.testing.assert_close(again, real)


def test_model_benchmark_writes_table_csv_and_plot(tmp_path):
    benchmark.main(["--models", "test_vmamba", "--baseline", "test_convnext", "--batch", "2", "--image-size", "32",
                    "--repeats", "1", "--warmup", "0", "--no-memory", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "benchmark.csv")))
    assert [r["model"] for r in rows] == ["test_convnext", "test_vmamba"]
    assert float(rows[0]["forward_ratio"]) == 1.0 and float(rows[1]["train_img_s"]) > 0
    assert float(rows[1]["scan_gflops"]) > 0 and float(rows[0]["scan_gflops"]) == 0
    assert "9·B·L·D·N" in (tmp_path / "benchmark.md").read_text()
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    meta = json.loads((tmp_path / "benchmark.json").read_text())["environment"]
    assert meta["threads"] == torch.get_num_threads() and "allocator" in meta


def test_families_mode_pairs_each_model_with_its_nearest_timm_model_in_flops(tmp_path):
    candidates = ["test_convnext", "test_resnet", "test_vit"]
    benchmark.main(["--families", "--models", "test_vmamba,test_vim", "--candidates", ",".join(candidates),
                    "--batch", "2", "--image-size", "32", "--repeats", "1", "--warmup", "0", "--no-memory",
                    "--out", str(tmp_path)])
    rows = {r["model"]: r for r in csv.DictReader(open(tmp_path / "benchmark.csv"))}

    def gflops(name):  # at each model's own input size, MACs + scan, as the pairing counts them
        model = timm.create_model(name)
        return sum(benchmark.model_flops(model, torch.randn(1, *benchmark.input_size(model, None))))

    flops = {name: gflops(name) for name in candidates}
    for ours in ("test_vmamba", "test_vim"):
        own = gflops(ours)
        ranked = sorted(candidates, key=lambda c: abs(math.log(flops[c] / own)))
        assert rows[ours]["baseline"] == ranked[0]
        baseline = rows[rows[ours]["baseline"]]
        assert baseline["baseline"] == baseline["model"] and float(baseline["train_ratio"]) == 1.0
    assert set(rows) == {"test_vmamba", "test_vim", rows["test_vmamba"]["baseline"], rows["test_vim"]["baseline"]}
    assert "baseline (nearest FLOPs)" in (tmp_path / "benchmark.md").read_text()


def test_training_step_trains_both_heads_of_a_distilled_model():
    class TwoHeads(torch.nn.Module):  # GroupMamba's (class, distillation) logits in training, as DeiT-distilled's
        def __init__(self):
            super().__init__()
            self.head, self.head_dist = torch.nn.Linear(4, 1000), torch.nn.Linear(4, 1000)

        def forward(self, x):
            x = x.flatten(1)
            return (self.head(x), self.head_dist(x)) if self.training else self.head(x)

    model = TwoHeads()
    before = [p.detach().clone() for p in model.parameters()]
    steps = benchmark.make_steps(model, torch.randn(2, 1, 2, 2), amp=None)
    steps["forward"]()
    steps["train"]()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_scan_benchmark_table(tmp_path):
    benchmark.main(["--scan", "--scan-shapes", "1x8x40x2", "--formulations", "chunked,oddeven,unbind,mamba_ref",
                    "--repeats", "1", "--no-memory", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "scan.csv")))
    assert {(r["formulation"], r["mode"]) for r in rows} == {
        (f, m) for f in ("chunked", "oddeven", "unbind", "mamba_ref") for m in ("fwd", "fwd+bwd")}
    assert all(float(r["speedup_vs_unbind"]) > 0 for r in rows)


@pytest.mark.slow
def test_memory_probe_separates_bounded_and_materialising_scans():
    # peak memory of one call in a fresh process: a 2 x 64 x 16384 x 16 history is 128 MiB; the chunked
    # forward needs inputs and a few 4 MiB blocks, the odd/even forward several histories
    history = 2 * 64 * 16384 * 16 * 4
    probe = dict(kind="scan", mode="fwd", shape=[2, 64, 16384, 16])
    chunked = benchmark.child_peak_memory(dict(probe, name="chunked"))
    oddeven = benchmark.child_peak_memory(dict(probe, name="oddeven"))
    assert chunked is not None and oddeven is not None
    assert chunked < history / 2 and oddeven > 2 * history


def test_scan_baselines_compute_the_same_scan():
    inputs = benchmark.scan_inputs(2, 8, 37, 3, torch.device("cpu"))
    expected = ssm.scan_sequential(**inputs, delta_softplus=True)
    for name in ("chunked", "oddeven", "unbind", "mamba_ref"):
        got = benchmark.scan_formulation(name)(**inputs, delta_softplus=True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_bad_arguments_are_rejected_with_the_choices():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--scan", "--formulations", "chunked,nope"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--scan-shapes", "1x2x3"])


def test_profile_times_the_scan_inside_the_model(tmp_path, capsys):
    benchmark.main(["--profile", "test_vmamba", "--batch", "1", "--image-size", "32", "--modes", "forward",
                    "--repeats", "1", "--top-ops", "3", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "profile.json").read_text())
    forward = result["forward"]
    assert 0 < forward["scan_share_timed_inside"] < 1 and forward["img_s_without_scan"] > 0
    assert "Name" in result["top_ops"]


def test_gpu_check_without_cuda_says_so_and_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--skip-throughput"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_gpu_check_arguments(tmp_path):
    args = gpu_check.parse_args(["--families", "vmamba, vim", "--batch", "64"])
    assert args.families == ["vmamba", "vim"] and args.batch == 64 and args.warmup == 50 and args.iters == 30
    assert gpu_check.parse_args([]).families == gpu_check.family_names()
    for bad in (["--families", "vmamba,mamba2"], ["--out", str(tmp_path)]):  # unknown family; an existing --out
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
    # every family has a real variant, and it is a registered classifier
    assert sorted(gpu_check.REAL_VARIANTS) == gpu_check.family_names()
    assert set(gpu_check.REAL_VARIANTS.values()) <= set(backbones.list_backbones())
    assert {gpu_check.family_test_model(family) for family in gpu_check.family_names()} == {
        name for name in backbones.list_backbones() if name.startswith("test_")}
