"""Hydra sweeps and launchers (the `sweep` extra): Optuna search and the submitit local launcher."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def quick(fashion_dir) -> list[str]:
    return [f"data.data_dir={fashion_dir}", "data.num_workers=0", "data.batch_size=8", "backbone=test_vmamba",
            "print_config=false", "callbacks.rich_progress_bar=null"]


def test_optuna_search_returns_the_monitored_metric(fashion_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    result = run_cli([*quick(fashion_dir), "hparams_search=fashion_mnist_optuna", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.sampler.n_startup_trials=2", "debug=limit", "trainer.max_epochs=1",
                      f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.0 <= results["best_value"] <= 1.0
    assert set(results["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "backbone.drop_path_rate"}


def test_submitit_local_launcher_runs_a_job(fashion_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "submitit"
    result = run_cli(["-m", *quick(fashion_dir)[:-1], "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                      "debug=fdr", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep / "0" / "config.yaml").is_file()
    assert list((sweep / ".submitit").rglob("*_result.pkl"))
