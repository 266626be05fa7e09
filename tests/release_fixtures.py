"""Checkpoint files built the way the official save code builds them (no downloads), for tools.convert.

- ``swin_trainer``: VMamba's / MSVMamba's ``save_checkpoint_ema`` and HRVMamba's ``save_checkpoint``
  (classification/utils): ``model``, ``optimizer``, ``lr_scheduler``, ``max_accuracy``, ``scaler``/``amp``,
  ``epoch``, the yacs ``config`` object and ``model_ema``;
- ``efficientvmamba_trainer``: EfficientVMamba's ``CheckpointManager._save`` (classification/lib/utils/misc.py):
  ``epoch``, ``model``, ``ema_model`` (a ``ModelEMA`` state dict, ``module.`` per wrapper), ``optimizer``,
  ``scaler``, ``dyrep``;
- ``mmengine_checkpoint``: mmengine's ``Runner.save_checkpoint`` (mmseg 1.x / mmdet 3.x / mmpose 1.x): ``meta``
  (config text, seed, dataset_meta, ...), ``state_dict``, ``message_hub`` (``HistoryBuffer`` log scalars
  holding numpy arrays), ``optimizer``, ``param_schedulers``; optionally ``EMAHook``'s ``ema_state_dict``;
- ``mmcv_checkpoint``: mmcv 1.x's runner (mmseg 0.x, Vim's segmentation): ``meta`` with ``CLASSES`` and
  ``PALETTE``, ``state_dict``, ``optimizer``.

Where yacs or mmengine is installed, their real classes are pickled; elsewhere a stand-in class is pickled under
the same module and class name with the same instance state (``test_stand_ins_pickle_like_the_real_classes``
checks that where both exist), so the files are the same either way and loading them never needs the package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def _stand_in(module: str, name: str, base: type = object, **namespace) -> type:
    """A class that pickles as ``module.name`` (while ``registered`` puts it in a fake module)."""
    return type(name, (base,), {"__module__": module, "__qualname__": name, **namespace})


def _cfg_node_init(self, init_dict: Optional[dict] = None) -> None:
    dict.__init__(self, init_dict or {})
    for key, value in (("__immutable__", False), ("__deprecated_keys__", set()), ("__renamed_keys__", {}),
                       ("__new_allowed__", False)):
        self.__dict__[key] = value


StandInCfgNode = _stand_in("yacs.config", "CfgNode", dict, __init__=_cfg_node_init)


_HISTORY_MODULE = "mmengine.logging.history_buffer"
_STATISTICS = ("min", "max", "current", "mean")


def _history_init(self, log_history: Sequence = (), count_history: Sequence = (), max_length: int = 1000000):
    self.max_length = max_length
    self._log_history, self._count_history = np.array(log_history), np.array(count_history)


def _history_getstate(self) -> dict:
    """HistoryBuffer's ``__getstate__``: its instance dict plus the class's statistics methods."""
    return {**self.__dict__, "statistics_methods": {name: getattr(type(self), name) for name in _STATISTICS}}


def _statistic(name: str):
    def method(self):
        return getattr(self._log_history, name if name in ("min", "max", "mean") else "__len__")()

    method.__name__, method.__qualname__, method.__module__ = name, f"HistoryBuffer.{name}", _HISTORY_MODULE
    return method


StandInHistoryBuffer = _stand_in(_HISTORY_MODULE, "HistoryBuffer", __init__=_history_init,
                                 __getstate__=_history_getstate, **{name: _statistic(name) for name in _STATISTICS})
STAND_INS = (StandInCfgNode, StandInHistoryBuffer)


def has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def cfg_node(tree: dict, frozen: bool = True):
    """A yacs ``CfgNode`` (nested), as the Swin-style trainers' ``config``."""
    cls = importlib.import_module("yacs.config").CfgNode if has("yacs") else StandInCfgNode
    node = cls()
    for key, value in tree.items():
        node[key] = cfg_node(value, frozen) if isinstance(value, dict) else value
    if frozen:
        node.__dict__["__immutable__"] = True  # what CfgNode.freeze() sets
    return node


