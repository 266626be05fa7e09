"""The one entry point: compose a Hydra config, build the parts in a fixed order, train and/or test.

    python run.py                                   # default experiment: train, then test
    python run.py backbone=vmamba_tiny_s1l8 trainer.fast_dev_run=true
    python run.py mode=eval ckpt_path=<run>/checkpoints/last.ckpt
    python run.py mode=eval experiment=ade20k_upernet_vmamba_tiny_s1l8 weights=<tools.convert output folder>
    python run.py --help                            # config groups and examples
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from heads.interface import HeadInputs, head_inputs
from tasks.callbacks import CheckpointOnInterrupt
from tasks.checkpoint_io import resolve_checkpoint, run_identity
from tasks.config_checks import check_config
from tasks.run_dir import open_new, process_rank
from tasks.scaling import effective_batch_report, global_batch
from tasks.weights import load_task_weights

log = logging.getLogger("mambalab")

MODES = ("train", "eval")
# Rank 0's choice for ckpt_path=last, inherited by the ranks Lightning launches so that all resume one file.
LAST_CHECKPOINT_ENV = "MAMBALAB_LAST_CHECKPOINT"


def linear_scaled_lr(base_lr: float, batch_size: int, devices, num_nodes: int = 1, accumulate: int = 1,
                     reference_batch: int = 512) -> float:
    """The linear scaling rule of the official recipes: ``base_lr * global batch / 512``, where the global batch
    is ``batch_size x devices x num_nodes x accumulate`` (``tasks.scaling.global_batch``).

    ``devices`` may be "auto" (all visible GPUs, or 1 without CUDA) as in the trainer config.
    """
    return base_lr * global_batch(batch_size, devices, num_nodes, accumulate) / reference_batch


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
    image, e.g. a classifier), ``FEATURES`` (multi-scale NCHW maps, e.g. dense heads) or
    ``FEATURES_AND_STAGE_INPUTS`` (those maps, then the stages' inputs: VM-UNet's decoder).
    """
    inputs = head_inputs(hydra.utils.get_class(head_target))
    if inputs is HeadInputs.POOLED:
        return dict(num_classes=0), lambda backbone: dict(in_features=backbone.num_features)
    backbone_kwargs = dict(features_only=True)
    if inputs is HeadInputs.FEATURES_AND_STAGE_INPUTS:
        backbone_kwargs["stage_inputs"] = True
    return backbone_kwargs, lambda backbone: dict(in_channels=backbone.feature_info.channels(),
                                                  strides=backbone.feature_info.reduction())


