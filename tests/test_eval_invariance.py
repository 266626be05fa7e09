"""Evaluation does not depend on the evaluation batch size or on the number of processes.

Each task is built from its real config on a fixture in the dataset's real format and scored by its real metric
code (top-1/top-5, mmseg's mIoU/aAcc/mAcc whole-image and sliding-window, DSC/HD95 per case, COCO box mAP, COCO
keypoint AP) with evaluation batches of 1, 3 and 8 in one process; the slow tests then evaluate the same weights
through ``run.py mode=eval`` on 2 CPU processes (DDP, gloo). Every set has an odd number of samples, so a padded
distributed sampler would score one sample twice and move the metrics; all metrics below are dataset-level
counts or per-sample values gathered in dataset order, so they must match exactly. The only tolerance is for
the mean loss, whose float32 sum runs in another order on two processes.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import hydra
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DistributedSampler

from datamodules.evaluation import ContiguousShardSampler, evaluation_loader, shard_bounds
from run import build_task
from tests.conftest import compose_config, run_cli
from tests.dense_fixtures import make_ade20k, make_coco
from tests.fixtures import make_fashion_mnist
from tests.medical_fixtures import make_synapse
from tests.pose_fixtures import make_coco_keypoints

EVAL_BATCHES = (1, 3, 8)
LOSS_RTOL = 1e-5
"""The mean loss over <= 32 samples summed in float32 in another order (two partial sums, then their sum)
differs by a few units of 1e-7 relative; 1e-5 leaves a wide margin and is far below any real change."""


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("size, world_size", [(5, 2), (7, 3), (8, 4), (3, 3)])
def test_shards_partition_the_dataset_in_order_without_repeats(size, world_size):
    shards = [list(ContiguousShardSampler(range(size), num_replicas=world_size, rank=rank))
              for rank in range(world_size)]
    assert [index for shard in shards for index in shard] == list(range(size))  # rank-order gather = dataset order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(ContiguousShardSampler(range(size), num_replicas=world_size, rank=r)) for r in range(world_size)] \
        == list(map(len, shards))
    assert shard_bounds(size, world_size - 1, world_size)[1] == size


def test_a_set_smaller_than_the_process_count_is_refused():
    with pytest.raises(ValueError, match="has 1 samples, fewer than the 2 processes"):
        ContiguousShardSampler(range(1), num_replicas=2, rank=0)


def test_lightning_keeps_the_sampler_and_one_process_reads_in_order():
    # Lightning substitutes its padded DistributedSampler only for samplers that are not DistributedSamplers.
    assert isinstance(ContiguousShardSampler(range(4), num_replicas=2, rank=1), DistributedSampler)
    loader = evaluation_loader(list(range(7)), batch_size=3)
    assert [batch.tolist() for batch in loader] == [[0, 1, 2], [3, 4, 5], [6]]


# ---------------------------------------------------------------- the tasks


@dataclass
class EvalCase:
    """One task on one fixture: config overrides, the override that sets the evaluation batch, and how many
    training steps move the model off a trivial score first."""

    make: Callable[[Path], list[str]]
    batch_key: str
    fit_steps: int = 0
    nontrivial: tuple[str, ...] = ()
    extra: list[str] = field(default_factory=list)


def classification_data(root: Path) -> list[str]:
    data = make_fashion_mnist(root / "fashion", n_test=29)
    return [f"data.data_dir={data}", "data.num_workers=0", "data.val_size=16", "backbone=test_vmamba"]


def segmentation_data(mixed_sizes: bool, inference: str) -> Callable[[Path], list[str]]:
    def make(root: Path) -> list[str]:
        data = make_ade20k(root / "ade", n_val=5, num_classes=4, mixed_sizes=mixed_sizes)
        return ["experiment=ade20k_upernet_vmamba_tiny_s1l8", f"data.root={data}", "backbone=test_vmamba",
                "data.num_workers=0", "head.channels=16", "head.aux_channels=8", "data.scale=[128,48]",
                "data.batch_size=2", "data.crop_size=[32,32]", "optimizer.lr=1e-3", "scheduler.warmup_steps=0",
                f"task.inference={inference}", "task.crop_size=32", "task.stride=20"]
    return make


def medical_data(root: Path) -> list[str]:
    data = make_synapse(root / "synapse", test_cases=3, depth=5)
    return ["experiment=synapse_msvmunet_vmamba_tiny", f"data.root={data}", "backbone=test_vmamba",
            "data.img_size=32", "data.batch_size=2", "data.num_workers=0"]


def detection_data(root: Path) -> list[str]:
    data = make_coco(root / "coco", n_val=5, mixed_sizes=True)
    return ["experiment=coco_maskrcnn_1x_vmamba_tiny_s1l8", f"data.root={data}", "backbone=test_vmamba",
            "data.num_workers=0", "head.min_size=64", "head.max_size=128", "head.fpn_channels=16"]


def pose_data(root: Path) -> list[str]:
    data = make_coco_keypoints(root / "coco", n_val=4)  # 7 person crops from the released-detections file
    return ["experiment=coco_pose_hrvmamba_tiny_256x192", "backbone=test_hrvmamba", f"data.root={data}",
            "data.input_size=[64,48]", "data.batch_size=4", "data.num_workers=0", "trainer.accumulate_grad_batches=1",
            "optimizer.lr=2e-3", "scheduler.warmup_steps=0"]


CASES = {
    "top1": EvalCase(classification_data, "data.batch_size", nontrivial=("test/acc",)),
    "miou_whole_mixed_sizes": EvalCase(segmentation_data(True, "whole"), "data.val_batch_size", fit_steps=40,
                                       nontrivial=("test/mIoU", "test/aAcc")),
    "miou_sliding_window": EvalCase(segmentation_data(False, "slide"), "data.val_batch_size", fit_steps=40,
                                    nontrivial=("test/mIoU", "test/aAcc")),
    "dsc_hd95": EvalCase(medical_data, "task.eval_batch_size", nontrivial=("test/DSC", "test/HD95")),
    "coco_map": EvalCase(detection_data, "data.val_batch_size", nontrivial=("test/bbox_mAP", "test/bbox_AR_100")),
    "keypoint_ap": EvalCase(pose_data, "data.val_batch_size", fit_steps=150, nontrivial=("test/AP", "test/AR")),
}


def quiet_trainer(root: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root), **kwargs)


@dataclass
class Evaluated:
    name: str
    overrides: list[str]
    batch_key: str
    metrics: dict[int, dict[str, float]]
    checkpoint: Path


@pytest.fixture(scope="module", params=sorted(CASES))
def evaluated(request, tmp_path_factory) -> Evaluated:
    """The case's model (briefly trained where an untrained one scores 0) tested with each evaluation batch,
    and saved for the multi-process run."""
    case, root = CASES[request.param], tmp_path_factory.mktemp(request.param)
    overrides = case.make(root)
    cfg = compose_config(overrides, root)
    torch.manual_seed(0)
    datamodule, task = build_task(cfg)
    if case.fit_steps:
        quiet_trainer(root, max_steps=case.fit_steps, limit_val_batches=0).fit(task, datamodule=datamodule)
    group, name = case.batch_key.split(".")
    metrics = {}
    for batch in EVAL_BATCHES:
        if group == "data":
            datamodule = hydra.utils.instantiate(cfg.data, **{name: batch})
        else:
            task.hparams[name] = batch
        trainer = quiet_trainer(root)
        trainer.test(task, datamodule=datamodule, verbose=False)
        metrics[batch] = {key: float(value) for key, value in trainer.callback_metrics.items()}
    for key in case.nontrivial:  # a score stuck at 0 (or 1) would not notice a repeated or missing sample
        assert 0 < metrics[1][key] and (key.endswith("HD95") or metrics[1][key] < 1), (key, metrics[1][key])
    checkpoint = root / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    return Evaluated(request.param, overrides, case.batch_key, metrics, checkpoint)


def test_metrics_do_not_depend_on_the_evaluation_batch(evaluated):
    reference = evaluated.metrics[1]
    assert len(reference) >= 3
    for batch in EVAL_BATCHES[1:]:
        assert evaluated.metrics[batch].keys() == reference.keys()
        for key, value in reference.items():
            if key.endswith("/loss"):
                assert evaluated.metrics[batch][key] == pytest.approx(value, rel=LOSS_RTOL), key
            else:
                assert evaluated.metrics[batch][key] == value, (key, batch)


def logged_test_metrics(run_dir: Path) -> dict[str, float]:
    """The last value of every ``test/`` column of the run's Lightning ``metrics.csv``."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: float(row[key]) for row in rows for key in row if key.startswith("test/") and row[key] != ""}


@pytest.mark.slow
def test_two_processes_score_what_one_does(evaluated, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*evaluated.overrides, "mode=eval", f"ckpt_path={evaluated.checkpoint}",
                      f"{evaluated.batch_key}=3", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "callbacks.rich_progress_bar=null", "print_config=false", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in result.stdout + result.stderr
    reference, distributed = evaluated.metrics[1], logged_test_metrics(run_dir)
    assert distributed.keys() == {key for key in reference if key.startswith("test/")}
    for key, value in distributed.items():
        if key.endswith("/loss"):
            assert value == pytest.approx(reference[key], rel=LOSS_RTOL), key
        else:
            assert value == reference[key], key
    if evaluated.name == "dsc_hd95":  # the per-case table names every case, in dataset order, from both processes
        rows = (run_dir / "medseg_test_cases.csv").read_text().splitlines()[1:]
        assert [row.split(",")[0] for row in rows] == ["case0001", "case0002", "case0003"]