def history_buffer(values: Sequence[float]):
    """An mmengine ``HistoryBuffer`` of logged values (numpy arrays inside)."""
    cls = (importlib.import_module("mmengine.logging.history_buffer").HistoryBuffer if has("mmengine")
           else StandInHistoryBuffer)
    return cls(list(values), [1] * len(values))


@contextlib.contextmanager
def registered(classes: Sequence[type] = STAND_INS) -> Iterator[None]:
    """Fake modules holding the stand-in classes while pickling (pickle checks it can find a class by name);
    a class whose package is installed is left to the real one."""
    added = []
    for cls in classes:
        parts = cls.__module__.split(".")
        if has(parts[0]):
            continue
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name not in sys.modules:
                sys.modules[name] = ModuleType(name)
                added.append(name)
        setattr(sys.modules[cls.__module__], cls.__qualname__, cls)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def save(checkpoint: dict, path: Path) -> Path:
    """``torch.save`` as the official scripts call it (pickle protocol 2)."""
    with registered():
        torch.save(checkpoint, path)
    return path


def training_state(weights: Dict[str, Tensor]) -> dict:
    """The optimizer, scheduler and grad-scaler state after one AdamW step over ``weights``."""
    params = [torch.nn.Parameter(v.detach().float().clone()) for v in weights.values() if v.is_floating_point()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=300)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    return {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}


SWIN_CONFIG = {"MODEL": {"TYPE": "vssm", "NAME": "vssm1_tiny_0230s", "DROP_PATH_RATE": 0.2,
                         "VSSM": {"EMBED_DIM": 96, "DEPTHS": [2, 2, 8, 2], "SSM_D_STATE": 1}},
               "TRAIN": {"EPOCHS": 300, "BASE_LR": 1e-3, "AMP_OPT_LEVEL": "O1"}, "OUTPUT": "output/vssm1_tiny"}


def swin_trainer(model: Dict[str, Tensor], model_ema: Optional[Dict[str, Tensor]] = None,
                 hrvmamba: bool = False) -> dict:
    """A checkpoint as VMamba's ``save_checkpoint_ema`` (or, ``hrvmamba=True``, HRVMamba's ``save_checkpoint``)
    writes it."""
    state = training_state(model)
    checkpoint = {"model": model, "optimizer": state["optimizer"], "lr_scheduler": state["lr_scheduler"],
                  "max_accuracy": 82.6, "epoch": 263, "config": cfg_node(SWIN_CONFIG)}
    checkpoint["amp" if hrvmamba else "scaler"] = state["scaler"]
    if model_ema is not None:
        checkpoint["model_ema"] = model_ema
        checkpoint["max_accuracy_ema" if hrvmamba else "max_accuray_ema"] = 82.5  # the official key's spelling
        if hrvmamba:
            checkpoint["ema_decay"] = 0.9999
    return checkpoint


def efficientvmamba_trainer(model: Dict[str, Tensor], ema: Dict[str, Tensor]) -> dict:
    """A checkpoint as EfficientVMamba's ``CheckpointManager._save`` writes it; the ``ModelEMA`` was made around
    the DDP-wrapped model, hence ``module.module.`` in ``ema_model``."""
    state = training_state(model)
    return {"epoch": 299, "model": model, "ema_model": {f"module.module.{k}": v for k, v in ema.items()},
            "optimizer": state["optimizer"], "scaler": state["scaler"], "dyrep": None}


