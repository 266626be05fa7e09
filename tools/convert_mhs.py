"""Official MHS-VM checkpoints (PixDeep/MHS-VM: the whole VM-UNet) -> the task weights ``run.py weights=`` loads.

    python -m tools.convert best_4h.pth mhs_vmamba_tiny --out weights/mhs_vm_4h
    python run.py mode=eval experiment=isic18_mhs_vmunet weights=weights/mhs_vm_4h data.root=<ISIC 2018>

``tools.convert`` comes here when the file's keys are MHS-VM's: every key under ``vmunet.`` (the ``VMUNet``
wrapper) with ``mhs.scanhead_*`` modules in its blocks. Its ``train.py`` saves ``best.pth`` as the bare
``model.state_dict()`` (so are the released ``best_3h.pth`` / ``best_4h.pth``) and ``latest.pth`` as a dict
whose ``model_state_dict`` holds the weights beside the epoch, the losses (numpy scalars) and the optimizer and
scheduler state; those are read as inert data by ``tools.safe_load`` and not converted. The official state dict
names some tensors twice (``backbones.mhs.OFFICIAL_ALIASES``); each repeat is checked equal to its primary and
dropped, and a file where they differ is refused naming both keys.

The number of heads (3: "CXS", 4: "CXSZ") and of classes are read from the keys; the experiment
(``isic18_mhs_vmunet`` unless ``--experiment`` names another) is composed with ``backbone.routes`` set to
the file's heads and built by ``run.build_model``. Encoder keys go through ``backbones.mhs.checkpoint_filter_fn``,
decoder keys through ``heads.vmunet.from_official`` with the MHS mixer's table, and both load with
``strict=True``. The scan route attention threshold is not in the file: the experiment's (0.5 for ISIC 2018;
the official test.py evaluates with 0.4: ``--override backbone.sra_threshold=0.4``) is recorded with the weights.

The converted model computes the official one: ``VMUNetDecoder`` adds the encoder stages' inputs before
upsampling, as VM-UNet and MHS-VM do (``heads.vmunet``), and ``run.py``'s model (``head(backbone(x))``) gives the
official outputs to ~4e-10 of their scale in float64 (tests/test_convert_mhs.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

import run
from backbones._checkpoint import drop_aliases
from backbones.mhs import MIXER_KEY_RULES, OFFICIAL_ALIASES, OFFICIAL_ENCODER, OFFICIAL_PREFIX, checkpoint_filter_fn
from heads.vmunet import OFFICIAL_DECODER, from_official
from tools.convert_dense import _difference, _shapes, compose_experiment

DEFAULT_EXPERIMENT = "isic18_mhs_vmunet"
HEAD_TARGET = "heads.VMUNetDecoder"
_SCAN_HEAD = re.compile(r"\.mhs\.scanhead_([A-Za-z]+)\.")


def _classes(count: int) -> str:
    return f"{count} class" if count == 1 else f"{count} classes"


def is_mhs_vm(state_dict: Dict[str, Any]) -> bool:
    """Whether ``state_dict`` is an official MHS-VM model's (the ``VMUNet`` wrapper with MHS modules)."""
    return any(k.startswith(OFFICIAL_PREFIX) and _SCAN_HEAD.search(k) for k in state_dict)


def official_routes(state_dict: Dict[str, Tensor]) -> str:
    """The file's heads as ``routes`` letters in the official order: "CXS" (3 heads) or "CXSZ" (4 heads)."""
    letters = {match[1] for k in state_dict for match in [_SCAN_HEAD.search(k)] if match}
    routes = "".join(letter for letter in "CXSZ" if letter in letters)
    if routes not in ("CXS", "CXSZ") or letters - set(routes):
        raise ValueError(f"its MHS modules have heads {sorted(letters)}; the official code builds C, X, S (3 heads) "
                         f"or C, X, S, Z (4 heads)")
    return routes


@dataclass
class MHSConversion:
    """What an MHS-VM conversion did, for the summary and the weights' description."""

    routes: str
    num_classes: int
    experiment: str
    overrides: List[str]
    variant: str
    backbone_tensors: int
    head_tensors: int
    aliases: int
    sra_threshold: float
    weights_from: str
    source: str
    not_converted: str = ""
    out_dir: Optional[Path] = None

    def describe(self) -> str:
        return f"MHS-VM ({len(self.routes)} heads {self.routes}, {_classes(self.num_classes)})"

    def description(self) -> Dict[str, Any]:
        """The JSON stored with the weights (``tasks.weights`` checks it against the run)."""
        return {"format": "mambalab-task-weights/1", "experiment": self.experiment, "overrides": self.overrides,
                "backbone": self.variant, "head": HEAD_TARGET, "num_classes": self.num_classes, "classes": None,
                "palette": None,
                "source": {"file": self.source, "layout": "PixDeep/MHS-VM VMUNet state dict",
                           "model": self.describe(), "weights": self.weights_from}}

    def run_command(self, mode: str = "eval") -> str:
        return " ".join(["python run.py", f"mode={mode}", f"experiment={self.experiment}", *self.overrides,
                         f"weights={self.out_dir or '<out>'}"])

    def summary(self) -> str:
        where = f" -> {self.out_dir}" if self.out_dir else ""
        lines = [f"{self.describe()} from {self.weights_from}: backbone {self.variant} ({self.backbone_tensors} "
                 f"tensors) and head ({self.head_tensors} tensors) loaded strict into experiment={self.experiment}"
                 f"{''.join(' ' + o for o in self.overrides)}{where}",
                 f"{self.aliases} duplicate keys (one tensor under two official names) checked equal and dropped; "
                 f"scan route attention threshold {self.sra_threshold} (not in the file; the official test.py "
                 f"uses 0.4: --override backbone.sra_threshold=0.4)"]
        if self.not_converted:
            lines.append(f"also in the file, not converted: {self.not_converted}")
        lines += [f"evaluate: {self.run_command()}", f"fine-tune: {self.run_command('train')}"]
        return "\n".join(lines)


