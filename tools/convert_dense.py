"""Released dense checkpoints (mmseg UperNet, mmdet Mask R-CNN) -> the task weights ``run.py weights=`` loads.

    python -m tools.convert upernet_vssm_4xb4-160k_ade20k-512x512_tiny_s_iter_160000.pth vmamba_tiny_s1l8 \
        --out weights/upernet_vmamba_t
    python run.py mode=eval experiment=ade20k_upernet_vmamba_tiny_s1l8 weights=weights/upernet_vmamba_t

``tools.convert`` comes here when the file's state dict has mmseg's (``decode_head.*``, ``auxiliary_head.*``) or
mmdet's (``neck.*``, ``rpn_head.*``, ``roi_head.*``) head keys next to ``backbone.*``. The head is identified
from its keys (UPerHead + FCNHead; FPN + RPNHead + Shared2FCBBoxHead + FCNMaskHead), the experiment that trains
it for the variant is composed exactly as run.py composes it (``ade20k_upernet_<variant>``,
``coco_maskrcnn_1x_<variant>``, or the common recipe with ``backbone=<variant>``), and its backbone and head are
built by ``run.build_model``. Backbone keys go through the family's ``checkpoint_filter_fn``, head keys through
the head's own table (``heads.upernet.from_mmseg``, ``heads.maskrcnn.from_mmdet``); both are loaded with
``strict=True``. What the file says that the experiment must follow (the head's width, no auxiliary or mask
branch) becomes an override recorded with the weights; a file that cannot fit (another backbone variant, head
type or number of classes) fails naming what it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import Tensor, nn

import run
from heads.maskrcnn import from_mmdet
from heads.upernet import MMSEG_PREFIXES, from_mmseg
from tasks.weights import META_FILE, META_KEY, WEIGHTS_FILE
from tools.safe_load import Opaque

CONF_DIR = Path(run.__file__).resolve().parent / "conf"
HEAD_TARGETS = {"mmseg": "heads.UperNet", "mmdet": "heads.MaskRCNN"}
EXPERIMENTS = {"mmseg": "ade20k_upernet", "mmdet": "coco_maskrcnn_1x"}


def dense_framework(state_dict: Dict[str, Any]) -> Optional[str]:
    """"mmseg" or "mmdet" when the state dict is an OpenMMLab segmentor / detector's, else None."""
    if any(k.startswith(MMSEG_PREFIXES) for k in state_dict):
        return "mmseg"
    if any(k.startswith(("rpn_head.", "roi_head.")) for k in state_dict):  # "neck." alone is HRVMamba's classifier
        return "mmdet"
    return None


def _plain(value: Any) -> Any:
    """A JSON-able copy of meta values (class names, palettes); None for what is not (numpy placeholders)."""
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return None if any(v is None for v in items) else items
    return value if isinstance(value, (str, int, float)) and not isinstance(value, Opaque) else None


@dataclass
class DenseFile:
    """What a dense checkpoint holds, read from its keys and ``meta``."""

    framework: str
    version: str
    head: str
    num_classes: int
    settings: Dict[str, Any] = field(default_factory=dict)
    classes: Optional[List[str]] = None
    palette: Optional[List[List[int]]] = None

    @property
    def target(self) -> str:
        return HEAD_TARGETS[self.framework]

    def describe(self) -> str:
        return f"a {self.head} with {self.num_classes} classes ({self.framework} {self.version})"