def mmengine_checkpoint(state_dict: Dict[str, Tensor], classes: Sequence[str], palette: Sequence[Sequence[int]],
                        ema_state_dict: Optional[Dict[str, Tensor]] = None) -> dict:
    """A checkpoint as mmengine's ``Runner.save_checkpoint`` writes it (``EMAHook`` adds ``ema_state_dict``
    and swaps the averaged weights into ``state_dict``)."""
    state = training_state(state_dict)
    meta = {"cfg": "model = dict(type='EncoderDecoder', ...)\n", "seed": np.int64(1234567),
            "experiment_name": "upernet_vssm_4xb4-160k_ade20k-512x512_tiny_20240301_120000",
            "time": "20240305_093000", "mmengine_version": "0.10.1", "epoch": 0, "iter": 160000,
            "dataset_meta": {"classes": tuple(classes), "palette": [list(p) for p in palette],
                             "reduce_zero_label": True},
            "env_info": {"mean_iou_per_class": np.linspace(0, 1, len(classes), dtype=np.float32)}}
    hub = {"log_scalars": {"train/loss": history_buffer([1.2, 0.8, 0.5]), "train/lr": history_buffer([6e-5])},
           "runtime_info": {"epoch": 0, "iter": 160000, "max_iters": 160000, "dataset_meta": meta["dataset_meta"]},
           "resumed_keys": {"train/loss": True, "epoch": True}}
    checkpoint = {"meta": meta, "state_dict": state_dict, "message_hub": hub, "optimizer": state["optimizer"],
                  "param_schedulers": [state["lr_scheduler"]]}
    if ema_state_dict is not None:
        checkpoint["ema_state_dict"] = {"steps": torch.tensor(160000),
                                        **{f"module.{k}": v for k, v in ema_state_dict.items()}}
    return checkpoint


def mmcv_checkpoint(state_dict: Dict[str, Tensor], classes: Sequence[str], palette: Sequence[Sequence[int]]) -> dict:
    """A checkpoint as mmcv 1.x's runner writes it for mmseg 0.x (``meta`` with ``CLASSES`` and ``PALETTE``)."""
    state = training_state(state_dict)
    meta = {"mmcv_version": "1.7.1", "time": "Fri Mar  1 12:00:00 2024", "env_info": "sys.platform: linux\n",
            "config": "model = dict(type='EncoderDecoder', ...)\n", "seed": 0, "exp_name": "upernet_vim_tiny",
            "CLASSES": tuple(classes), "PALETTE": [list(p) for p in palette], "epoch": 1, "iter": 60000}
    return {"meta": meta, "state_dict": state_dict, "optimizer": state["optimizer"]}


# ---- Dense (OpenMMLab) layouts, written out from mmseg's / mmdet's module structure: names and shapes ----

Shapes = Dict[str, tuple]


