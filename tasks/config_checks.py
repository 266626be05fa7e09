"""Config checks that run before any folder or model is made, each error naming the key.

Three tables: ``VALUE_RULES`` (what a value must be), ``FILLED_BY_RUN`` (arguments run.py passes itself, so a
config value would be silently replaced) and ``COMPONENT_GROUPS`` (where components with a ``_target_`` live;
each key of one must be an argument its target accepts, or the recorded ``config.yaml`` would claim a setting
that never reached the code). ``INPUT_FOLDER_KEYS`` lists data folders that must exist when given explicitly.
A backbone with ``pretrained=true`` must name converted weights on disk, and ``weights`` (weights without training
state) must exist and not come with ``ckpt_path`` (which would replace them).
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value or key that cannot work, named with its full key."""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return (_int(value) or isinstance(value, float)) and math.isfinite(value)


def positive_int(value: Any) -> bool:
    return _int(value) and value > 0


def existing_path(value: Any) -> bool:
    return isinstance(value, (str, Path)) and Path(value).expanduser().exists()


def positive_size(value: Any) -> bool:
    """One positive integer, or a (height, width)-like list of them."""
    if isinstance(value, (list, tuple, ListConfig)):
        return len(value) > 0 and all(positive_int(v) for v in value)
    return positive_int(value)


