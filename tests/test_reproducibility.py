"""Exact resume after a pre-emption, determinism, and the non-finite guard, through run.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli


def tiny_run(fashion_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.data_dir={fashion_dir}", "data.num_workers=0", "data.batch_size=8", "data.augment=true",
            "backbone=test_vmamba",
            "print_config=false", "trainer.max_epochs=2", "trainer.limit_train_batches=6",
            "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1",
            "callbacks.rich_progress_bar=null", f"hydra.run.dir={run_dir}", *extra]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 12
    return checkpoint["state_dict"]


@pytest.mark.slow
def test_preempted_then_resumed_run_equals_uninterrupted(fashion_dir, tmp_path):
    straight = tmp_path / "straight"
    assert run_cli(tiny_run(fashion_dir, straight), cwd=tmp_path).returncode == 0

    preempted = tmp_path / "preempted"
    result = run_cli(tiny_run(fashion_dir, preempted, "+callbacks.sigterm._target_=tests.helpers.SigtermAtStep",
                              "+callbacks.sigterm.step=3"), cwd=tmp_path)
    assert result.returncode == 143, result.stderr[-2000:]
    assert f"resume with hydra.run.dir={preempted} ckpt_path={preempted / 'checkpoints' / 'last.ckpt'}" \
        in result.stdout + result.stderr
    saved = torch.load(preempted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (0, 3)

    resumed = tmp_path / "resumed"
    result = run_cli(tiny_run(fashion_dir, resumed, f"ckpt_path={preempted / 'checkpoints' / 'last.ckpt'}"),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    expected, got = final_weights(straight), final_weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_deterministic_runs_are_bit_identical(fashion_dir, tmp_path):
    metrics = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        result = run_cli(tiny_run(fashion_dir, run_dir, "trainer.deterministic=true", "trainer.max_epochs=1",
                                  "trainer.limit_train_batches=3"), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        metrics.append([line.split(",")[1:] for line in (run_dir / "metrics.csv").read_text().splitlines()])
    assert metrics[0] == metrics[1] and len(metrics[0]) > 3


@pytest.mark.slow
def test_nonfinite_guard_names_the_module_and_saves_the_batch(fashion_dir, tmp_path):
    run_dir = tmp_path / "nan"
    result = run_cli(tiny_run(fashion_dir, run_dir, "optimizer.lr=1e30"), cwd=tmp_path)
    assert result.returncode != 0
    assert "non-finite values first produced by" in result.stderr
    assert len(list(run_dir.glob("nonfinite_train_step*_batch*.pt"))) == 1


@pytest.mark.parametrize("failure", ["serialise", "rename"])
def test_checkpoint_write_is_all_or_nothing(tmp_path, monkeypatch, failure):
    import os

    from tasks.checkpoint_io import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed while writing")

    new = {"step": 2, "weights": torch.zeros(1000)}
    if failure == "serialise":
        new["bad"] = Unpicklable()
    else:
        monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(RuntimeError("killed before rename")))
    with pytest.raises(RuntimeError, match="killed"):
        io.save_checkpoint(new, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