def _conv_module(prefix: str, c_in: int, c_out: int, kernel: int, norm: bool = True) -> Shapes:
    """mmcv's ``ConvModule``: ``conv`` (no bias when followed by a norm) and ``bn``."""
    shapes = {f"{prefix}.conv.weight": (c_out, c_in, kernel, kernel)}
    if norm:
        shapes.update({f"{prefix}.bn.{name}": (c_out,) for name in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{prefix}.bn.num_batches_tracked"] = ()
    else:
        shapes[f"{prefix}.conv.bias"] = (c_out,)
    return shapes


def mmseg_upernet(in_channels: Sequence[int], num_classes: int, channels: int = 512, aux_channels: int = 256,
                  aux_index: int = 2, pool_scales: Sequence[int] = (1, 2, 3, 6)) -> Shapes:
    """The head keys of mmseg's ``EncoderDecoder`` with ``UPerHead`` + ``FCNHead`` (upernet base config)."""
    shapes: Shapes = {"decode_head.conv_seg.weight": (num_classes, channels, 1, 1),
                      "decode_head.conv_seg.bias": (num_classes,)}
    for i, _ in enumerate(pool_scales):  # each PPM branch: AdaptiveAvgPool2d, then a 1x1 ConvModule
        shapes.update(_conv_module(f"decode_head.psp_modules.{i}.1", in_channels[-1], channels, 1))
    shapes.update(_conv_module("decode_head.bottleneck", in_channels[-1] + len(pool_scales) * channels, channels, 3))
    for i, c in enumerate(in_channels[:-1]):
        shapes.update(_conv_module(f"decode_head.lateral_convs.{i}", c, channels, 1))
        shapes.update(_conv_module(f"decode_head.fpn_convs.{i}", channels, channels, 3))
    shapes.update(_conv_module("decode_head.fpn_bottleneck", len(in_channels) * channels, channels, 3))
    shapes.update({"auxiliary_head.conv_seg.weight": (num_classes, aux_channels, 1, 1),
                   "auxiliary_head.conv_seg.bias": (num_classes,)})
    shapes.update(_conv_module("auxiliary_head.convs.0", in_channels[aux_index], aux_channels, 3))
    return shapes


def mmdet_maskrcnn(in_channels: Sequence[int], num_classes: int, fpn_channels: int = 256, fc_channels: int = 1024,
                   mask_channels: int = 256, num_anchors: int = 3, with_masks: bool = True) -> Shapes:
    """The neck and head keys of mmdet's Mask R-CNN (``FPN``, ``RPNHead``, ``Shared2FCBBoxHead``, ``FCNMaskHead``;
    mask-rcnn_r50_fpn base config): classifier ``num_classes + 1`` with background last, class-specific deltas."""
    shapes: Shapes = {}
    for i, c in enumerate(in_channels):
        shapes.update(_conv_module(f"neck.lateral_convs.{i}", c, fpn_channels, 1, norm=False))
        shapes.update(_conv_module(f"neck.fpn_convs.{i}", fpn_channels, fpn_channels, 3, norm=False))
    shapes.update({"rpn_head.rpn_conv.weight": (fpn_channels, fpn_channels, 3, 3), "rpn_head.rpn_conv.bias":
                   (fpn_channels,), "rpn_head.rpn_cls.weight": (num_anchors, fpn_channels, 1, 1),
                   "rpn_head.rpn_cls.bias": (num_anchors,), "rpn_head.rpn_reg.weight": (4 * num_anchors,
                   fpn_channels, 1, 1), "rpn_head.rpn_reg.bias": (4 * num_anchors,)})
    box = "roi_head.bbox_head."
    shapes.update({box + "fc_cls.weight": (num_classes + 1, fc_channels), box + "fc_cls.bias": (num_classes + 1,),
                   box + "fc_reg.weight": (4 * num_classes, fc_channels), box + "fc_reg.bias": (4 * num_classes,),
                   box + "shared_fcs.0.weight": (fc_channels, fpn_channels * 49), box + "shared_fcs.0.bias":
                   (fc_channels,), box + "shared_fcs.1.weight": (fc_channels, fc_channels),
                   box + "shared_fcs.1.bias": (fc_channels,)})
    if with_masks:
        mask = "roi_head.mask_head."
        for i in range(4):
            shapes.update(_conv_module(f"{mask}convs.{i}", fpn_channels if i == 0 else mask_channels, mask_channels,
                                       3, norm=False))
        shapes.update({mask + "upsample.weight": (mask_channels, mask_channels, 2, 2),
                       mask + "upsample.bias": (mask_channels,),
                       mask + "conv_logits.weight": (num_classes, mask_channels, 1, 1),
                       mask + "conv_logits.bias": (num_classes,)})
    return shapes


def dense_backbone(official: Dict[str, Tensor], dims: Sequence[int]) -> Shapes:
    """An official classifier layout as its dense backbone (``Backbone_VSSM``): ``classifier.*`` / ``norm`` /
    ``head`` deleted, ``outnorm{i}`` added, everything under ``backbone.``."""
    classifier = ("classifier.", "norm.", "head.")
    out = {f"backbone.{k}": tuple(v.shape) for k, v in official.items() if not k.startswith(classifier)}
    for i, dim in enumerate(dims):
        out.update({f"backbone.outnorm{i}.weight": (dim,), f"backbone.outnorm{i}.bias": (dim,)})
    return out


def materialise(shapes: Shapes, seed: int = 0, meta: bool = False) -> Dict[str, Tensor]:
    """Random tensors of ``shapes`` (BatchNorm variances positive, batch counters int64), or meta tensors."""
    if meta:
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000, dtype=torch.int64)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.05
    return out