def _sample(state_dict: Dict[str, Tensor], prefix: str) -> str:
    keys = sorted(k for k in state_dict if k.startswith(prefix))
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def read_dense_file(checkpoint: dict, state_dict: Dict[str, Tensor]) -> DenseFile:
    """Identify the head and its settings (what the experiment's head must match) from the keys, the classes
    from ``meta``."""
    framework = dense_framework(state_dict)
    meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), dict) else {}
    dataset_meta = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    version = {"mmseg": "1.x", "mmdet": "3.x"}[framework] if dataset_meta else (
        {"mmseg": "0.x", "mmdet": "2.x"}[framework] if "CLASSES" in meta else "(no meta)")
    classes = _plain(dataset_meta.get("classes", meta.get("CLASSES")))
    palette = _plain(dataset_meta.get("palette", meta.get("PALETTE")))
    settings: Dict[str, Any] = {}
    if framework == "mmseg":
        if not any(k.startswith("decode_head.psp_modules.") for k in state_dict) or \
                "decode_head.fpn_bottleneck.conv.weight" not in state_dict:
            raise ValueError(f"its decode head is not mmseg's UPerHead (keys {_sample(state_dict, 'decode_head.')}); "
                             f"only UperNet checkpoints convert")
        head, num_classes = "UperNet (UPerHead + FCNHead)", int(state_dict["decode_head.conv_seg.weight"].shape[0])
        settings["channels"] = int(state_dict["decode_head.conv_seg.weight"].shape[1])
        if "auxiliary_head.conv_seg.weight" in state_dict:
            settings["aux_channels"] = int(state_dict["auxiliary_head.conv_seg.weight"].shape[1])
        else:
            head, settings["aux_index"] = "UperNet (UPerHead, no auxiliary head)", None
    else:
        if any(k.startswith("roi_head.bbox_head.0.") for k in state_dict):
            raise ValueError("it is a Cascade R-CNN (several box-head stages), which heads.MaskRCNN does not have")
        if "roi_head.bbox_head.shared_fcs.1.weight" not in state_dict:
            raise ValueError(f"its box head is not mmdet's Shared2FCBBoxHead (keys "
                             f"{_sample(state_dict, 'roi_head.bbox_head.')})")
        head, num_classes = "Mask R-CNN (FPN, RPN, 2-FC box head, FCN mask head)", int(
            state_dict["roi_head.bbox_head.fc_cls.weight"].shape[0]) - 1
        settings["fpn_channels"] = int(state_dict["neck.fpn_convs.0.conv.weight"].shape[0])
        settings["representation_size"] = int(state_dict["roi_head.bbox_head.shared_fcs.1.weight"].shape[0])
        if "roi_head.mask_head.convs.0.conv.weight" in state_dict:
            settings["mask_channels"] = int(state_dict["roi_head.mask_head.convs.0.conv.weight"].shape[0])
        if not any(k.startswith("roi_head.mask_head.") for k in state_dict):
            head, settings["with_masks"] = "Faster R-CNN (FPN, RPN, 2-FC box head)", False
    return DenseFile(framework, version, head, num_classes, settings, classes, palette)


def _override(key: str, value: Any) -> str:
    """A Hydra override setting ``key`` to a Python value."""
    return f"{key}={json.dumps(value)}"


