"""What timm's own tests/test_models.py needs from our backbones, checked without downloading it (``make
test-timm`` runs the real suite): device/dtype construction, FX tracing down to the registered leaves,
timm's pretrained tests with converted official weights, and the suite runner's own pieces."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import backbones
from backbones._fx import FX_LEAF_FUNCTIONS, FX_LEAF_MODULES
from backbones.ssm import selective_scan
from tests.official import vmamba_official
from tests.test_convert import OTHER_FAMILIES, TEST_VMAMBA, _positive_variances
from tools import timm_suite
from tools.convert import main as convert_main

TEST_VARIANTS = [name for name in backbones.list_backbones() if name.startswith("test_")]
TRACER_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def _input(model: nn.Module, size: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, size, size)


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_device_and_dtype_reach_every_tensor_and_reset_heads(name):
    """timm.create_model(device=, dtype=) creates the tensors there (meta: nothing allocated); a classifier
    reset later follows the model's device, dtype and training mode."""
    default = torch.get_default_dtype()
    meta = timm.create_model(name, device="meta")
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
    model = timm.create_model(name, dtype=torch.float64).eval()
    assert torch.get_default_dtype() == default
    floating = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert {t.dtype for t in floating} == {torch.float64}
    assert model(_input(model).double()).dtype == torch.float64
    model.to(torch.bfloat16)
    model.reset_classifier(7)
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        assert head.weight.dtype == torch.bfloat16 and not head.training
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)


def test_a_failed_build_restores_the_default_dtype():
    with pytest.raises(TypeError):
        timm.create_model("test_vmamba", dtype=torch.float64, not_a_model_arg=1)
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_fx_graph_keeps_the_leaves_and_follows_the_input_size(name):
    """timm's tracer arguments trace every family; the scan modules stay single calls whose run-time
    decisions (map size, position-embedding grid) hold for another input size than the traced one."""
    model = timm.create_model(name).eval()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER_KWARGS)
    leaves = {prefix for prefix, module in model.named_modules() if isinstance(module, tuple(FX_LEAF_MODULES))}
    leaves = {leaf for leaf in leaves if not any(leaf.startswith(outer + ".") for outer in leaves)}
    assert leaves and leaves <= set(eval_nodes)
    assert not [node for node in eval_nodes if any(node.startswith(leaf + ".") for leaf in leaves)]
    graph = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                     tracer_kwargs=TRACER_KWARGS)
    for size in (32, 48):
        x = _input(model, size)
        with torch.no_grad():
            torch.testing.assert_close(next(iter(graph(x).values())), model(x), rtol=1e-5, atol=1e-6)


def test_selective_scan_is_one_call_in_a_traced_graph():
    class Scan(nn.Module):
        def forward(self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor) -> torch.Tensor:
            return selective_scan(u, delta, A, B, C)

    assert selective_scan in FX_LEAF_FUNCTIONS
    graph = torch.fx.Tracer(autowrap_functions=get_notrace_functions()).trace(Scan())
    assert [node.target for node in graph.nodes if node.op == "call_function"] == [selective_scan]


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_fx_feature_extraction_matches_forward_intermediates(name):
    """features_only with feature_cls='fx' (timm.models.create_feature_extractor on feature_info's module
    names) gives the getter's maps. A model whose levels no module returns refuses it with a clear error: Vim
    (taps of the residual stream), and VMamba, MSVMamba and EfficientVMamba with the per-level feature norms
    their features_only models have (applied after the stages, outside ``forward``); without those norms
    (``feature_norms=False``) their levels are the stages' outputs, which the FX extractor gives."""
    torch.manual_seed(0)
    getter = timm.create_model(name, features_only=True).eval()
    options = {}
    if not getter.model.level_modules:
        with pytest.raises(ValueError, match="feature_cls='getter' only, got 'fx'"):
            timm.create_model(name, features_only=True, feature_cls="fx")
        if getattr(getter.model, "feature_norms", None) is None:
            return
        options = dict(feature_norms=False)
        torch.manual_seed(0)
        getter = timm.create_model(name, features_only=True, **options).eval()
        assert getter.model.level_modules
    torch.manual_seed(0)
    fx = timm.create_model(name, features_only=True, feature_cls="fx", **options).eval()
    assert fx.feature_info.channels() == getter.feature_info.channels()
    x = _input(getter)
    with torch.no_grad():
        torch.testing.assert_close(fx(x), getter(x))


