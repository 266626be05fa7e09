"""Gradient accumulation equals the larger batch, and the learning rate follows the effective global batch.

Runs go through run.py's ``build_task``/``build_trainer`` on a real-format Fashion-MNIST fixture (80 training
images, so every batch size divides the epoch) with the BatchNorm-free test VMamba, drop path 0 and no
augmentation: batch 8, batch 4 x 2 accumulated and batch 2 x 4 accumulated see the same images per optimiser
step, so they must reach the same weights. Every run has layer-wise lr decay, a per-step warm-up + cosine
schedule and an EMA of the weights.

Tolerances: the accumulated gradient is the sum of k float32 micro-batch means divided by k, the large batch
one float32 mean, so gradient entries differ by rounding (~1e-7 relative). After 10 steps the weights differ by
at most 1.2e-7 with SGD (one float32 step at weights near 1; 1.5e-8 clipped) and 3.5e-7 with AdamW, which
divides by sqrt(v) and so amplifies rounding in near-zero gradients (measured on this project's machine). The
bounds, 1e-5 for SGD and 2e-5 for AdamW, leave room for other CPUs' kernels and are still far below the weights'
total change over the run (0.38 and 0.018) and what a real error does (0.37 and more, see
``test_the_bound_is_far_below_a_real_difference``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import open_dict

from run import build_task, build_trainer, run
from tasks.scaling import effective_batch_report, global_batch, linear_lr_arguments
from tests.conftest import compose_config
from tests.fixtures import make_fashion_mnist

STEPS = 10  # 80 training images / 8 per optimiser step
SGD = ["optimizer._target_=torch.optim.SGD", "~optimizer.betas", "optimizer.lr=0.05", "+optimizer.momentum=0.9"]
OPTIMISERS = {
    # Recipe optimiser: AdamW with clipping (Adam is invariant to the gradient's scale, so it cannot see the
    # loss normalisation; the SGD runs below can).
    "adamw_clipped": (["trainer.gradient_clip_val=0.1"], 2e-5),
    # Plain SGD: a gradient k times too large (a loss not divided by k) moves the weights k times as far.
    "sgd": (SGD, 1e-5),
    # SGD with the clip active on every step (gradient norms 2.9-4.7): the clip must act on the accumulated
    # gradient, not on each micro-batch's.
    "sgd_clipped": ([*SGD, "trainer.gradient_clip_val=0.1"], 1e-5),
}


@pytest.fixture(scope="module")
def fashion_80(tmp_path_factory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fashion"), n_train=96)


class Recorder(pl.Callback):
    """Learning rates and gradient norms at each optimiser step, and the raw weights before the EMA swap."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.grad_norms: list[float] = []
        self.raw: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer) -> None:
        self.lrs.append([group["lr"] for group in optimizer.param_groups])
        grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.stack(grads).norm()))

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.raw = {name: value.clone() for name, value in module.state_dict().items()}


def overrides(data: Path, batch: int, accumulate: int, *extra: str) -> list[str]:
    return [f"data.data_dir={data}", "data.num_workers=0", "data.val_size=16", f"data.batch_size={batch}",
            f"trainer.accumulate_grad_batches={accumulate}", "backbone=test_vmamba", "backbone.drop_path_rate=0",
            "task.layer_decay=0.75", "scheduler.warmup_steps=3", "callbacks=none", "logger=none",
            "+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging", "+callbacks.ema.decay=0.8",
            "trainer.max_epochs=1", "trainer.limit_val_batches=0", "trainer.accelerator=cpu", "test=false",
            "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", *extra]


def train(data: Path, root: Path, batch: int, accumulate: int, *extra: str) -> tuple[pl.Trainer, Recorder, dict]:
    cfg = compose_config(overrides(data, batch, accumulate, *extra), root / f"b{batch}k{accumulate}")
    pl.seed_everything(0)
    datamodule, task = build_task(cfg)
    trainer, recorder = build_trainer(cfg), Recorder()
    trainer.callbacks.append(recorder)
    trainer.fit(task, datamodule=datamodule)
    return trainer, recorder, {name: value.clone() for name, value in task.state_dict().items()}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a)


@pytest.mark.parametrize("optimiser", sorted(OPTIMISERS))
def test_accumulated_batches_update_like_one_large_batch(optimiser, fashion_80, tmp_path):
    extra, bound = OPTIMISERS[optimiser]
    runs = {(batch, k): train(fashion_80, tmp_path, batch, k, *extra) for batch, k in ((8, 1), (4, 2), (2, 4))}
    trainer, reference, ema = runs[(8, 1)]
    assert len(reference.lrs[0]) > 2  # layer-decay groups, each with its own rate
    assert largest_difference(reference.raw, ema) > 100 * bound  # the EMA is not the raw weights
    assert largest_difference(reference.raw, train_start_weights(fashion_80, tmp_path, *extra)) > 100 * bound
    if "trainer.gradient_clip_val=0.1" in extra:
        assert min(reference.grad_norms) > 0.1  # the clip acts on every step
    for (batch, k), (other_trainer, recorder, other_ema) in runs.items():
        assert other_trainer.global_step == trainer.global_step == STEPS
        assert recorder.lrs == reference.lrs, (batch, k)  # one scheduler step per optimiser step
        assert largest_difference(recorder.raw, reference.raw) < bound, (batch, k)
        assert largest_difference(other_ema, ema) < bound, (batch, k)  # one EMA update per optimiser step


