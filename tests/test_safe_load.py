"""Released checkpoints are read as their authors saved them (yacs configs, optimizer/scaler state, mmengine
meta and message hubs, EMA copies) with no code from the file run and neither yacs nor mmengine needed, and
files that would run code are refused. The fixtures are written the way the official save code writes them
(tests/release_fixtures.py)."""

from __future__ import annotations

import builtins
import importlib
import operator
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from tests import release_fixtures as rf
from tests.conftest import ROOT
from tests.official import efficientvmamba_official, hrvmamba_official_key
from tests.test_convert import TEST_VMAMBA, _values, vmamba_official
from tools.convert import convert_state_dict, load_official, main
from tools.safe_load import Opaque, load_checkpoint

MARKER_TEXT = "side effect"


class Payload:
    """Pickles as ``function(*args)``: what a malicious checkpoint carries."""
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _payloads(marker: Path) -> dict:
    touch = f"open({str(marker)!r}, 'w').write({MARKER_TEXT!r})"
    return {
        "posix.system": Payload(os.system, f"touch {marker}"),
        "builtins.eval": Payload(builtins.eval, touch),
        "builtins.exec": Payload(builtins.exec, touch),
        "builtins.__import__": Payload(builtins.__import__, "os"),
        "builtins.getattr": Payload(builtins.getattr, torch.Size([1]), "__class__"),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
        "importlib.import_module": Payload(importlib.import_module, "os"),
        "operator.methodcaller": Payload(operator.methodcaller, "touch"),
        "torch.serialization.load": Payload(torch.load, str(marker)),
    }


