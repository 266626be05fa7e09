"""Task weights without training state (run.py ``weights=``): a model ``tools.convert`` made from an official
UperNet / Mask R-CNN checkpoint, or the weights of a run's ``.ckpt``, loaded strictly into the task run.py
builds, before fine-tuning or testing. Unlike ``ckpt_path`` nothing else is restored (no optimizer, epoch or
scheduler state), so training starts afresh from these weights.

A converted model is ``model.safetensors`` holding the task's state dict (``backbone.*``, ``head.*``) with a
JSON description in its metadata (``mambalab``, also written beside it as ``mambalab.json``): the experiment
it was converted for, the backbone, the head, the number of classes and the dataset's class names. A run's
``.ckpt`` describes itself by the backbone and experiment its run recorded (``tasks.checkpoint_io``). A file
that does not match the run (another backbone, head or number of classes) fails naming both sides before any
tensor is copied.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .checkpoint_io import checkpoint_record

log = logging.getLogger("mambalab")

WEIGHTS_FILE = "model.safetensors"
META_FILE = "mambalab.json"
META_KEY = "mambalab"


def read_task_weights(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """The task state dict in ``path`` (a folder written by tools.convert, its ``model.safetensors``, or a
    run's ``.ckpt``) and the description stored with it (for a ``.ckpt``, the backbone and experiment its run
    recorded; empty for one written before runs recorded them)."""
    path = Path(path).expanduser()
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"weights={path}: no such file" + (f" (looked for {file})" if file != path else ""))
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {}).get(META_KEY, "{}"))
                return {key: handle.get_tensor(key) for key in handle.keys()}, meta
        except Exception as err:  # not a safetensors file, or its description is not JSON
            raise ValueError(f"weights={file} cannot be read ({type(err).__name__}: {err})") from err
    try:
        record = checkpoint_record(file)  # complete, readable with weights_only, a run.py checkpoint
    except ValueError as err:
        raise ValueError(f"weights={err} (weights= takes a run's .ckpt or a model tools.convert wrote from an "
                         "official checkpoint)") from err
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    return checkpoint["state_dict"], {key: value for key, value in record.items() if value is not None}


def _check_description(meta: Dict[str, Any], file: Path, backbone: Optional[str], head: str,
                       num_classes: int, class_names: Optional[Sequence[str]]) -> None:
    """Fail naming both sides when the file was made for another model; warn when only class names differ."""
    wanted = {"backbone": backbone, "head": head, "num_classes": num_classes}
    clashes = [f"{key} {meta[key]!r} (this run: {value!r})" for key, value in wanted.items()
               if meta.get(key) is not None and value is not None and meta[key] != value]
    if clashes:
        converted = bool(meta.get("source"))
        made = "converted for" if converted else "written by a run of"
        held = f"{made} experiment={meta['experiment']}" if meta.get("experiment") else "written"
        advice = ("run the experiment it was converted for, or convert the official file for this one" if converted
                  else "run the model it was written by, or pass weights of this run's model")
        raise ValueError(f"weights={file} was {held} and holds {'; '.join(clashes)}; {advice}")
    names = meta.get("classes")
    if names and class_names and list(names) != list(class_names):
        first = next(i for i, (a, b) in enumerate(zip(names, class_names)) if a != b) if len(names) == len(
            class_names) else min(len(names), len(class_names))
        log.warning("weights=%s: its classes differ from the dataset's from index %d (%s vs %s); the indices are "
                    "used as they are", file, first, list(names)[first:first + 1], list(class_names)[first:first + 1])


def load_task_weights(task: nn.Module, path: Path, backbone: Optional[str], head: str, datamodule: Any) -> None:
    """Load ``path`` (see ``read_task_weights``) into ``task`` strictly, module by module (``backbone``, ``head``
    and any other top-level module the file has weights for)."""
    state_dict, meta = read_task_weights(path)
    file = Path(path)
    _check_description(meta, file, backbone, head, datamodule.num_classes, getattr(datamodule, "class_names", None))
    groups: Dict[str, Dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        module, _, rest = key.partition(".")
        groups.setdefault(module, {})[rest] = value
    missing = [name for name in ("backbone", "head") if name not in groups]
    if missing:
        raise ValueError(f"weights={file} holds no {' or '.join(missing)} weights (it has {', '.join(groups)})")
    for name, weights in groups.items():
        module = getattr(task, name, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"weights={file} has weights for {name!r}, which this task does not have")
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            detail = str(err).split("\n", 2)[1:2] or [str(err)]
            raise ValueError(f"weights={file}: the {name} weights do not fit this run's {name} "
                             f"({detail[0].strip()})") from err
    log.info("weights: %s loaded into %s (%s)", file, ", ".join(groups),
             f"converted from {meta['source']['file']}" if meta.get("source") else "no training state")
