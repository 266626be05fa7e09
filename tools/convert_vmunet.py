"""Official VM-UNet-family checkpoints -> the task weights ``run.py weights=`` loads: VM-UNet (JCruan519/VM-UNet,
VMamba v0's SS2D in encoder and decoder) and MHS-VM (PixDeep/MHS-VM, Multi-Head Scan in place of SS2D).

    python -m tools.convert best.pth vanilla_vmamba_tiny --out weights/vmunet_isic18
    python run.py mode=eval experiment=isic18_vmunet weights=weights/vmunet_isic18 data.root=<ISIC 2018>
    python -m tools.convert best_4h.pth mhs_vmamba_tiny --out weights/mhs_vm_4h
    python run.py mode=eval experiment=isic18_mhs_vmunet weights=weights/mhs_vm_4h data.root=<ISIC 2018>

``tools.convert`` comes here when the file's keys are under ``vmunet.`` (the official ``VMUNet`` wrapper);
blocks with ``mhs.scanhead_*`` modules make it MHS-VM's, otherwise it is VM-UNet's. Both ``train.py`` scripts save
``best.pth`` as the bare ``model.state_dict()`` (so are MHS-VM's released ``best_3h.pth`` / ``best_4h.pth``) and
``latest.pth`` as a dict whose ``model_state_dict`` holds the weights beside the epoch, the losses (numpy scalars)
and the optimizer and scheduler state; those are read as inert data by ``tools.safe_load`` and not converted.
MHS-VM's state dict names some tensors twice (``backbones.mhs.OFFICIAL_ALIASES``); each repeat is checked equal to
its primary and dropped, and a file where they differ is refused naming both keys.

The classes (``final_conv``), the encoder and decoder depths (``layers.i.blocks.j``, ``layers_up.i.blocks.j``) and
MHS-VM's heads (3: "CXS", 4: "CXSZ") are read from the keys. The experiment is ``--experiment`` or the layout's
default whose data has the file's classes: ``isic18_mhs_vmunet`` for MHS-VM, ``isic18_vmunet`` (1 class) or
``synapse_vmunet`` (9 classes) for VM-UNet. It is composed with the variant, routes and depths recorded as
overrides where it differs, and built by ``run.build_model``; each layout's one rule table
(``OfficialLayout``: VMamba's v0 table or ``backbones.mhs``'s for the encoder, ``heads.vmunet.from_official`` with
the mixer's table for the decoder) renames the keys, and both parts load with ``strict=True``. A file that does not
fit is refused naming the official key and both shapes (or the first missing key), before anything is written.
MHS-VM's scan route attention threshold is not in the file: the experiment's (0.5 for ISIC 2018; the official
test.py evaluates with 0.4: ``--override backbone.sra_threshold=0.4``) is recorded with the weights.

The converted model computes the official one: ``VMUNetDecoder`` adds the encoder stages' inputs before
upsampling, as VM-UNet and MHS-VM do (``heads.vmunet``), and ``run.py``'s model (``head(backbone(x))``) gives the
official outputs to ~4e-10 (MHS-VM) and ~4e-12 (VM-UNet) of their scale in float64 (tests/test_convert_vmunet.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import Tensor, nn

import run
from backbones import mhs
from backbones._checkpoint import VMAMBA_KEY_RULES, KeyRules, drop_aliases, rename_key
from heads.vmunet import OFFICIAL_DECODER, SS2D_MIXER_RULES, from_official
from tools.convert_dense import _difference, _shapes, compose_experiment

HEAD_TARGET = "heads.VMUNetDecoder"
OFFICIAL_PREFIX = mhs.OFFICIAL_PREFIX
OFFICIAL_ENCODER = mhs.OFFICIAL_ENCODER
FINAL_CONV = f"{OFFICIAL_PREFIX}final_conv.weight"
_SCAN_HEAD = re.compile(r"\.mhs\.scanhead_([A-Za-z]+)\.")
_BLOCK = re.compile(r"^vmunet\.(layers|layers_up)\.(\d+)\.blocks\.(\d+)\.")


@dataclass(frozen=True)
class OfficialLayout:
    """One official code base's ``VMUNet`` state dict: how its encoder and decoder keys become ours."""

    name: str
    repository: str
    experiments: Tuple[str, ...]  # the defaults, the first whose data has the file's number of classes
    encoder_rules: KeyRules
    mixer_rules: KeyRules
    aliases: KeyRules = ()