def data_inputs(task_target: str, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """The facts about the data a task class lists in ``data_inputs``, read from the data module's attributes."""
    names = hydra.utils.get_class(task_target).data_inputs
    missing = [name for name in names if not hasattr(datamodule, name)]
    if missing:
        raise AttributeError(f"{task_target} needs {missing} from its data module, which "
                             f"{type(datamodule).__name__} does not provide")
    return {name: getattr(datamodule, name) for name in names}


def build_model(cfg: DictConfig, in_chans: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """The backbone, built for what the head consumes, and the head on it (also what tools.convert fills)."""
    backbone_kwargs, head_kwargs_for = backbone_interface(cfg.head._target_)
    backbone = hydra.utils.instantiate(cfg.backbone, in_chans=in_chans, **backbone_kwargs)
    head = hydra.utils.instantiate(cfg.head, **head_kwargs_for(backbone), num_classes=num_classes)
    return backbone, head


def build_task(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Data first (it knows channels, classes and the other facts the task is told), then backbone, head and
    the task around them. The optimiser's weight decay goes to the task, which applies it per parameter group."""
    datamodule = hydra.utils.instantiate(cfg.data)
    backbone, head = build_model(cfg, datamodule.in_chans, datamodule.num_classes)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    weight_decay = optimizer.pop("weight_decay", 0.0)
    task = hydra.utils.instantiate(cfg.task, backbone=backbone, head=head, optimizer=hydra.utils.instantiate(optimizer),
                                   scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                                   weight_decay=weight_decay, **data_inputs(cfg.task._target_, datamodule))
    return datamodule, task


def data_source(datamodule: pl.LightningDataModule) -> str:
    """The files or folder the data module reads: its ``data_source`` when it tells, else its root folder."""
    source = getattr(datamodule, "data_source", None)
    if source is None:
        source = next((getattr(datamodule, name) for name in ("root", "folder", "data_dir")
                       if getattr(datamodule, name, None) is not None), "(not stated by the data module)")
    return str(source)


def checkpoint_to_load(cfg: DictConfig) -> Optional[str]:
    """``cfg.ckpt_path`` checked (see ``resolve_checkpoint``); ``last`` is resolved once, by rank 0."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last" and process_rank() != 0 and os.environ.get(LAST_CHECKPOINT_ENV):
        return os.environ[LAST_CHECKPOINT_ENV]
    resolved = resolve_checkpoint(ckpt_path, Path(cfg.paths.log_dir), run_identity(cfg))
    if resolved is not None:  # the ranks Lightning launches get ckpt_path=last again: they read this instead
        os.environ[LAST_CHECKPOINT_ENV] = resolved
    return resolved


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
    """Write the fully resolved config and the code version of this attempt, and print them.

    They go to ``paths.record_dir``: the run folder, or its ``resume_<n>/`` when a run is continued in its
    own folder. Files are created new (``config_1.yaml`` if one exists), never written over.
    """
    record_dir = Path(cfg.paths.get("record_dir") or output_dir)
    for name, text in (("config.yaml", OmegaConf.to_yaml(cfg, resolve=True)),
                       ("version.json", json.dumps(code_version(), indent=2))):
        _, handle = open_new(record_dir / name)
        with handle:
            handle.write(text.encode())
    if cfg.get("print_config"):
        from rich import print as rich_print
        from rich.syntax import Syntax

        rich_print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark"))
    log.info("run directory: %s", output_dir)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and/or test as ``cfg.mode`` says; return the final callback metrics."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    check_config(cfg, overrides=HydraConfig.get().overrides.task if HydraConfig.initialized() else ())
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = checkpoint_to_load(cfg)
    if cfg.mode == "eval" and ckpt_path is None and not cfg.get("weights"):
        raise ValueError("mode=eval needs ckpt_path=<a .ckpt written by run.py> or weights=<a model converted by "
                         "tools.convert>")
    if ckpt_path is not None:
        log.info("checkpoint: %s", ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    record_run(cfg, output_dir)

    datamodule, task = build_task(cfg)
    if cfg.get("weights"):
        load_task_weights(task, cfg.weights, cfg.backbone.get("name"), cfg.head._target_, datamodule)
    task.run_identity = run_identity(cfg)
    log.info("data: %s reading %s", type(datamodule).__name__, data_source(datamodule))
    trainer = build_trainer(cfg)
    if cfg.mode == "eval":
        trainer.test(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        return log_test_metrics({k: float(v) for k, v in trainer.callback_metrics.items()})

    log.info(effective_batch_report(cfg, datamodule.batch_size, trainer.num_devices, trainer.num_nodes,
                                    trainer.accumulate_grad_batches))
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        log.warning("training stopped by SIGTERM; %s", resume_hint(trainer, output_dir))
        raise SystemExit(128 + signal.SIGTERM) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    return log_test_metrics(metrics)


def log_test_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Log every ``test/`` metric (one line each) and return the metrics."""
    for name in sorted(k for k in metrics if k.startswith("test/")):
        log.info("%s = %.4f", name, metrics[name])
    return metrics


def resume_hint(trainer: pl.Trainer, output_dir: Path) -> str:
    """How to continue a stopped run, naming only a checkpoint that exists."""
    saved = next((c.saved_path for c in trainer.callbacks if isinstance(c, CheckpointOnInterrupt) and c.saved_path),
                 None)
    if saved is not None:
        return f"resume with hydra.run.dir={output_dir} ckpt_path={saved}"
    checkpoint = trainer.checkpoint_callback
    written = [Path(p) for p in (checkpoint.last_model_path, checkpoint.best_model_path) if p] if checkpoint else []
    written = [path for path in written if path.is_file()]
    if not written:
        return ("no checkpoint was written (no checkpoint_on_interrupt callback, and no epoch ended with a "
                "checkpoint), so this run cannot be resumed")
    newest = max(written, key=lambda path: path.stat().st_mtime)
    return (f"the stopped state was not saved (no checkpoint_on_interrupt callback); the newest checkpoint is "
            f"{newest}: resume with hydra.run.dir={output_dir} ckpt_path={newest}, losing the steps after it")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    """Hydra entry; returns ``cfg.optimized_metric`` for sweepers."""
    metrics = run(cfg)
    return metrics.get(cfg.get("optimized_metric") or "")


if __name__ == "__main__":
    main()
