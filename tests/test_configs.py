"""Every config file composes with Hydra's compose API and its parts instantiate."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch

import backbones
from run import build_task, build_trainer
from tasks.config_checks import check_config
from tests.conftest import CONF_DIR, compose_config
from tests.dense_fixtures import make_ade20k, make_coco, make_nuclei, make_trees
from tests.fixtures import make_fashion_mnist, make_imagefolder
from tests.medical_fixtures import make_acdc, make_isic, make_synapse
from tests.pose_fixtures import make_coco_keypoints

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
BACKBONE_CONFIGS = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))


# The on-disk fixture each datamodule reads, and the config key that points at it.
DATA_FIXTURES = {
    "FashionMNISTDataModule": ("data_dir", make_fashion_mnist), "ImageFolderDataModule": ("root", make_imagefolder),
    "ADE20KDataModule": ("root", make_ade20k), "COCODataModule": ("root", make_coco),
    "NucleiDataModule": ("data_dir", make_nuclei), "TreeCrownsDataModule": ("data_dir", make_trees),
    "SynapseDataModule": ("root", make_synapse), "ACDCDataModule": ("root", make_acdc),
    "IsicDataModule": ("root", make_isic), "BrainTissueDataModule": (None, None),
    "COCOKeypointsDataModule": ("root", make_coco_keypoints),
}


def data_overrides(cfg, tmp_path: Path) -> list[str]:
    """Point the datamodule at a tiny fixture in its real format (the brain demo reads the data nilearn ships)."""
    name = cfg.data._target_.rsplit(".", 1)[-1]
    key, make = DATA_FIXTURES[name]
    return [f"data.{key}={make(tmp_path / 'data')}"] if make else []


def teacher_overrides(cfg) -> list[str]:
    """Recipes with a distillation teacher read its weights from disk; build it untrained here."""
    return ["task.teacher.pretrained=false"] if cfg.task.get("teacher") else []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path):
    """Every experiment passes run.py's config checks and builds its task, datamodule and trainer."""
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    overrides = [f"experiment={experiment}", *data_overrides(cfg, tmp_path), *teacher_overrides(cfg),
                 "data.num_workers=0", "trainer.accelerator=cpu", "trainer.devices=1"]
    cfg = compose_config(overrides, tmp_path)
    check_config(cfg, overrides)  # run.py's checks before anything is built, e.g. options given as object configs
    datamodule, task = build_task(cfg)
    assert task.hparams.num_classes == datamodule.num_classes
    trainer = build_trainer(cfg)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_logger_none_drops_only_the_learning_rate_monitor(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    with_logger = build_trainer(compose_config([], tmp_path))
    assert any(isinstance(c, LearningRateMonitor) for c in with_logger.callbacks)
    trainer = build_trainer(compose_config(["logger=none"], tmp_path))
    assert trainer.logger is None
    assert not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)
    assert any(isinstance(c, ModelCheckpoint) for c in trainer.callbacks)


def test_every_backbone_has_a_config_and_every_config_a_backbone():
    assert BACKBONE_CONFIGS == backbones.list_backbones()


@pytest.mark.parametrize("name", BACKBONE_CONFIGS)
def test_backbone_config_names_its_model(name, tmp_path):
    cfg = compose_config([f"backbone={name}"], tmp_path)
    assert cfg.backbone.name == name
    assert cfg.backbone._target_ == "backbones.create_backbone"


@pytest.mark.parametrize("debug", sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml")))
def test_debug_configs_compose(debug, tmp_path):
    cfg = compose_config([f"debug={debug}"], tmp_path)
    assert cfg.trainer.max_epochs >= 1


def test_recipes_scale_the_learning_rate_with_the_total_batch(tmp_path):
    cfg = compose_config(["experiment=imagenet_vmamba_tiny_s1l8"], tmp_path)
    assert cfg.trainer.devices == 8 and cfg.data.batch_size == 128
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    cfg = compose_config(["experiment=imagenet_msvmamba_v3_base", "trainer.devices=4", "trainer.num_nodes=2",
                          "trainer.accumulate_grad_batches=2"], tmp_path)
    assert cfg.optimizer.lr == pytest.approx(3e-4 * 128 * 16 / 512)
    assert compose_config(["experiment=imagenet_vanilla_vmamba_tiny"], tmp_path).callbacks.ema is None


def test_fsdp_preset_wraps_every_backbone_block(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from backbones.layers import VSSBlock

    cfg = compose_config(["trainer=fsdp", "trainer.strategy.activation_checkpointing=true"], tmp_path)
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert VSSBlock in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert VSSBlock in backbones.block_classes()


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONE_CONFIGS)
def test_every_backbone_trains_on_the_default_data(name, tmp_path, fashion_dir):
    """``run.py backbone=<name> trainer.fast_dev_run=true``, in process: one training and one validation batch."""
    cfg = compose_config([f"backbone={name}", f"data.data_dir={fashion_dir}", "data.num_workers=0", "data.batch_size=2",
                          "trainer.fast_dev_run=true", "logger=none", "callbacks=none"], tmp_path)
    datamodule, task = build_task(cfg)
    before = [p.detach().clone() for p in task.backbone.parameters()]
    build_trainer(cfg).fit(task, datamodule=datamodule)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, task.backbone.parameters()))
    assert changed > len(before) // 2, f"{name}: only {changed} of {len(before)} backbone tensors were updated"