VALUE_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data.batch_size", positive_int, "a positive integer"),
    ("data.val_batch_size", positive_int, "a positive integer"),
    ("data.num_workers", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("data.image_size", positive_size, "a positive integer (or a list of them)"),
    ("data.img_size", positive_size, "a positive integer (or a list of them)"),
    ("data.crop_size", positive_size, "a positive integer (or a list of them)"),
    ("optimizer.lr", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("optimizer.weight_decay", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("trainer.max_epochs", lambda v: v is None or (_int(v) and v >= -1), "an integer >= -1 (-1: no limit)"),
    ("trainer.max_steps", lambda v: _int(v) and v >= -1, "an integer >= -1 (-1: no limit)"),
    ("trainer.accumulate_grad_batches", positive_int, "a positive integer"),
    ("weights", existing_path, "an existing folder written by tools.convert, its model.safetensors or a run's .ckpt"),
)

# Arguments run.build_task / build_trainer pass to each group's component (a config value would be replaced).
FILLED_BY_RUN: dict[str, tuple[str, ...]] = {
    "backbone": ("in_chans", "num_classes", "features_only", "stage_inputs"),
    "head": ("in_features", "in_channels", "strides", "num_classes"),
    "task": ("backbone", "head", "optimizer", "scheduler", "weight_decay"),  # + the task class's data_inputs
    "optimizer": ("params",),
    "scheduler": ("optimizer", "total_steps"),
    "trainer": ("callbacks", "logger"),
}
COMPONENT_GROUPS = ("data", "backbone", "head", "task", "optimizer", "scheduler", "trainer", "callbacks", "logger")
# Arguments of timm's factory and builder that the family code passes itself.
BUILDER_INTERNALS = frozenset({"model_cls", "variant", "model_name", "kwargs_filter", "pretrained_filter_fn",
                               "model_cfg", "pretrained_model_args"})
# Data folders that, when set on the command line, must exist (no silent fallback to another copy).
INPUT_FOLDER_KEYS = ("data.data_dir", "data.root")


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=False)
    except Exception as err:  # noqa: BLE001 -- an interpolation that fails names its own problem
        raise ConfigError(f"{key}: cannot be resolved ({err})") from err


def check_values(cfg: DictConfig) -> None:
    for key, rule, requirement in VALUE_RULES:
        value = _select(cfg, key)
        if value is not None and not rule(value):
            raise ConfigError(f"{key}={value!r} ({type(value).__name__}): must be {requirement}")
    scheduler = cfg.get("scheduler")
    if scheduler and _select(cfg, "trainer.max_epochs") == -1 and _select(cfg, "trainer.max_steps") == -1:
        raise ConfigError(f"trainer.max_epochs=-1 with trainer.max_steps=-1 gives the run no length, but "
                          f"scheduler={scheduler.get('_target_')} is laid out over the run's steps: set "
                          "trainer.max_epochs or trainer.max_steps, or scheduler=null")
    weights, ckpt_path = _select(cfg, "weights"), _select(cfg, "ckpt_path")
    if weights is not None and ckpt_path is not None:
        raise ConfigError(f"weights={weights} with ckpt_path={ckpt_path}: the checkpoint restores the whole model (and "
                          "in training the optimiser and epoch), so the weights would be replaced; give one of them "
                          "(to resume a run that started from weights, ckpt_path alone)")


def components(node: Any, key: str) -> Iterator[tuple[str, DictConfig]]:
    """Every ``(key, node)`` with a ``_target_`` at or below ``node``, without resolving any value."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield key, node
        for child in node.keys():
            yield from components(node._get_node(child), f"{key}.{child}")
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from components(node._get_node(index), f"{key}[{index}]")


def check_backbone_options(key: str, node: DictConfig, filled: Sequence[str]) -> None:
    """Build the configured backbone on the meta device (no memory, about a second for the largest variant)
    with the config's options: the family's constructors pass options down through ``**kwargs`` (skeleton ->
    block -> mixer), so only a build tells whether each one is used. An option nobody takes is named."""
    import backbones

    given = OmegaConf.create({k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                              if not k.startswith("_") and k != "name" and k not in filled})
    try:  # options that are configs of objects (e.g. mixer_layer: a _partial_ mixer) become them, as in run.py
        options = hydra.utils.instantiate(given, _convert_="all")
    except Exception as err:  # noqa: BLE001 -- Hydra wraps the cause; its message names the target
        raise ConfigError(f"{key}: its options cannot be instantiated: {err}") from err
    try:
        backbones.family_of(node.name)
    except ValueError as err:
        raise ConfigError(f"{key}.name={node.name!r}: {err}") from err
    try:
        backbones.require_local_weights(node.name, bool(options.get("pretrained")), options)
    except (OSError, RuntimeError) as err:
        raise ConfigError(f"{key}.pretrained=true: {err}") from err
    try:
        backbones.create_backbone(node.name, **{**options, "pretrained": False}, device="meta")
    except TypeError as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown is None:
            raise ConfigError(f"{key}: building {node.name} with these options fails: {err}") from err
        raise ConfigError(f"{key}.{unknown.group(1)}: backbones.create_backbone takes no argument "
                          f"{unknown.group(1)!r} for {node.name} (no part of the model uses it)") from err
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"{key}: building {node.name} with these options fails: {err}") from err


def accepted_arguments(target: str, node: DictConfig) -> Optional[set[str]]:
    """The keyword arguments ``target`` takes; None when it takes any (``**kwargs`` passed on unchecked)."""
    try:
        function = hydra.utils.get_object(target)
    except Exception as err:  # noqa: BLE001 -- Hydra wraps import errors; the message names the module
        raise ConfigError(f"_target_={target}: cannot be imported ({err})") from err
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind != p.VAR_POSITIONAL}


def filled_by_run(group: str, target: str) -> tuple[str, ...]:
    """The arguments run.py passes to the ``group`` component itself: the table's, plus for a task the facts
    its class says it is told about the data (``data_inputs``)."""
    filled = FILLED_BY_RUN.get(group, ())
    if group == "task":
        filled += tuple(getattr(hydra.utils.get_object(target), "data_inputs", ()))
    return filled


def check_components(cfg: DictConfig) -> None:
    for group in COMPONENT_GROUPS:
        node = cfg._get_node(group) if group in cfg else None
        for key, component in components(node, group):
            target = component._target_
            filled = filled_by_run(group, target) if key == group else ()
            accepted = accepted_arguments(target, component)
            for name in component.keys():
                if name.startswith("_"):
                    continue
                if name in filled:
                    raise ConfigError(f"{key}.{name}: run.py sets the {group}'s {name} itself (from the data module "
                                      "and the other parts), so this value would be ignored; remove it")
                if accepted is not None and name not in accepted:
                    raise ConfigError(f"{key}.{name}: {target} takes no argument {name!r} (it takes: "
                                      f"{', '.join(sorted(accepted - set(filled)))})")
            if target == "backbones.create_backbone" and isinstance(component.get("name"), str):
                check_backbone_options(key, component, filled)


def check_input_folders(cfg: DictConfig, overrides: Sequence[str]) -> None:
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    for key in INPUT_FOLDER_KEYS:
        value = _select(cfg, key) if key in given else None
        if value is not None and not Path(str(value)).expanduser().is_dir():
            raise ConfigError(f"{key}={value}: no such folder (set on the command line, so no other copy of the "
                              "data is used instead; create the folder first if the data is to be downloaded "
                              "into it)")


def check_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """Raise ``ConfigError`` naming the first key whose value or presence cannot work.

    ``overrides`` are the command line's task overrides (``key=value``): they tell which data folders the
    user named explicitly.
    """
    check_values(cfg)
    check_components(cfg)
    check_input_folders(cfg, overrides)
