"""run.py end to end, as a user runs it: fast_dev_run, resume, eval, and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli


def quick_args(fashion_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.data_dir={fashion_dir}", "data.num_workers=0", "data.batch_size=16",
            "backbone=test_vmamba", "print_config=false", f"hydra.run.dir={run_dir}", *extra]


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_fast_dev_run_of_default_experiment(fashion_dir, tmp_path):
    result = run_cli([f"data.data_dir={fashion_dir}", "data.num_workers=0", "trainer.fast_dev_run=true",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout + result.stderr
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_larger_backbone_fast_dev_run(fashion_dir, tmp_path):
    result = run_cli([f"data.data_dir={fashion_dir}", "data.num_workers=0", "data.batch_size=4",
                      "backbone=vmamba_small_s2l15", "trainer.fast_dev_run=true", "print_config=false",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_run_writes_artefacts_then_resumes_at_the_right_step_and_evaluates(fashion_dir, tmp_path):
    first = tmp_path / "first"
    result = run_cli(quick_args(fashion_dir, first, "debug=limit", "trainer.max_epochs=1"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for artefact in ("config.yaml", "metrics.csv", "curves.png", "checkpoints/last.ckpt"):
        assert (first / artefact).is_file(), artefact
    assert len(list((first / "checkpoints").glob("epoch_*.ckpt"))) == 1
    last = load_checkpoint(first / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (0, 4)  # saved at the end of epoch 0

    second = tmp_path / "second"
    result = run_cli(quick_args(fashion_dir, second, "debug=limit", "trainer.max_epochs=2",
                                f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_checkpoint(second / "checkpoints" / "last.ckpt")
    assert (resumed["epoch"], resumed["global_step"]) == (1, 8)

    result = run_cli(quick_args(fashion_dir, tmp_path / "eval", "debug=limit", "mode=eval",
                                f"ckpt_path={second / 'checkpoints' / 'last.ckpt'}"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"test/acc\S*\s", result.stdout)


def test_unknown_backbone_lists_the_valid_ones(tmp_path):
    result = run_cli(["backbone=nope"], cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'backbone/nope'" in result.stderr
    assert "vmamba_tiny_s1l8" in result.stderr


def test_unknown_backbone_name_inside_config_lists_the_valid_ones(fashion_dir, tmp_path):
    result = run_cli(quick_args(fashion_dir, tmp_path / "run", "backbone.name=vmamba_huge"), cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown backbone 'vmamba_huge'" in result.stderr and "vmamba_tiny_s1l8" in result.stderr


def test_unknown_config_key_is_named(tmp_path):
    result = run_cli(["trainer.max_epoch=3"], cwd=tmp_path)
    assert result.returncode != 0
    assert "max_epoch" in result.stderr


def test_missing_checkpoint_is_named(fashion_dir, tmp_path):
    result = run_cli(quick_args(fashion_dir, tmp_path / "run", "mode=eval", "ckpt_path=nowhere/last.ckpt"),
                     cwd=tmp_path)
    assert result.returncode != 0
    assert "nowhere/last.ckpt" in result.stderr


def test_help_lists_the_config_groups(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    for group in ("backbone:", "data:", "trainer:", "experiment:", "debug:"):
        assert group in result.stdout


@pytest.mark.slow
def test_demo_learns_real_fashion_mnist(tmp_path):
    """One short epoch of the default experiment on the real Fashion-MNIST, where it is installed."""
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make demo installs it)")
    result = run_cli(["trainer.max_epochs=1", "trainer.limit_train_batches=120", "print_config=false",
                      f"paths.data_dir={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                     timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"test/acc = ([0-9.]+)", result.stdout + result.stderr).group(1))
    assert accuracy > 0.7
