"""Token pruning (Zhan et al., NeurIPS 2024): the aligned scan against a float64 oracle of the paper's recurrence,
the Vim prune option (keep ratio 1 is the unpruned model, aligned differs from naive, forward/backward), configs."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import backbones  # noqa: F401 -- registers the models
from backbones import kernel
from backbones.pruning import PruneConfig, keep_count, select_tokens, token_importance
from backbones.ssm import selective_scan
from tasks.config_checks import ConfigError, check_config
from tests.conftest import compose_config
from tests.oracle import oracle_aligned_scan, oracle_selective_scan
from tests.test_ssm import make_inputs

BACKENDS = ["torch", "reference"] + (["fused"] if kernel.available() else [])


def pruned_positions(batch: int, length: int, full: int, seed: int = 1) -> torch.Tensor:
    """(batch, length) sorted random distinct indices into an unpruned sequence of ``full`` tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(full, generator=g)[:length].sort().values for _ in range(batch)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optional", [True, False])
def test_aligned_scan_matches_float64_oracle_of_the_paper_recurrence(backend, optional):
    """dt_scale 1 with d_state 16: gaps of several positions decay the state by up to e^-100, so a scan that
    ignored them (or added input at them) would be far off."""
    inputs = make_inputs(length=24, d_state=16, with_z=optional, with_D=optional, with_bias=optional)
    positions = pruned_positions(2, 24, 60)
    expected = oracle_aligned_scan(**inputs, positions=positions, delta_softplus=True)
    got = selective_scan(**inputs, delta_softplus=True, backend=backend, positions=positions)
    assert got.dtype == torch.float32
    # fp32 scan of 24 steps against float64: the plain scan's tolerance (test_ssm)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    naive = oracle_selective_scan(**inputs, delta_softplus=True)
    assert (naive - expected).abs().max() > 100 * 1e-5 * expected.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_aligned_scan_without_gaps_is_the_plain_scan(backend):
    inputs = make_inputs(length=13, d_state=4)
    positions = torch.arange(13).expand(2, -1)
    expected = oracle_selective_scan(**inputs, delta_softplus=True)
    got = selective_scan(**inputs, delta_softplus=True, backend=backend, positions=positions)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_grouped_routes_take_their_own_position_maps():
    """Vim's two routes in one grouped call: the reversed route's tokens come in reversed order with decreasing
    positions, whose gaps are those of the mirrored (increasing) map."""
    inputs = make_inputs(length=10, d_state=4, groups=2, channels=4)
    positions = pruned_positions(2, 10, 25)
    routes = torch.stack((positions, positions.flip(-1)), dim=1)
    got = selective_scan(**inputs, delta_softplus=True, backend="torch", positions=routes)
    for route, route_positions in enumerate((positions, 24 - positions.flip(-1))):
        channels = slice(2 * route, 2 * route + 2)
        sub = {k: (v[:, channels] if k in ("u", "delta", "z") else v[channels] if k in ("A", "D", "delta_bias")
                   else v[:, route]) for k, v in inputs.items()}
        expected = oracle_aligned_scan(**sub, positions=route_positions, delta_softplus=True)
        torch.testing.assert_close(got[:, channels].double(), expected, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_aligned_scan_gradients_match_the_float64_oracle(backend):
    """Float64 in, so the backends compute in float64; gradients of every input against autograd through the
    step-by-step oracle, and torch.autograd.gradcheck on the aligned scan itself."""
    inputs = make_inputs(batch=1, channels=2, length=7, d_state=3, dtype=torch.float64)
    positions = pruned_positions(1, 7, 15)
    names = [n for n, v in inputs.items() if v is not None]
    weights = torch.randn(1, 2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grads(fn):
        leaves = {n: inputs[n].detach().clone().requires_grad_() for n in names}
        (fn(**leaves, positions=positions, delta_softplus=True) * weights).sum().backward()
        return {n: leaves[n].grad for n in names}

    expected = grads(oracle_aligned_scan)
    got = grads(lambda **kw: selective_scan(**kw, backend=backend))
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-9, msg=name)

    def scan(*args):
        return selective_scan(**dict(zip(names, args)), delta_softplus=True, backend=backend, positions=positions)

    assert torch.autograd.gradcheck(scan, [inputs[n].detach().clone().requires_grad_() for n in names],
                                    eps=1e-6, atol=1e-5)


@pytest.mark.skipif(not kernel.available(), reason="the fused kernel is not built")
def test_fused_kernel_gradients_through_the_aligned_scan_match_torch():
    """The fused kernel computes in fp32: its gradients against the float64 torch path within fp32 rounding of a
    24-step scan (relative 1e-4 of the largest gradient)."""
    inputs = make_inputs(length=24, d_state=8)
    positions = pruned_positions(2, 24, 50)
    names = [n for n, v in inputs.items() if v is not None]

    def grads(backend, dtype):
        leaves = {n: inputs[n].detach().to(dtype).requires_grad_() for n in names}
        selective_scan(**leaves, delta_softplus=True, backend=backend, positions=positions).sum().backward()
        return {n: leaves[n].grad for n in names}

    expected, got = grads("torch", torch.float64), grads("fused", torch.float32)
    for name in names:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_positions_are_checked():
    inputs = make_inputs(length=5, d_state=2)
    with pytest.raises(ValueError, match="strictly monotonic"):
        selective_scan(**inputs, positions=torch.tensor([[0, 1, 1, 2, 3]] * 2))
    with pytest.raises(ValueError, match="do not match"):
        selective_scan(**inputs, positions=torch.arange(4).expand(2, -1))


def test_importance_is_the_sum_of_clipped_channels_and_selection_keeps_the_class_token():
    output = torch.tensor([[[1.0, -5.0], [-1.0, -1.0], [2.0, 3.0], [0.5, 0.0]]])
    assert torch.equal(token_importance(output), torch.tensor([[1.0, 0.0, 5.0, 0.5]]))
    kept = select_tokens(token_importance(output), 0.5, protected=torch.tensor([1]))
    assert kept.tolist() == [[0, 1, 2]]  # class token 1 (score 0) kept, then the top 2 of 3 others, in order
    assert keep_count(196, 0.8) == math.ceil(196 * 0.8) and keep_count(10, 0.7) == 7 and keep_count(3, 0.01) == 1


@pytest.mark.parametrize("bad, key", [(dict(keep_ratio=1.5, layers=[0]), "prune.keep_ratio=1.5"),
                                      (dict(keep_ratio=0.5, layers=[]), "prune.layers"),
                                      (dict(keep_ratio=[0.5], layers=[0, 1]), "prune.keep_ratio"),
                                      (dict(layers=[1, 0]), "increasing"),
                                      (dict(layers=[0], mode="fast"), "prune.mode='fast'"),
                                      (dict(layers=[0], ratio=0.5), "prune.ratio"),
                                      (dict(layers=[3]), "leaves no block")])
def test_bad_prune_options_name_the_key_and_value(bad, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("(", r"\(")):
        PruneConfig.parse(bad, depth=4)


def make_vim(prune=None, seed=0, img_size=64, step=None):
    """test_vim on 64x64 inputs (16 patches + class token); ``step`` sets every dt to softplus(bias) ~ step so
    that skipped positions decay the state noticeably (the init's dt ~0.001-0.1 barely decays it)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_vim", num_classes=5, img_size=img_size, prune=prune)
    if step is not None:
        with torch.no_grad():
            for block in model.layers:
                block.mixer.ssm.dt_projs_bias.fill_(math.log(math.expm1(step)))
    return model


@pytest.mark.parametrize("img_size", [64, 48])  # 16 or 9 patches: the class token at M // 2 either way
def test_keep_ratio_one_equals_the_unpruned_model_exactly(img_size):
    x = torch.randn(2, 3, img_size, img_size)
    plain = make_vim(img_size=img_size).eval()
    pruned = make_vim(dict(keep_ratio=1.0, layers=[0, 1, 2]), img_size=img_size).eval()
    pruned.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(pruned(x), plain(x))


def test_aligned_and_naive_pruning_differ_and_only_eval_prunes_without_train():
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = make_vim(step=0.1).eval()
    models = {mode: make_vim(dict(keep_ratio=0.5, layers=[0, 1], mode=mode), step=0.1).eval()
              for mode in ("aligned", "naive")}
    with torch.no_grad():
        # Compared: the last block's mixer output (an untrained model's logits are dominated by the shared
        # embedding), with the skips D = 0 so that it is the scans' state part alone. At dt 0.1 a skipped position
        # decays the state by exp(-0.1..-0.4): the two modes differ by 26-28 % of the output (measured over model
        # seeds; 8-130 % over other step sizes), against fp32 rounding of ~1e-6.
        for model in (plain, *models.values()):
            for block in model.layers:
                block.mixer.ssm.Ds.zero_()
        out = {mode: m._forward_pruned(x)[0] for mode, m in models.items()}
        scale = out["naive"].abs().max()
        assert (out["aligned"] - out["naive"]).abs().max() > 0.05 * scale
        models["aligned"].train()  # training-free: training runs unpruned
        torch.testing.assert_close(models["aligned"](x), plain.train()(x), rtol=0, atol=0)


@pytest.mark.skipif(not kernel.available(), reason="the fused kernel is not built")
def test_pruned_vim_on_the_kernel_matches_the_pure_pytorch_path(monkeypatch):
    """Aligned pruning in training (fine-tune mode), fused kernel vs torch backend, same weights, dt ~0.1 so that
    skipped positions matter (aligned and naive differ by ~27 %, see above). On the kernel the aligned blocks
    take the in-place route path (both routes read in token order, per-route gaps; RouteSSM.forward, the
    route-copy path, never runs), on torch the route copies with the reparametrisation: two implementations of
    one recurrence. They differ by fp32 rounding (measured 2e-7 on logits, 1.3e-6 on parameter gradients); a
    missing or misplaced gap term would be O(1e-1)."""
    from backbones.ss2d import RouteSSM

    models = {backend: make_vim(dict(keep_ratio=0.5, layers=[0, 1], train=True), step=0.1) for backend in
              ("torch", "fused")}
    for backend, model in models.items():
        for block in model.layers:
            block.mixer.ssm.scan_backend = backend
    models["fused"].load_state_dict(models["torch"].state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    route_copies = []
    forward = RouteSSM.forward
    monkeypatch.setattr(RouteSSM, "forward", lambda self, *a, **kw: route_copies.append(1) or forward(self, *a, **kw))
    logits = {}
    for backend, model in models.items():
        route_copies.clear()
        logits[backend] = model.train()(x)
        logits[backend].square().sum().backward()
        assert bool(route_copies) == (backend == "torch")
    torch.testing.assert_close(logits["fused"], logits["torch"], rtol=0, atol=5e-6 * logits["torch"].abs().max().item())
    for (name, p), q in zip(models["torch"].named_parameters(), models["fused"].parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=5e-5 * p.grad.abs().max().item(), msg=name)


@pytest.mark.skipif(not kernel.available(), reason="the fused kernel is not built")
def test_vim_mixer_with_unpruned_positions_is_the_plain_mixer_on_the_kernel():
    """Positions 0..L-1 (no gaps) through the kernel's gapped path: bit for bit the unpruned mixer."""
    mixer = make_vim().layers[1].mixer
    x = torch.randn(2, 17, mixer.out_proj.out_features)
    with torch.no_grad():
        assert torch.equal(mixer(x, torch.arange(17).expand(2, -1)), mixer(x))


@pytest.mark.parametrize("mode", ["aligned", "naive"])
def test_fine_tune_mode_prunes_in_training_and_backward_reaches_every_block(mode):
    calls = []
    from backbones.ssm import observe

    model = make_vim(dict(keep_ratio=0.5, layers=[0, 1], mode=mode, train=True)).train()
    with observe(calls.append):
        model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [c.length for c in calls] == [17, 9, 5, 5]  # 16 patches + class -> 8 + 1 -> 4 + 1
    assert all(p.grad is not None for p in model.layers.parameters())
    with pytest.raises(ValueError, match="no dense feature maps"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64))