# VMamba v0's skeleton and SS2D in encoder and decoder; ``isic18_vmunet`` for one class, ``synapse_vmunet`` for 9.
VM_UNET = OfficialLayout("VM-UNet", "JCruan519/VM-UNet", ("isic18_vmunet", "synapse_vmunet"),
                         VMAMBA_KEY_RULES["v1"], SS2D_MIXER_RULES)
MHS_VM = OfficialLayout("MHS-VM", "PixDeep/MHS-VM", ("isic18_mhs_vmunet",), mhs.OFFICIAL_KEY_RULES,
                        mhs.MIXER_KEY_RULES, mhs.OFFICIAL_ALIASES)


def _classes(count: int) -> str:
    return f"{count} class" if count == 1 else f"{count} classes"


def official_layout(state_dict: Dict[str, Any]) -> Optional[OfficialLayout]:
    """The layout of an official VM-UNet-family model's state dict (keys under the ``VMUNet`` wrapper's
    ``vmunet.``; any other key is named as a stray by ``fit_vmunet``): MHS-VM's when its blocks hold
    ``mhs.scanhead_*`` modules, else VM-UNet's; None for other files."""
    if not any(k.startswith(OFFICIAL_PREFIX) for k in state_dict):
        return None
    return MHS_VM if any(_SCAN_HEAD.search(k) for k in state_dict) else VM_UNET


def official_routes(state_dict: Dict[str, Tensor]) -> str:
    """The file's heads as ``routes`` letters in the official order: "CXS" (3 heads) or "CXSZ" (4 heads)."""
    letters = {match[1] for k in state_dict for match in [_SCAN_HEAD.search(k)] if match}
    routes = "".join(letter for letter in "CXSZ" if letter in letters)
    if routes not in ("CXS", "CXSZ") or letters - set(routes):
        raise ValueError(f"its MHS modules have heads {sorted(letters)}; the official code builds C, X, S (3 heads) "
                         f"or C, X, S, Z (4 heads)")
    return routes


def official_depths(state_dict: Dict[str, Any]) -> Tuple[List[int], List[int]]:
    """Blocks per encoder stage (``layers.i``) and per decoder stage (``layers_up.i``, deepest first)."""
    counts: Dict[str, Dict[int, int]] = {"layers": {}, "layers_up": {}}
    for key in state_dict:
        match = _BLOCK.match(key)
        if match:
            stages = counts[match[1]]
            stages[int(match[2])] = max(stages.get(int(match[2]), 0), int(match[3]) + 1)
    return [[stages.get(i, 0) for i in range(max(stages, default=-1) + 1)] for stages in counts.values()]


def official_names(state_dict: Dict[str, Any], layout: OfficialLayout) -> Dict[str, str]:
    """Our key (``backbone.model.*`` / ``head.*``) -> the official key it comes from, for the file's encoder and
    decoder; a repeated tensor (``layout.aliases``) is checked equal to its primary and left out."""
    body = {k[len(OFFICIAL_PREFIX):]: k for k in drop_aliases(state_dict, layout.aliases)}
    encoder = {f"backbone.model.{rename_key(k, layout.encoder_rules)}": key for k, key in body.items()
               if k.startswith(OFFICIAL_ENCODER)}
    decoder = {f"head.{k}": key for k, key in from_official(body, layout.mixer_rules).items()}
    return {**encoder, **decoder}


