"""The one entry point: compose a Hydra config, build the parts in a fixed order, train and/or test.

    python run.py                                   # default experiment: train, then test
    python run.py backbone=vmamba_tiny_s1l8 trainer.fast_dev_run=true
    python run.py mode=eval ckpt_path=<run>/checkpoints/last.ckpt
    python run.py --help                            # config groups and examples
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from heads.interface import HeadInputs, head_inputs

log = logging.getLogger("mambalab")

MODES = ("train", "eval")


def linear_scaled_lr(base_lr: float, batch_size: int, devices, num_nodes: int = 1, accumulate: int = 1,
                     reference_batch: int = 512) -> float:
    """The linear scaling rule of the official recipes: ``base_lr * total_batch / 512``.

    ``devices`` may be "auto" (all visible GPUs, or 1 without CUDA) as in the trainer config.
    """
    if not isinstance(devices, int):
        import torch

        devices = max(1, torch.cuda.device_count()) if str(devices) in ("auto", "-1") else len(str(devices).split(","))
    return base_lr * batch_size * devices * num_nodes * accumulate / reference_batch


OmegaConf.register_new_resolver("linear_lr", linear_scaled_lr, replace=True)


def instantiate_group(config: Optional[DictConfig]) -> list[Any]:
    """Instantiate every entry of a dict-of-components group (callbacks, loggers) that has a target."""
    if not config:
        return []
    return [hydra.utils.instantiate(entry) for entry in config.values() if entry and "_target_" in entry]


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """The Trainer with the configured callbacks and loggers.

    Without a logger there is nowhere to record learning rates, so ``LearningRateMonitor`` (which
    refuses to run without one) is left out rather than failing the run.
    """
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:
        kept = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
        if len(kept) < len(callbacks):
            log.info("logger=none: the learning-rate monitor is off (it needs a logger)")
        callbacks = kept
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def backbone_interface(head_target: str) -> tuple[dict, Callable[[nn.Module], dict]]:
    """What the backbone is built to return for this head, and what the head is told about it.

    A head class declares ``inputs`` (``heads.interface.HeadInputs``): ``POOLED`` (one pooled vector per
    image, e.g. a classifier) or ``FEATURES`` (multi-scale NCHW maps, e.g. dense heads).
    """
    if head_inputs(hydra.utils.get_class(head_target)) is HeadInputs.POOLED:
        return dict(num_classes=0), lambda backbone: dict(in_features=backbone.num_features)
    return dict(features_only=True), lambda backbone: dict(in_channels=backbone.feature_info.channels(),
                                                            strides=backbone.feature_info.reduction())


def data_inputs(task_target: str, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """The facts about the data a task class lists in ``data_inputs``, read from the data module's attributes."""
    names = hydra.utils.get_class(task_target).data_inputs
    missing = [name for name in names if not hasattr(datamodule, name)]
    if missing:
        raise AttributeError(f"{task_target} needs {missing} from its data module, which "
                             f"{type(datamodule).__name__} does not provide")
    return {name: getattr(datamodule, name) for name in names}


def build_task(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Data first (it knows channels, classes and the other facts the task is told), then backbone, head and
    the task around them. The optimiser's weight decay goes to the task, which applies it per parameter group."""
    datamodule = hydra.utils.instantiate(cfg.data)
    backbone_kwargs, head_kwargs_for = backbone_interface(cfg.head._target_)
    backbone = hydra.utils.instantiate(cfg.backbone, in_chans=datamodule.in_chans, **backbone_kwargs)
    head = hydra.utils.instantiate(cfg.head, **head_kwargs_for(backbone), num_classes=datamodule.num_classes)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    weight_decay = optimizer.pop("weight_decay", 0.0)
    make_task = hydra.utils.instantiate(cfg.task, _partial_=True)
    task = make_task(backbone=backbone, head=head, optimizer=hydra.utils.instantiate(optimizer),
                     scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                     weight_decay=weight_decay, **data_inputs(cfg.task._target_, datamodule))
    return datamodule, task


def resolve_checkpoint(ckpt_path: Optional[str], log_dir: Path, output_dir: Path) -> Optional[str]:
    """Check a user-given checkpoint early, naming the file when it is missing.

    ``last`` means the most recently written ``checkpoints/last.ckpt`` of any earlier run under ``log_dir``.
    """
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        candidates = [p for p in log_dir.glob("**/checkpoints/last.ckpt") if output_dir not in p.parents]
        if not candidates:
            raise FileNotFoundError(f"ckpt_path=last: no earlier run under {log_dir} has checkpoints/last.ckpt")
        return str(max(candidates, key=lambda p: p.stat().st_mtime))
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
    return str(path)


def code_version() -> dict[str, Any]:
    """Git commit (and whether the tree was dirty) plus the versions of the packages a result depends on."""
    import importlib.metadata
    import subprocess

    root = Path(__file__).resolve().parent
    version: dict[str, Any] = {}
    try:
        version["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                               text=True, check=True).stdout.strip()
        version["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root,
                                                   capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        version["git_commit"] = None
    for package in ("mambalab", "torch", "torchvision", "lightning", "timm", "hydra-core", "torchmetrics", "mamba-ssm"):
        try:
            version[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version[package] = None
    return version


@rank_zero_only
def record_run(cfg: DictConfig, output_dir: Path) -> None:
    """Write the fully resolved config and the code version beside the run's outputs, and print them."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (output_dir / "version.json").write_text(json.dumps(code_version(), indent=2))
    if cfg.get("print_config"):
        from rich import print as rich_print
        from rich.syntax import Syntax

        rich_print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark"))
    log.info("run directory: %s", output_dir)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and/or test as ``cfg.mode`` says; return the final callback metrics."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), Path(cfg.paths.log_dir), output_dir)
    if cfg.mode == "eval" and ckpt_path is None:
        raise ValueError("mode=eval needs ckpt_path=<path to a .ckpt written by run.py>")
    pl.seed_everything(cfg.seed, workers=True)
    record_run(cfg, output_dir)

    datamodule, task = build_task(cfg)
    trainer = build_trainer(cfg)
    if cfg.mode == "eval":
        trainer.test(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        log.warning("training stopped by SIGTERM; resume with ckpt_path=%s", output_dir / "checkpoints" / "last.ckpt")
        raise SystemExit(128 + signal.SIGTERM) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    for name in sorted(k for k in metrics if k.startswith("test/")):
        log.info("%s = %.4f", name, metrics[name])
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    """Hydra entry; returns ``cfg.optimized_metric`` for sweepers."""
    metrics = run(cfg)
    return metrics.get(cfg.get("optimized_metric") or "")


if __name__ == "__main__":
    main()
