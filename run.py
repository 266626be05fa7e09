"""The one entry point: compose a Hydra config, build the parts in a fixed order, train and/or test.

    python run.py                                   # default experiment: train, then test
    python run.py backbone=vmamba_tiny_s1l8 trainer.fast_dev_run=true
    python run.py mode=eval ckpt_path=<run>/checkpoints/last.ckpt
    python run.py --help                            # config groups and examples
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mambalab")

MODES = ("train", "eval")


def instantiate_group(config: Optional[DictConfig]) -> list[Any]:
    """Instantiate every entry of a dict-of-components group (callbacks, loggers) that has a target."""
    if not config:
        return []
    return [hydra.utils.instantiate(entry) for entry in config.values() if entry and "_target_" in entry]


def build_task(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Data first (it knows channels and classes), then backbone, head and the task around them."""
    datamodule = hydra.utils.instantiate(cfg.data)
    backbone = hydra.utils.instantiate(cfg.backbone, in_chans=datamodule.in_chans, num_classes=0)
    head = hydra.utils.instantiate(cfg.head, in_features=backbone.num_features, num_classes=datamodule.num_classes)
    task = hydra.utils.instantiate(cfg.task, backbone=backbone, head=head,
                                   optimizer=hydra.utils.instantiate(cfg.optimizer),
                                   scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                                   num_classes=datamodule.num_classes)
    return datamodule, task


def resolve_checkpoint(ckpt_path: Optional[str]) -> Optional[str]:
    """Check a user-given checkpoint path early, naming the file when it is missing."""
    if ckpt_path is None or ckpt_path in ("last", "best"):
        return ckpt_path
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
    return str(path)


@rank_zero_only
def record_run(cfg: DictConfig, output_dir: Path) -> None:
    """Write the fully resolved config beside the run's outputs and print it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("print_config"):
        from rich import print as rich_print
        from rich.syntax import Syntax

        rich_print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark"))
    log.info("run directory: %s", output_dir)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and/or test as ``cfg.mode`` says; return the final callback metrics."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"))
    if cfg.mode == "eval" and ckpt_path is None:
        raise ValueError("mode=eval needs ckpt_path=<path to a .ckpt written by run.py>")
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    record_run(cfg, output_dir)

    datamodule, task = build_task(cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")),
                                      logger=instantiate_group(cfg.get("logger")) or False)
    if cfg.mode == "eval":
        trainer.test(task, datamodule=datamodule, ckpt_path=ckpt_path)
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(task, datamodule=datamodule, ckpt_path=best or None)
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