def test_features_only_with_pruning_is_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match="no dense feature maps for features_only"):
        timm.create_model("test_vim", features_only=True, prune=dict(keep_ratio=0.5, layers=[0]))


def test_class_token_is_moved_back_to_the_middle():
    from backbones.vim import VisionMamba

    tokens = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1)
    moved = VisionMamba._class_to_middle(tokens, torch.tensor([0, 5]))
    assert moved[..., 0].tolist() == [[1, 2, 0, 3, 4, 5], [6, 7, 11, 8, 9, 10]]
    model = make_vim(dict(keep_ratio=0.3, layers=[0])).eval()
    assert model.forward_features(torch.randn(3, 3, 64, 64)).shape[1] == 1 + keep_count(16, 0.3)


def test_prune_config_composes_checks_and_trains(tmp_path, fashion_dir):
    from run import build_task, build_trainer

    cfg = compose_config(["backbone=test_vim", "+prune=test_vim", f"data.data_dir={fashion_dir}", "data.num_workers=0",
                          "data.batch_size=2", "trainer.fast_dev_run=true", "logger=none", "callbacks=none"], tmp_path)
    check_config(cfg)
    assert cfg.backbone.prune.layers == [0, 1]
    datamodule, task = build_task(cfg)
    assert task.backbone.prune == PruneConfig(keep_ratio=0.5, layers=(0, 1), mode="aligned", train=True)
    build_trainer(cfg).fit(task, datamodule=datamodule)

    bad = compose_config(["backbone=test_vim", "+prune=test_vim", "backbone.prune.keep_ratio=0"], tmp_path)
    with pytest.raises(ConfigError, match=r"backbone.*prune.keep_ratio=0"):
        check_config(bad)


def test_benchmark_model_suffix_builds_the_paper_settings():
    from tools import benchmark

    model = benchmark.build_model("vim_tiny_patch16_224:torch+prune=naive:0.75", torch.device("cpu"))
    assert model.prune == PruneConfig(keep_ratio=0.75, layers=(9, 19), mode="naive", train=True)
    assert model.layers[0].mixer.ssm.scan_backend == "torch"
    with pytest.raises(ValueError, match="no pruning settings"):
        benchmark.prune_option("vmamba_tiny_s1l8", "aligned:0.8")


def test_a_model_without_class_token_prunes_every_token_by_importance():
    torch.manual_seed(0)
    model = timm.create_model("test_vim", num_classes=5, img_size=64, class_token=False,
                              prune=dict(keep_ratio=0.5, layers=[0])).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 64, 64)).shape[1] == 8  # 16 patches, no class token