def _official_checkpoint(name: str) -> tuple[dict, dict]:
    if name == "test_vmamba":
        return {"model": vmamba_official(**TEST_VMAMBA, num_classes=3)}, {}
    if name == "test_mhs_vmamba":  # MHS-VM releases whole segmentation models only: a checkpoint in our layout
        torch.manual_seed(0)
        return {"state_dict": timm.create_model(name, num_classes=3).state_dict()}, {}
    checkpoint, model_args = OTHER_FAMILIES[name]()
    return _positive_variances(checkpoint), model_args


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_timm_pretrained_tests_pass_with_converted_weights(name, tmp_path):
    """timm's test_model_load_pretrained and test_model_features_pretrained (offline in CI), with an
    official checkpoint converted by tools/convert.py and given through pretrained_cfg_overlay."""
    checkpoint, model_args = _official_checkpoint(name)
    torch.save(checkpoint, tmp_path / "official.pth")
    assert convert_main([str(tmp_path / "official.pth"), name, "--out", str(tmp_path / "converted"),
                         *[f"--model-arg={k}={v}" for k, v in model_args.items()]]) == 0
    overlay = dict(file=str(tmp_path / "converted" / "model.safetensors"), num_classes=3)
    converted = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **model_args)
    for num_classes in (5, 0):
        model = timm.create_model(name, pretrained=True, in_chans=1, num_classes=num_classes,
                                  pretrained_cfg_overlay=overlay, **model_args)
        first_conv = model.pretrained_cfg["first_conv"]
        torch.testing.assert_close(model.get_submodule(first_conv).weight,
                                   converted.get_submodule(first_conv).weight.sum(dim=1, keepdim=True))
    features = timm.create_model(name, pretrained=True, features_only=True, pretrained_cfg_overlay=overlay,
                                 **model_args)
    state = features.model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in converted.state_dict().items() if key in state)
    assert len(state.keys() & converted.state_dict().keys()) > len(state) // 2


def test_exclusions_give_a_reason_and_name_real_tests(tmp_path):
    exclusions = timm_suite.read_exclusions()
    assert {e.test for e in exclusions} >= {"test_model_forward_torchscript", "test_model_load_pretrained"}
    assert all(e.test.startswith("test_model_") and len(e.reason.split()) >= 5 for e in exclusions)
    (tmp_path / "bad.txt").write_text("# comment\ntest_model_forward *\n")
    with pytest.raises(ValueError, match="bad.txt:2: expected '<test function> <model pattern> <reason>'"):
        timm_suite.read_exclusions(tmp_path / "bad.txt")


def test_suite_lists_our_models_where_timm_lists_a_familys_kind(tmp_path):
    """Every family module goes to FEAT_INTER_FILTERS; the token-output models (Vim) to NON_STD_FILTERS."""
    lines = timm_suite.registry_lines()
    namespace = {"FEAT_INTER_FILTERS": [], "NON_STD_FILTERS": []}
    exec(lines, namespace)
    assert set(namespace["FEAT_INTER_FILTERS"]) == {backbones.family_of(n).__name__.rsplit(".", 1)[-1]
                                                    for n in backbones.list_backbones()}
    assert namespace["NON_STD_FILTERS"] == [n for n in backbones.list_backbones() if backbones.family_of(n).__name__
                                            == "backbones.vim"]
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_models.py").write_text("FEAT_INTER_FILTERS = []\nNON_STD_FILTERS = []\n")
    with pytest.raises(ValueError, match="update tools/timm_suite.py for this timm"):
        timm_suite.with_our_registries(tmp_path)
    (tmp_path / "tests" / "test_models.py").write_text(f"FEAT_INTER_FILTERS = []\nNON_STD_FILTERS = []\n"
                                                        f"{timm_suite._REGISTRY_ANCHOR}")
    patched = timm_suite.with_our_registries(tmp_path)
    namespace = {}
    exec(patched.read_text(), namespace)
    assert namespace["NUM_NON_STD"] == len(namespace["NON_STD_FILTERS"]) > 0


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_features_of_some_levels_train_every_remaining_parameter(name):
    """timm's pruning contract (what DDP needs): a features_only model of levels 1 and 3 only keeps
    parameters that reach those levels (HRVMamba's last exchange unit stops fusing into branches 0 and 2,
    Vim's pyramid keeps those two levels)."""
    model = timm.create_model(name, features_only=True, out_indices=(1, 3)).train()
    sum(feature.sum() for feature in model(torch.randn(2, 3, 64, 64))).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