def train_start_weights(data: Path, root: Path, *extra: str) -> dict[str, torch.Tensor]:
    """The weights the runs start from (same seed), to measure how far training moves them."""
    cfg = compose_config(overrides(data, 8, 1, *extra), root / "start")
    pl.seed_everything(0)
    _, task = build_task(cfg)
    return task.state_dict()


def test_the_bound_is_far_below_a_real_difference(fashion_80, tmp_path):
    """Batch 4 without accumulation (twice the steps), and gradients twice too large (a loss not divided by
    2 accumulated batches; for SGD that is the step of twice the learning rate) both land far outside the
    SGD bound."""
    _, reference, _ = train(fashion_80, tmp_path, 8, 1, *SGD)
    _, small, _ = train(fashion_80, tmp_path, 4, 1, *SGD)
    _, doubled, _ = train(fashion_80, tmp_path, 8, 1, *SGD[:2], "optimizer.lr=0.1", *SGD[3:])
    assert largest_difference(small.raw, reference.raw) > 1000 * OPTIMISERS["sgd"][1]
    assert largest_difference(doubled.raw, reference.raw) > 1000 * OPTIMISERS["sgd"][1]


def test_batchnorm_makes_accumulation_differ(fashion_80, tmp_path):
    """Documented in docs/reproducibility.md: BatchNorm normalises each micro-batch with its own statistics and
    updates its running statistics once per micro-batch, so accumulation is not the large batch."""
    extra = [*SGD, "backbone=test_efficientvmamba", "backbone.drop_path_rate=0"]
    _, large, _ = train(fashion_80, tmp_path, 8, 1, *extra)
    _, accumulated, _ = train(fashion_80, tmp_path, 4, 2, *extra)
    assert any("running_mean" in name for name in large.raw)
    assert largest_difference(accumulated.raw, large.raw) > 1000 * OPTIMISERS["sgd"][1]


# ---------------------------------------------------------------- the effective batch and the lr


LINEAR = "optimizer.lr='${linear_lr:5e-4,${data.batch_size},${trainer.devices},${trainer.num_nodes}," \
         "${trainer.accumulate_grad_batches}}'"


def test_linear_lr_counts_devices_nodes_and_accumulation(tmp_path):
    cfg = compose_config([LINEAR, "data.batch_size=4", "trainer.devices=2", "trainer.num_nodes=3",
                          "trainer.accumulate_grad_batches=5"], tmp_path)
    scaling = linear_lr_arguments(cfg)
    assert (scaling.base_lr, scaling.global_batch, scaling.reference_batch) == (5e-4, 4 * 2 * 3 * 5, 512)
    assert cfg.optimizer.lr == pytest.approx(5e-4 * 120 / 512) == pytest.approx(scaling.lr)
    assert global_batch(4, "0,1", 3, 5) == global_batch(4, [0, 1], 3, 5) == 120
    assert linear_lr_arguments(compose_config([], tmp_path)) is None  # a plain number is not scaled


def test_the_report_names_the_batch_and_warns_when_the_trainer_runs_another(tmp_path, caplog):
    cfg = compose_config([LINEAR, "data.batch_size=4", "trainer.devices=2", "trainer.accumulate_grad_batches=3"],
                         tmp_path)
    line = effective_batch_report(cfg, 4, 2, 1, 3)
    assert line.startswith("effective global batch 24 = 4 per device x 2 device(s) x 1 node(s) x 3 accumulated")
    assert "lr 2.34375e-05 = 0.0005 x 24 / 512" in line and not caplog.records
    with caplog.at_level(logging.WARNING, logger="mambalab"):
        line = effective_batch_report(cfg, 4, 1, 1, 3)  # e.g. devices=auto counted GPUs the trainer does not use
    assert "for a batch of 24, not 12" in line
    assert "linear_lr scaled the learning rate for a global batch of 24, but the trainer runs 12" in caplog.text


def test_the_run_log_prints_the_effective_batch(fashion_80, tmp_path, caplog):
    cfg = compose_config([LINEAR, f"data.data_dir={fashion_80}", "data.num_workers=0", "data.batch_size=4",
                          "trainer.accumulate_grad_batches=2", "backbone=test_vmamba", "debug=fdr",
                          "print_config=false"], tmp_path)
    with open_dict(cfg):
        del cfg["hydra"]  # as in @hydra.main's job config; paths still resolve through the ${hydra:} resolver
    with caplog.at_level(logging.INFO, logger="mambalab"):
        run(cfg)
    assert "effective global batch 8 = 4 per device x 1 device(s) x 1 node(s) x 2 accumulated batch(es); " \
           "lr 7.8125e-06 = 0.0005 x 8 / 512" in caplog.text