def compose_experiment(experiment: str, overrides: Sequence[str]) -> DictConfig:
    """The run.py config of ``experiment`` with ``overrides``, composed as run.py composes it."""
    if not (CONF_DIR / "experiment" / f"{experiment}.yaml").is_file():
        raise ValueError(f"no experiment {experiment!r} in {CONF_DIR / 'experiment'}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=[f"experiment={experiment}", *overrides])
    except Exception as err:  # Hydra's override parsing / composition errors
        raise ValueError(f"experiment={experiment} with {list(overrides)} cannot be composed: {err}") from err
    finally:
        GlobalHydra.instance().clear()


def choose_experiment(dense: DenseFile, variant: str, experiment: Optional[str]) -> Tuple[str, List[str]]:
    """The experiment (and overrides) that trains the file's model: the user's, the variant's own, or the
    common recipe of the head with ``backbone=<variant>``."""
    if experiment is not None:
        return experiment, []
    own = f"{EXPERIMENTS[dense.framework]}_{variant}"
    if (CONF_DIR / "experiment" / f"{own}.yaml").is_file():
        return own, []
    return f"{EXPERIMENTS[dense.framework]}_common", [f"backbone={variant}"]


def _shapes(state_dict: Dict[str, Tensor]) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _difference(ours: Dict[str, tuple], theirs: Dict[str, tuple], name: Callable[[str], str] = str) -> str:
    """The first misfit between a model's key -> shape map and a converted file's; ``name`` tells a key the file
    holds (a differing or unexpected one) by its name in the file."""
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    wrong = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    details = [f"{len(wrong)} shape(s) differ, first {name(k)}: file {theirs[k]}, model {ours[k]}" for k in wrong[:1]]
    details += [f"{len(missing)} key(s) missing, first {k}" for k in missing[:1]]
    details += [f"{len(unexpected)} unexpected key(s), first {name(k)}" for k in unexpected[:1]]
    return "; ".join(details)


def _backbone_weights(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}


def dense_matching_variants(state_dict: Dict[str, Tensor], variant: str) -> List[str]:
    """The registered variants of ``variant``'s family whose dense (``features_only``) backbone the file's
    ``backbone.*`` weights fit exactly."""
    import backbones
    from tools.convert import family_filter

    family = backbones.family_of(variant)
    weights, matches = _backbone_weights(state_dict), []
    for name in timm.list_models(module=family.__name__.rsplit(".", 1)[-1]):
        try:
            with torch.device("meta"):
                model = timm.create_model(name, features_only=True)
            converted = family_filter(name)[1](weights, model.model)
        except Exception:  # a family's filter may reject another variant's layout outright
            continue
        if _shapes(converted) == _shapes(model.model.state_dict()):
            matches.append(name)
    return matches


@dataclass
class DenseConversion:
    """What a dense conversion did, for the summary and the weights' description."""

    dense: DenseFile
    experiment: str
    overrides: List[str]
    variant: str
    family: str
    backbone_tensors: int
    head_tensors: int
    weights_from: str
    source: str
    out_dir: Optional[Path] = None

    def description(self) -> Dict[str, Any]:
        """The JSON stored with the weights (``tasks.weights`` checks it against the run)."""
        return {"format": "mambalab-task-weights/1", "experiment": self.experiment, "overrides": self.overrides,
                "backbone": self.variant, "head": self.dense.target, "num_classes": self.dense.num_classes,
                "classes": self.dense.classes, "palette": self.dense.palette,
                "source": {"file": self.source, "layout": f"{self.dense.framework} {self.dense.version}",
                           "model": self.dense.head, "weights": self.weights_from}}

    def run_command(self, mode: str = "eval") -> str:
        out = self.out_dir or "<out>"
        return " ".join(["python run.py", f"mode={mode}", f"experiment={self.experiment}", *self.overrides,
                         f"weights={out}"])

    def summary(self) -> str:
        where = f" -> {self.out_dir}" if self.out_dir else ""
        return (f"{self.dense.describe()} from {self.weights_from}: backbone {self.variant} ({self.family} rules, "
                f"{self.backbone_tensors} tensors) and head ({self.head_tensors} tensors) loaded strict into "
                f"experiment={self.experiment}{''.join(' ' + o for o in self.overrides)}{where}\n"
                f"evaluate: {self.run_command()}\nfine-tune: {self.run_command('train')}")


@dataclass
class DensePlan:
    """The run.py model a dense file goes into: the experiment, its overrides and the composed config."""

    dense: DenseFile
    experiment: str
    overrides: List[str]
    cfg: DictConfig
    variant: str

    @property
    def holds(self) -> str:
        return f"the file holds {self.dense.describe()}"


def plan_dense(checkpoint: dict, weights: Dict[str, Tensor], variant: str, experiment: Optional[str] = None,
               overrides: Sequence[str] = ()) -> DensePlan:
    """Read the file's head and compose the experiment that builds it (see the module doc)."""
    dense = read_dense_file(checkpoint, weights)
    experiment, chosen = choose_experiment(dense, variant, experiment)
    overrides = [*chosen, *overrides]
    cfg = compose_experiment(experiment, overrides)
    holds = f"the file holds {dense.describe()}"
    if cfg.head._target_ != dense.target:
        raise ValueError(f"{holds}, but experiment={experiment} builds {cfg.head._target_}; choose a "
                         f"{EXPERIMENTS[dense.framework]}_* experiment")
    if cfg.backbone.get("name") != variant:
        raise ValueError(f"{holds}; experiment={experiment} builds backbone {cfg.backbone.get('name')}, not "
                         f"{variant} (pass --override backbone={variant} or choose another experiment)")
    follow = [_override(f"head.{key}", value) for key, value in dense.settings.items() if cfg.head.get(key) != value]
    if follow:  # the file's head is built differently from the experiment's (its width, no aux or mask branch)
        overrides = [*overrides, *follow]
        cfg = compose_experiment(experiment, overrides)
    return DensePlan(dense, experiment, overrides, cfg, variant)


def fit_dense(plan: DensePlan, weights: Dict[str, Tensor], meta: bool = False
              ) -> Tuple[nn.Module, nn.Module, Dict[str, Tensor], Dict[str, Tensor]]:
    """Backbone and head as run.py builds them for ``plan`` (on the meta device with ``meta``) and the file's
    weights renamed for them, checked key by key and shape by shape; a misfit names what the file holds."""
    from tools.convert import family_filter

    family, filter_fn = family_filter(plan.variant)
    body = _backbone_weights(weights)
    with torch.device("meta" if meta else "cpu"):
        backbone, head = run.build_model(plan.cfg, 3, plan.dense.num_classes)
    backbone_sd = {f"model.{k}": v for k, v in filter_fn(body, backbone.model).items()}
    if _shapes(backbone_sd) != _shapes(backbone.state_dict()):
        matches = [m for m in dense_matching_variants(weights, plan.variant) if m != plan.variant]
        fits = (f"its backbone fits {', '.join(matches)}, not {plan.variant}" if matches
                else f"its backbone fits no registered {family.__name__.rsplit('.', 1)[-1]} variant")
        raise ValueError(f"{plan.holds}; {fits} "
                         f"({_difference(_shapes(backbone.state_dict()), _shapes(backbone_sd))})")
    head_sd = from_mmseg(weights) if plan.dense.framework == "mmseg" else from_mmdet(weights)
    if _shapes(head_sd) != _shapes(head.state_dict()):
        raise ValueError(f"{plan.holds}, which does not fit the head of experiment={plan.experiment} "
                         f"({_difference(_shapes(head.state_dict()), _shapes(head_sd))})")
    if not meta:
        own = {k: v.data_ptr() for k, v in backbone.state_dict().items()}
        filled = sorted(k for k, v in backbone_sd.items() if v.data_ptr() == own[k])
        if filled:  # a family filter supplies a dense model's own parts for classifier files; a dense file has them
            raise ValueError(f"{plan.holds}, but its backbone lacks {len(filled)} tensors of the dense backbone "
                             f"(first {filled[0]})")
    return backbone, head, backbone_sd, head_sd


def convert_dense(checkpoint: dict, weights: Dict[str, Tensor], weights_from: str, variant: str,
                  source: str, experiment: Optional[str] = None,
                  overrides: Sequence[str] = ()) -> Tuple[Dict[str, Tensor], DenseConversion]:
    """The task state dict (``backbone.*``, ``head.*``) of the run.py model for the file's UperNet / Mask R-CNN,
    loaded strictly, and what the conversion did (see the module doc)."""
    import backbones

    plan = plan_dense(checkpoint, weights, variant, experiment, overrides)
    fit_dense(plan, weights, meta=True)  # fails fast, before any weights are initialised
    backbone, head, backbone_sd, head_sd = fit_dense(plan, weights)
    backbone.load_state_dict(backbone_sd, strict=True)
    head.load_state_dict(head_sd, strict=True)
    task_sd = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
               **{f"head.{k}": v for k, v in head.state_dict().items()}}
    family = backbones.family_of(variant).__name__.rsplit(".", 1)[-1]
    return task_sd, DenseConversion(plan.dense, plan.experiment, plan.overrides, variant, family, len(backbone_sd),
                                    len(head_sd), weights_from, source)