def plan_mhs(weights: Dict[str, Tensor], variant: str, experiment: Optional[str] = None,
             overrides: Sequence[str] = ()) -> Tuple[DictConfig, List[str], str, int]:
    """The composed config (and its overrides) of the run.py model the file goes into, its routes and classes."""
    routes = official_routes(weights)
    final_conv = weights.get(f"{OFFICIAL_PREFIX}final_conv.weight")
    if final_conv is None or final_conv.dim() != 4:
        raise ValueError(f"it has no {OFFICIAL_PREFIX}final_conv.weight, so it is not a whole MHS-VM model")
    experiment = experiment or DEFAULT_EXPERIMENT
    chosen = []
    cfg = compose_experiment(experiment, list(overrides))
    if cfg.backbone.get("name") != variant:
        chosen.append(f"backbone={variant}")
    if cfg.backbone.get("routes") != routes:
        chosen.append(f"backbone.routes={routes}")
    overrides = [*chosen, *overrides]
    if chosen:
        cfg = compose_experiment(experiment, overrides)
    holds = f"the file holds MHS-VM ({len(routes)} heads {routes})"
    if cfg.head._target_ != HEAD_TARGET:
        raise ValueError(f"{holds}, but experiment={experiment} builds {cfg.head._target_}, not {HEAD_TARGET}")
    if cfg.backbone.get("routes") != routes:
        raise ValueError(f"{holds}; experiment={experiment} {' '.join(overrides)} builds routes "
                         f"{cfg.backbone.get('routes')!r}")
    return cfg, overrides, routes, int(final_conv.shape[0])


def fit_mhs(cfg: DictConfig, weights: Dict[str, Tensor], num_classes: int, holds: str, meta: bool = False
            ) -> Tuple[nn.Module, nn.Module, Dict[str, Tensor], Dict[str, Tensor]]:
    """Backbone and head as run.py builds them for ``cfg`` (on the meta device with ``meta``) and the file's
    weights renamed for them, checked key by key and shape by shape; a misfit names the first differing key."""
    with torch.device("meta" if meta else "cpu"):
        backbone, head = run.build_model(cfg, 3, num_classes)
    known = tuple(OFFICIAL_PREFIX + part for part in (*OFFICIAL_ENCODER, *OFFICIAL_DECODER))
    stray = sorted(k for k in weights if not k.startswith(known))
    if stray:
        raise ValueError(f"{holds}, with {len(stray)} key(s) outside VM-UNet's encoder and decoder, first {stray[0]}")
    backbone_sd = {f"model.{k}": v for k, v in checkpoint_filter_fn(weights, backbone.model).items()}
    body = {k[len(OFFICIAL_PREFIX):]: v for k, v in drop_aliases(weights, OFFICIAL_ALIASES).items()}
    head_sd = from_official(body, MIXER_KEY_RULES)
    for part, module, converted in (("encoder", backbone, backbone_sd), ("decoder", head, head_sd)):
        if _shapes(converted) != _shapes(module.state_dict()):
            raise ValueError(f"{holds}, whose {part} does not fit experiment={cfg.get('task_name')} "
                             f"({_difference(_shapes(module.state_dict()), _shapes(converted))})")
    return backbone, head, backbone_sd, head_sd


def convert_mhs(weights: Dict[str, Tensor], variant: str, weights_from: str, source: str,
                experiment: Optional[str] = None,
                overrides: Sequence[str] = ()) -> Tuple[Dict[str, Tensor], MHSConversion]:
    """The task state dict (``backbone.*``, ``head.*``) of the run.py model for an official MHS-VM state dict
    (unwrapped), loaded strictly, and what the conversion did (see the module doc)."""
    cfg, overrides, routes, num_classes = plan_mhs(weights, variant, experiment, overrides)
    holds = f"the file holds MHS-VM ({len(routes)} heads {routes}, {_classes(num_classes)})"
    fit_mhs(cfg, weights, num_classes, holds, meta=True)  # fails fast, before any weights are initialised
    backbone, head, backbone_sd, head_sd = fit_mhs(cfg, weights, num_classes, holds)
    backbone.load_state_dict(backbone_sd, strict=True)
    head.load_state_dict(head_sd, strict=True)
    task_sd = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
               **{f"head.{k}": v for k, v in head.state_dict().items()}}
    aliases = len(weights) - len(backbone_sd) - len(head_sd)
    return task_sd, MHSConversion(routes, num_classes, experiment or DEFAULT_EXPERIMENT, overrides, variant,
                                  len(backbone_sd), len(head_sd), aliases, float(cfg.backbone.sra_threshold),
                                  weights_from, source)


def default_out(conversion: MHSConversion) -> Path:
    """The default output folder: ``./<experiment>_<heads>h`` (e.g. ``./isic18_mhs_vmunet_4h``)."""
    return Path(f"{conversion.experiment}_{len(conversion.routes)}h")

