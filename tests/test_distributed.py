"""Distributed training and multiruns through run.py, as users launch them (CPU, gloo)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def data_args(fashion_dir) -> list[str]:
    return [f"data.data_dir={fashion_dir}", "data.num_workers=0", "data.batch_size=8", "backbone=test_vmamba",
            "print_config=false"]


def test_ddp_fast_dev_run_on_two_cpu_processes(fashion_dir, tmp_path):
    result = run_cli([*data_args(fashion_dir), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_both_ranks_train_and_only_rank_zero_writes(fashion_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*data_args(fashion_dir), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "debug=limit", "trainer.max_epochs=1", "callbacks.rich_progress_bar=null",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "GLOBAL_RANK: 0" in output and "GLOBAL_RANK: 1" in output
    checkpoints = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert checkpoints == ["epoch_000.ckpt", "last.ckpt"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    assert (run_dir / "metrics.csv").read_text().count("\n") > 4


def test_multirun_over_backbones(fashion_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *data_args(fashion_dir)[:-2], "print_config=false", "backbone=test_vmamba,vmamba_femto",
                      "debug=fdr", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert {(sweep / d / "config.yaml").read_text().count("name: test_vmamba") for d in ("0", "1")} == {0, 1}