@dataclass
class VMUNetConversion:
    """What a VM-UNet-family conversion did, for the summary and the weights' description."""

    layout: OfficialLayout
    routes: str
    num_classes: int
    depths: List[int]
    decoder_depths: List[int]
    experiment: str
    overrides: List[str]
    variant: str
    backbone_tensors: int
    head_tensors: int
    aliases: int
    sra_threshold: Optional[float]
    weights_from: str
    source: str
    not_converted: str = ""
    out_dir: Optional[Path] = None

    def describe(self) -> str:
        if self.routes:
            return f"{self.layout.name} ({len(self.routes)} heads {self.routes}, {_classes(self.num_classes)})"
        return (f"{self.layout.name} (depths {self.depths}, decoder {self.decoder_depths}, "
                f"{_classes(self.num_classes)})")

    def description(self) -> Dict[str, Any]:
        """The JSON stored with the weights (``tasks.weights`` checks it against the run)."""
        return {"format": "mambalab-task-weights/1", "experiment": self.experiment, "overrides": self.overrides,
                "backbone": self.variant, "head": HEAD_TARGET, "num_classes": self.num_classes, "classes": None,
                "palette": None,
                "source": {"file": self.source, "layout": f"{self.layout.repository} VMUNet state dict",
                           "model": self.describe(), "weights": self.weights_from}}

    def run_command(self, mode: str = "eval") -> str:
        return " ".join(["python run.py", f"mode={mode}", f"experiment={self.experiment}", *self.overrides,
                         f"weights={self.out_dir or '<out>'}"])

    def summary(self) -> str:
        where = f" -> {self.out_dir}" if self.out_dir else ""
        lines = [f"{self.describe()} from {self.weights_from}: backbone {self.variant} ({self.backbone_tensors} "
                 f"tensors) and head ({self.head_tensors} tensors) loaded strict into experiment={self.experiment}"
                 f"{''.join(' ' + o for o in self.overrides)}{where}"]
        if self.layout is MHS_VM:
            lines.append(f"{self.aliases} duplicate keys (one tensor under two official names) checked equal and "
                         f"dropped; scan route attention threshold {self.sra_threshold} (not in the file; the "
                         f"official test.py uses 0.4: --override backbone.sra_threshold=0.4)")
        if self.not_converted:
            lines.append(f"also in the file, not converted: {self.not_converted}")
        lines += [f"evaluate: {self.run_command()}", f"fine-tune: {self.run_command('train')}"]
        return "\n".join(lines)


def _data_classes(cfg: DictConfig) -> Optional[int]:
    """The number of classes the experiment's datamodule declares (a class attribute), if it declares one."""
    count = getattr(get_class(cfg.data._target_), "num_classes", None) if "data" in cfg else None
    return count if isinstance(count, int) else None


def _setting(cfg: DictConfig, group: str, key: str, value: Any) -> List[str]:
    """The override that sets ``group.key`` to ``value`` where the composed config differs (``+`` if it lacks it)."""
    if group in cfg and key in cfg[group] and cfg[group][key] == value:
        return []
    text = f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)
    return [f"{'' if key in cfg[group] else '+'}{group}.{key}={text}"]


def plan_vmunet(weights: Dict[str, Tensor], variant: str, experiment: Optional[str] = None,
                overrides: Sequence[str] = ()) -> Tuple[str, DictConfig, List[str], str, int]:
    """The experiment and composed config (and its overrides) of the run.py model the file goes into, its MHS
    routes ("" for VM-UNet's SS2D) and classes. Routes and depths are read from the keys and recorded where the
    experiment differs; the user's ``overrides`` come last, so they win (and a misfit they cause is reported)."""
    layout = official_layout(weights)
    if layout is None:
        raise ValueError(f"it has no key under {OFFICIAL_PREFIX!r}, so it is not an official VM-UNet model")
    routes = official_routes(weights) if layout is MHS_VM else ""
    final_conv = weights.get(FINAL_CONV)
    if final_conv is None or final_conv.dim() != 4:
        raise ValueError(f"it has no {FINAL_CONV}, so it is not a whole {layout.name} model")
    num_classes = int(final_conv.shape[0])
    depths, decoder_depths = official_depths(weights)
    overrides = list(overrides)
    if experiment is None:
        fitting = [name for name in layout.experiments
                   if _data_classes(compose_experiment(name, overrides)) in (None, num_classes)]
        experiment = (fitting or layout.experiments)[0]
    cfg = compose_experiment(experiment, overrides)
    chosen = [] if cfg.backbone.get("name") == variant else [f"backbone={variant}"]
    cfg = compose_experiment(experiment, [*chosen, *overrides]) if chosen else cfg
    if routes:
        chosen += _setting(cfg, "backbone", "routes", routes)
    chosen += [*_setting(cfg, "backbone", "depths", depths), *_setting(cfg, "head", "depths", decoder_depths)]
    overrides = [*chosen, *overrides]
    cfg = compose_experiment(experiment, overrides)
    holds = f"the file holds {layout.name}" + (f" ({len(routes)} heads {routes})" if routes else "")
    if cfg.head._target_ != HEAD_TARGET:
        raise ValueError(f"{holds}, but experiment={experiment} builds {cfg.head._target_}, not {HEAD_TARGET}")
    if routes and cfg.backbone.get("routes") != routes:
        raise ValueError(f"{holds}; experiment={experiment} {' '.join(overrides)} builds routes "
                         f"{cfg.backbone.get('routes')!r}")
    data_classes = _data_classes(cfg)
    if data_classes not in (None, num_classes):
        wanted = (data_classes, *final_conv.shape[1:])
        others = [name for name in layout.experiments if name != experiment]
        raise ValueError(f"{holds} with {_classes(num_classes)}, but experiment={experiment}'s data "
                         f"({cfg.data._target_}) has {_classes(data_classes)}: {FINAL_CONV} is "
                         f"{tuple(final_conv.shape)} in the file, {wanted} in the model"
                         + (f" (--experiment {' / '.join(others)})" if others else ""))
    return experiment, cfg, overrides, routes, num_classes