@pytest.mark.parametrize("name", sorted(_payloads(Path("m"))))
def test_a_checkpoint_that_would_run_code_is_refused(name, tmp_path, capsys):
    marker = tmp_path / "marker"
    payload = _payloads(marker)[name]
    official = vmamba_official(**TEST_VMAMBA, num_classes=5)
    # Hidden where a converter looks last: inside the yacs config of an otherwise genuine trainer file.
    checkpoint = rf.swin_trainer(official)
    checkpoint["config"]["MODEL"]["HOOK"] = payload
    path = rf.save(checkpoint, tmp_path / "evil.pth")
    assert main([str(path), "test_vmamba", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    refused = f"it calls {name} on a Size" if name == "builtins.getattr" else f"it names {name}"
    assert f"checkpoint {path} is refused: {refused}" in err and "nothing from it was run" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_raw_protocol_0_pickle_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "raw.pth"
    path.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(ValueError, match="it names os.system"):
        load_checkpoint(path)
    assert not marker.exists()


class Tracked:
    """A class whose construction and state restoring leave a trace: a safe load must do neither."""
    marker: Path = Path("unused")

    def __new__(cls, *args, **kwargs):
        cls.marker.write_text("__new__")
        return super().__new__(cls)

    def __init__(self, value=None):
        self.value = value

    def __setstate__(self, state):
        self.marker.write_text("__setstate__")


def test_objects_of_other_classes_become_inert_placeholders(tmp_path, monkeypatch):
    monkeypatch.setattr(Tracked, "marker", tmp_path / "built")
    obj = Tracked.__new__(Tracked)
    obj.__dict__["value"] = torch.arange(3)
    (tmp_path / "built").unlink()
    path = tmp_path / "objects.pth"
    rf.save({"model": {"w": torch.ones(2)}, "tracked": obj, "config": rf.cfg_node({"A": {"B": 1}})}, path)
    loaded = load_checkpoint(path)
    assert not (tmp_path / "built").exists()
    tracked = loaded["tracked"]
    assert isinstance(tracked, Opaque) and tracked.source == f"{__name__}.Tracked"
    assert torch.equal(tracked.state["value"], torch.arange(3))
    config = loaded["config"]
    assert config.source == "yacs.config.CfgNode" and config.dict_items["A"].dict_items == {"B": 1}
    assert config.state["__immutable__"] is True
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(ValueError, match="TorchScript archive"):
        load_checkpoint(path)


def _official_and_ema():
    official = vmamba_official(**TEST_VMAMBA, num_classes=5)
    return official, {k: v + 1 for k, v in official.items()}


def test_vmamba_trainer_file_converts_plain_and_ema_weights(tmp_path, capsys):
    official, ema = _official_and_ema()
    path = rf.save(rf.swin_trainer(official, ema), tmp_path / "vssm1_tiny_0230s_ckpt_epoch_264.pth")
    assert main([str(path), "test_vmamba", "--out", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert "test_vmamba (vmamba rules) from model:" in out
    assert "config (yacs.config.CfgNode, kept inert)" in out and "optimizer (dict of 2)" in out
    assert "max_accuray_ema (float)" in out and "model_ema (dict of" in out
    model, conversion = convert_state_dict(load_official(path), "test_vmamba", ema=True)
    assert conversion.weights_from == "model_ema (EMA)"
    assert torch.equal(_values(model.state_dict()), _values(ema))


def test_hrvmamba_trainer_file_with_its_config_and_amp_state(tmp_path):
    torch.manual_seed(0)
    ours = timm.create_model("test_hrvmamba", num_classes=3).state_dict()
    official = {hrvmamba_official_key(k): torch.randn_like(v) if v.is_floating_point() else v for k, v in ours.items()}
    ema = {k: v * 2 if v.is_floating_point() else v for k, v in official.items()}
    path = rf.save(rf.swin_trainer(official, ema, hrvmamba=True), tmp_path / "hrvmamba_small.pth")
    checkpoint = load_official(path)
    assert {"amp", "config", "ema_decay", "max_accuracy_ema"} <= set(checkpoint)
    model, conversion = convert_state_dict(checkpoint, "test_hrvmamba", ema=True)
    assert conversion.weights_from == "model_ema (EMA)" and conversion.num_classes == 3
    assert torch.equal(_values(model.state_dict()), _values(ema))


def test_efficientvmamba_trainer_file_ema_model_with_module_prefixes(tmp_path):
    official = efficientvmamba_official((1, 1, 1, 1), (8, 16, 32, 64), d_state=2, num_classes=3)
    official = {k: v.abs() if k.endswith("running_var") else v for k, v in official.items()}
    ema = {k: v + 1 if v.is_floating_point() and not k.endswith("running_var") else v for k, v in official.items()}
    path = rf.save(rf.efficientvmamba_trainer(official, ema), tmp_path / "checkpoint-299.pth.tar")
    plain, conversion = convert_state_dict(load_official(path), "test_efficientvmamba")
    assert conversion.weights_from == "model" and torch.equal(_values(plain.state_dict()), _values(official))
    averaged, conversion = convert_state_dict(load_official(path), "test_efficientvmamba", ema=True)
    assert conversion.weights_from == "ema_model (EMA)"
    assert torch.equal(_values(averaged.state_dict()), _values(ema))


def _pose_state_dict() -> dict:
    """An mmpose HRVMamba pose model's state dict (backbone under ``backbone.``, its heatmap head beside)."""
    torch.manual_seed(0)
    pose = timm.create_model("test_hrvmamba", num_classes=0, multiscale_output=False)
    state = {"backbone." + hrvmamba_official_key(k): torch.randn_like(v) if v.is_floating_point() else v
             for k, v in pose.state_dict().items()}
    return {k: v.abs() if k.endswith("running_var") else v for k, v in state.items()} | {
        "head.final_layer.weight": torch.zeros(17, 8, 1, 1)}


def test_mmengine_file_with_meta_message_hub_and_ema_hook(tmp_path):
    raw = _pose_state_dict()
    averaged = {k: v + 1 if v.is_floating_point() else v for k, v in raw.items()}
    # EMAHook.before_save_checkpoint: the averaged weights go to state_dict, the raw ones to ema_state_dict.
    checkpoint = rf.mmengine_checkpoint(averaged, ["person"], [[255, 0, 0]], ema_state_dict=raw)
    path = rf.save(checkpoint, tmp_path / "best_coco_AP_epoch_210.pth")
    loaded = load_official(path)
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert buffer.source == "mmengine.logging.history_buffer.HistoryBuffer" and isinstance(buffer, Opaque)
    assert isinstance(loaded["meta"]["seed"], Opaque) and loaded["meta"]["dataset_meta"]["classes"] == ("person",)
    for ema in (False, True):
        model, conversion = convert_state_dict(loaded, "test_hrvmamba", ema=ema, multiscale_output=False)
        assert conversion.weights_from.startswith("state_dict, where mmengine's EMAHook keeps the averaged")
        expected = {k: v for k, v in averaged.items() if k.startswith("backbone.")}
        assert torch.equal(_values(model.state_dict()), _values(expected))


def test_mmcv_ema_copies_are_used_with_ema_and_left_out_without(tmp_path):
    raw = _pose_state_dict()
    state = dict(raw)
    for key, value in raw.items():
        if key.startswith("backbone.") and value.is_floating_point() and "running_" not in key:
            state["ema_" + key.replace(".", "_")] = value + 1  # mmcv 1.x EMAHook: a buffer per parameter
    path = rf.save(rf.mmcv_checkpoint(state, ["person"], [[255, 0, 0]]), tmp_path / "epoch_210.pth")
    plain, conversion = convert_state_dict(load_official(path), "test_hrvmamba", multiscale_output=False)
    assert conversion.weights_from.startswith("state_dict (without its")
    averaged, conversion = convert_state_dict(load_official(path), "test_hrvmamba", ema=True,
                                              multiscale_output=False)
    assert conversion.weights_from.startswith("the ema_ copies in state_dict")
    differs = [k for k, v in averaged.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert differs and all("running_" not in k and "num_batches" not in k for k in differs)


def test_missing_ema_names_what_the_file_holds(tmp_path):
    official, _ = _official_and_ema()
    path = rf.save(rf.swin_trainer(official), tmp_path / "no_ema.pth")
    with pytest.raises(KeyError, match=r"no EMA weights .*config \(yacs.config.CfgNode, kept inert\)"):
        convert_state_dict(load_official(path), "test_vmamba", ema=True)


def test_release_files_load_without_yacs_or_mmengine(tmp_path):
    official, ema = _official_and_ema()
    files = [rf.save(rf.swin_trainer(official, ema), tmp_path / "swin.pth"),
             rf.save(rf.mmengine_checkpoint(_pose_state_dict(), ["person"], [[1, 2, 3]]), tmp_path / "mm.pth")]
    script = ("import sys\n"
              "for name in ('yacs', 'yacs.config', 'mmengine', 'mmengine.logging'):\n"
              "    sys.modules[name] = None  # importing them now raises ImportError\n"
              "from tools.safe_load import load_checkpoint\n"
              f"swin, mm = (load_checkpoint(p) for p in {[str(f) for f in files]!r})\n"
              "print(swin['config'].source, mm['message_hub']['log_scalars']['train/loss'].source,"
              " len(swin['model']))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["yacs.config.CfgNode", "mmengine.logging.history_buffer.HistoryBuffer",
                                     str(len(official))]


@pytest.mark.skipif(not (rf.has("yacs") and rf.has("mmengine")), reason="yacs and mmengine are not installed")
def test_stand_ins_pickle_like_the_real_classes(monkeypatch):
    """Where yacs and mmengine exist the fixtures use them; the stand-ins used elsewhere give the same bytes."""
    import mmengine.logging.history_buffer as history_module
    import yacs.config as yacs_module

    real = [yacs_module.CfgNode({"MODEL": yacs_module.CfgNode({"NAME": "vssm"})}),
            history_module.HistoryBuffer([1.0, 2.0], [1, 1])]
    real_bytes = pickle.dumps(real, protocol=2)
    monkeypatch.setattr(yacs_module, "CfgNode", rf.StandInCfgNode)
    monkeypatch.setattr(history_module, "HistoryBuffer", rf.StandInHistoryBuffer)
    stand_ins = [rf.StandInCfgNode({"MODEL": rf.StandInCfgNode({"NAME": "vssm"})}),
                 rf.StandInHistoryBuffer([1.0, 2.0], [1, 1])]
    assert pickle.dumps(stand_ins, protocol=2) == real_bytes