OPENMMLAB_FILE = "openmmlab.pth"


def openmmlab_checkpoint(task_sd: Dict[str, Tensor], weights: Dict[str, Tensor],
                         description: Dict[str, Any]) -> Dict[str, Any]:
    """The converted model for mmseg / mmdet with ``MambaLabBackbone`` (docs/mm): our backbone's weights under
    ``backbone.body.``, the heads' under their own OpenMMLab names, as mmengine's ``load_checkpoint`` reads it."""
    backbone = {f"backbone.body.{k[len('backbone.'):]}": v for k, v in task_sd.items() if k.startswith("backbone.")}
    heads = {k: v for k, v in weights.items() if not k.startswith("backbone.")}
    meta = {"dataset_meta": {"classes": description["classes"], "palette": description["palette"]},
            "mambalab": description}
    return {"meta": meta, "state_dict": {**backbone, **heads}}


def write_task_weights(task_sd: Dict[str, Tensor], description: Dict[str, Any], folder: Path,
                       openmmlab: Optional[Dict[str, Any]] = None) -> None:
    """``model.safetensors`` (the description in its metadata) and ``mambalab.json`` into ``folder``, and the
    OpenMMLab checkpoint when given."""
    text = json.dumps(description, indent=2)
    save_file({k: v.detach().contiguous().clone() for k, v in task_sd.items()}, str(folder / WEIGHTS_FILE),
              metadata={META_KEY: text})
    (folder / META_FILE).write_text(text + "\n")
    if openmmlab is not None:
        torch.save(openmmlab, folder / OPENMMLAB_FILE)


def default_out(conversion: DenseConversion) -> Path:
    """The default output folder: ``./<head recipe>_<variant>`` (e.g. ``./ade20k_upernet_vmamba_tiny_s1l8``)."""
    return Path(f"{EXPERIMENTS[conversion.dense.framework]}_{conversion.variant}")