def fit_vmunet(cfg: DictConfig, weights: Dict[str, Tensor], num_classes: int, holds: str, meta: bool = False
               ) -> Tuple[nn.Module, nn.Module, Dict[str, Tensor], Dict[str, Tensor]]:
    """Backbone and head as run.py builds them for ``cfg`` (on the meta device with ``meta``) and the file's
    weights renamed for them, checked key by key and shape by shape; a misfit names the first differing key."""
    layout = official_layout(weights)
    with torch.device("meta" if meta else "cpu"):
        backbone, head = run.build_model(cfg, 3, num_classes)
    known = tuple(OFFICIAL_PREFIX + part for part in (*OFFICIAL_ENCODER, *OFFICIAL_DECODER))
    stray = sorted(k for k in weights if not k.startswith(known))
    if stray:
        raise ValueError(f"{holds}, with {len(stray)} key(s) outside VM-UNet's encoder and decoder, first {stray[0]}")
    names = official_names(weights, layout)
    converted = {ours: weights[theirs] for ours, theirs in names.items()}
    backbone_sd = {k[len("backbone."):]: v for k, v in converted.items() if k.startswith("backbone.")}
    head_sd = {k[len("head."):]: v for k, v in converted.items() if k.startswith("head.")}
    for part, prefix, module, part_sd in (("encoder", "backbone.", backbone, backbone_sd),
                                          ("decoder", "head.", head, head_sd)):
        if _shapes(part_sd) != _shapes(module.state_dict()):
            misfit = _difference(_shapes(module.state_dict()), _shapes(part_sd),
                                 lambda key, prefix=prefix: f"{names[prefix + key]} ({key})")
            raise ValueError(f"{holds}, whose {part} does not fit experiment={cfg.get('task_name')} ({misfit})")
    return backbone, head, backbone_sd, head_sd


def convert_vmunet(weights: Dict[str, Tensor], variant: str, weights_from: str, source: str,
                   experiment: Optional[str] = None,
                   overrides: Sequence[str] = ()) -> Tuple[Dict[str, Tensor], VMUNetConversion]:
    """The task state dict (``backbone.*``, ``head.*``) of the run.py model for an official VM-UNet or MHS-VM
    state dict (unwrapped), loaded strictly, and what the conversion did (see the module doc)."""
    experiment, cfg, overrides, routes, num_classes = plan_vmunet(weights, variant, experiment, overrides)
    layout = official_layout(weights)
    depths, decoder_depths = official_depths(weights)
    conversion = VMUNetConversion(layout, routes, num_classes, depths, decoder_depths, experiment,
                                  overrides, variant, 0, 0, 0, cfg.backbone.get("sra_threshold"), weights_from,
                                  source)
    holds = f"the file holds {conversion.describe()}"
    fit_vmunet(cfg, weights, num_classes, holds, meta=True)  # fails fast, before any weights are initialised
    backbone, head, backbone_sd, head_sd = fit_vmunet(cfg, weights, num_classes, holds)
    backbone.load_state_dict(backbone_sd, strict=True)
    head.load_state_dict(head_sd, strict=True)
    task_sd = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
               **{f"head.{k}": v for k, v in head.state_dict().items()}}
    conversion.backbone_tensors, conversion.head_tensors = len(backbone_sd), len(head_sd)
    conversion.aliases = len(weights) - len(backbone_sd) - len(head_sd)
    return task_sd, conversion


def default_out(conversion: VMUNetConversion) -> Path:
    """The default output folder: ``./<experiment>`` for VM-UNet, ``./<experiment>_<heads>h`` for MHS-VM (e.g.
    ``./isic18_mhs_vmunet_4h``)."""
    return Path(f"{conversion.experiment}_{len(conversion.routes)}h" if conversion.routes else conversion.experiment)
