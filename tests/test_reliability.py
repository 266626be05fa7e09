"""Faults a user meets, performed for real: runs started together, pre-emption and resume into the same
folder, NaN in each phase, bad config values and keys, broken or foreign checkpoints, a mistyped data folder.
Each test asserts the message and that no file of the user or of an earlier run was lost or left stale.
(docs/reliability.md maps every handled failure to its test.)"""

from __future__ import annotations

import csv
import logging
import re
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch

from tasks.checkpoint_io import resolve_checkpoint
from tasks.config_checks import ConfigError, check_config
from tasks.run_dir import RunFolder
from tests.conftest import compose_config, run_cli, start_cli
from tests.fixtures import make_fashion_mnist

SIGTERM_AT_STEP_3 = ("+callbacks.sigterm._target_=tests.helpers.SigtermAtStep", "+callbacks.sigterm.step=3")


def tiny(fashion_dir: Path, run_dir: Path | None, *extra: str) -> list[str]:
    """A run of a few batches that still validates, checkpoints and logs metrics."""
    own_callbacks = any(arg.startswith(("callbacks=", "debug=")) for arg in extra)
    return [f"data.data_dir={fashion_dir}", "data.num_workers=0", "data.batch_size=8", "backbone=test_vmamba",
            "print_config=false", *([] if own_callbacks else ["callbacks.rich_progress_bar=null"]),
            "trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1",
            *([f"hydra.run.dir={run_dir}"] if run_dir else []), *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metric_rows(metrics_csv: Path, column: str) -> list[tuple[int, float]]:
    with open(metrics_csv, newline="") as handle:
        return [(int(row["step"]), float(row[column])) for row in csv.DictReader(handle) if row.get(column)]


def output(result: subprocess.CompletedProcess) -> str:
    """What the user sees: the log (stdout) and the errors (stderr)."""
    return result.stdout + result.stderr


def fake_checkpoint(path: Path, backbone: str, experiment: str | None = None) -> Path:
    """A small file in the format run.py writes (state dict plus the identity record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "mambalab": {"backbone": backbone,
                                                                     "experiment": experiment}}, path)
    return path


# ---- one folder per run (issue item 2) ----------------------------------------------------------------------

def test_runs_started_together_get_folders_of_their_own(fashion_dir, tmp_path):
    runs = tmp_path / "logs" / "train" / "runs"
    # Every timestamp name of the next two minutes is taken by a folder of the user's: a run must never use one.
    now = datetime.now()
    taken = [runs / (now + timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S") for s in range(120)]
    for folder in taken:
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("mine")
    processes = [start_cli(tiny(fashion_dir, None, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                                "trainer.limit_test_batches=1"), cwd=tmp_path) for _ in range(3)]
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], outputs[0][-3000:]

    made = sorted(set(runs.iterdir()) - set(taken))
    assert len(made) == 3 and all(re.search(r"_\d+$", folder.name) for folder in made)
    for folder in made:
        assert load(folder / "checkpoints" / "last.ckpt")["global_step"] == 2
        assert [step for step, _ in metric_rows(folder / "metrics.csv", "train/loss_step")] == [0, 1]
        assert sum(f"run directory: {folder}\n" in output for output in outputs) == 1
    assert all(f"reading {fashion_dir / 'train-images-idx3-ubyte.gz'}" in output for output in outputs)
    assert all([p.name for p in folder.iterdir()] == ["notes.txt"] for folder in taken)


def test_multirun_sweep_folders_are_claimed_too(tmp_path):
    folders = []
    for _ in range(2):
        cfg = compose_config([], tmp_path)
        RunFolder().on_multirun_start(cfg)
        folders.append(Path(cfg.hydra.sweep.dir))
        assert f"hydra.sweep.dir={folders[-1]}" in cfg.hydra.overrides.hydra  # every job composes with it
    assert folders[0] != folders[1] and all(folder.is_dir() for folder in folders)


def test_a_non_empty_sweep_folder_is_refused(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "metrics.csv").write_text("step\n0\n")
    cfg = compose_config([f"hydra.sweep.dir={sweep}"], tmp_path)
    with pytest.raises(SystemExit, match=f"hydra.sweep.dir={sweep} is not empty"):
        RunFolder().on_multirun_start(cfg)
    assert (sweep / "0" / "metrics.csv").read_text() == "step\n0\n"


def test_an_explicit_folder_holding_a_run_is_reused_only_to_resume_it(fashion_dir, tmp_path):
    old = tmp_path / "old"
    (old / ".hydra").mkdir(parents=True)
    (old / "config.yaml").write_text("seed: 1\n")
    (old / "metrics.csv").write_text("step,train/loss_step\n0,2.3\n")
    fake_checkpoint(old / "checkpoints" / "last.ckpt", "test_vmamba")
    elsewhere = fake_checkpoint(tmp_path / "elsewhere.ckpt", "test_vmamba")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    before = snapshot(tmp_path)

    new_run = run_cli(tiny(fashion_dir, old), cwd=tmp_path)
    assert new_run.returncode != 0
    assert f"hydra.run.dir={old} already holds a run" in output(new_run)
    assert f"ckpt_path={old / 'checkpoints' / 'last.ckpt'}" in output(new_run)
    foreign = run_cli(tiny(fashion_dir, old, f"ckpt_path={elsewhere}"), cwd=tmp_path)
    assert foreign.returncode != 0 and f"not with ckpt_path={elsewhere}" in output(foreign)
    not_a_run = run_cli(tiny(fashion_dir, notes), cwd=tmp_path)
    assert not_a_run.returncode != 0 and f"hydra.run.dir={notes} is not empty and holds no run" in output(not_a_run)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_ddp_ranks_share_the_folder_rank_zero_claimed(fashion_dir, tmp_path, launcher):
    """Two DDP jobs at once: each gets one folder, and its rank 1 logs into that folder, not a folder of its own."""
    args = tiny(fashion_dir, None, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    runs = tmp_path / "logs" / "train" / "runs"
    prefix = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2") if launcher == "torchrun" else ()
    # standalone torchrun picks a free port per job, as Lightning's launcher does
    jobs = [start_cli(args, cwd=tmp_path, launcher=prefix) for _ in range(2)]
    outputs = [job.communicate(timeout=900)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs[0][-3000:]
    folders = sorted(p for p in runs.iterdir() if p.name != ".rank0")
    rank1_log = "train_ddp_process_1.log" if launcher == "lightning" else "run_rank1.log"
    assert len(folders) == 2
    for folder in folders:
        assert (folder / rank1_log).is_file() and (folder / "run.log").is_file()
        assert load(folder / "checkpoints" / "last.ckpt")["global_step"] == 2  # 2 batches on each rank


# ---- resume into the same folder (issue item 3) -------------------------------------------------------------

def test_resume_into_the_same_folder_keeps_history_and_makes_last_the_newest(fashion_dir, tmp_path):
    run = tmp_path / "run"
    stopped = run_cli(tiny(fashion_dir, run, "trainer.max_epochs=2", *SIGTERM_AT_STEP_3), cwd=tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert f"resume with hydra.run.dir={run} ckpt_path={last}" in output(stopped)
    assert load(last)["global_step"] == 3
    first_attempt = {name: data for name, data in snapshot(run).items()
                     if name.startswith(".hydra") or name in ("config.yaml", "version.json")}
    history = metric_rows(run / "metrics.csv", "train/loss_step")
    assert [step for step, _ in history] == [0, 1, 2]

    resumed = run_cli(tiny(fashion_dir, run, "trainer.max_epochs=2", f"ckpt_path={last}"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("last")) == ["last.ckpt"]
    assert (load(last)["epoch"], load(last)["global_step"]) == (1, 12)
    after = metric_rows(run / "metrics.csv", "train/loss_step")
    assert after[:3] == history and [step for step, _ in after] == list(range(12))
    assert len(metric_rows(run / "metrics.csv", "val/acc")) == 2
    assert all(snapshot(run)[name] == data for name, data in first_attempt.items())  # earlier record kept
    assert (run / "resume_1" / "config.yaml").is_file() and (run / "resume_1" / ".hydra" / "overrides.yaml").is_file()
    assert (run / "curves.png").is_file()

    # ckpt_path=last finds this run's newest state and says which run it picked
    evaluated = run_cli(tiny(fashion_dir, tmp_path / "eval", "mode=eval", "ckpt_path=last",
                             f"paths.log_dir={tmp_path}"), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"ckpt_path=last: resuming {last}, the newest last.ckpt of backbone=test_vmamba" in output(evaluated)


def test_without_checkpoint_callbacks_a_stop_promises_no_checkpoint(fashion_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli(tiny(fashion_dir, run, "callbacks=none", *SIGTERM_AT_STEP_3), cwd=tmp_path)
    assert result.returncode == 143, result.stderr[-3000:]
    assert "no checkpoint was written" in output(result) and "resume with" not in output(result)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_last_checkpoint_is_the_newest_state_when_the_metric_stops_improving(fashion_dir, tmp_path):
    """With lr=0 val/acc_best never improves after epoch 0; Lightning alone would leave last.ckpt at epoch 0."""
    run = tmp_path / "run"
    result = run_cli(tiny(fashion_dir, run, "trainer.max_epochs=2", "trainer.limit_train_batches=2",
                          "optimizer.lr=0.0", "test=false"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    last = load(run / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 4)


# ---- the NaN/Inf guard (issue item 4) -----------------------------------------------------------------------

@pytest.mark.parametrize(("phase", "step"), [("train", 0), ("val", 1), ("test", 1)])
def test_nonfinite_guard_names_the_phase_step_and_batch_and_saves_that_batch(fashion_dir, tmp_path, phase, step):
    """Under debug=fdr (one batch per phase) a NaN in one phase's batch is reported as that phase's."""
    run = tmp_path / "run"
    result = run_cli(tiny(fashion_dir, run, "debug=fdr", "+callbacks.nan._target_=tests.helpers.NanInBatch",
                          f"+callbacks.nan.phase={phase}"), cwd=tmp_path)
    assert result.returncode != 0
    dump = run / f"nonfinite_{phase}_step{step}_batch0.pt"
    assert re.search(rf"non-finite values first produced by backbone\.stem\S* \(\w+\) in {phase} batch 0 "
                     rf"\(global step {step}, epoch \d\); batch saved to {re.escape(str(dump))}", output(result))
    saved = load(dump)
    assert (saved["phase"], saved["global_step"], saved["batch_idx"]) == (phase, step, 0)
    assert torch.isnan(saved["batch"][0]).all()  # the batch that produced it, not the next clean one


def test_nonfinite_dump_never_replaces_an_earlier_one(tmp_path):
    from tasks.run_dir import open_new

    earlier = tmp_path / "nonfinite_val_step1_batch0.pt"
    earlier.write_bytes(b"earlier")
    path, handle = open_new(earlier)
    handle.close()
    assert path.name == "nonfinite_val_step1_batch0_1.pt" and earlier.read_bytes() == b"earlier"


# ---- config values and keys (issue item 6) ------------------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ("data.batch_size=0", "data.batch_size=0 (int): must be a positive integer"),
    ("data.batch_size=2.5", "data.batch_size=2.5 (float): must be a positive integer"),
    ("data.batch_size=eight", "data.batch_size='eight' (str): must be a positive integer"),
    ("optimizer.lr=fast", "optimizer.lr='fast' (str): must be a finite number"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs=2.5 (float): must be an integer >= -1"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1 with trainer.max_steps=-1 gives the run no length"),
    ("data.image_size=0", "data.image_size=0 (int): must be a positive integer"),
    ("+head.num_classes=5", "head.num_classes: run.py sets the head's num_classes itself"),
    ("+head.dropout=0.1", "head.dropout: heads.LinearClassifier takes no argument 'dropout'"),
    ("+backbone.drop_pth_rate=0.1", "backbone.drop_pth_rate: backbones.create_backbone takes no argument"),
    ("+trainer.max_epoch=3", "trainer.max_epoch: lightning.pytorch.Trainer takes no argument 'max_epoch'"),
    ("+callbacks.model_checkpoint.save_top=2", "callbacks.model_checkpoint.save_top: tasks.callbacks.RunCheckpoint"),
])
def test_bad_config_values_and_keys_are_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose_config([override], tmp_path))


def test_keys_a_backbone_accepts_pass(tmp_path):
    check_config(compose_config(["+backbone.drop_rate=0.1", "backbone=vmamba_femto", "trainer.max_epochs=-1",
                                 "trainer.max_steps=100"], tmp_path))


def test_filled_by_run_lists_every_argument_run_py_passes(fashion_dir, tmp_path, monkeypatch):
    """The table the key check uses must follow build_task/build_trainer, or a key run.py replaces slips through."""
    import hydra

    import run
    from tasks.config_checks import filled_by_run

    passed: dict[str, set[str]] = {}
    instantiate = hydra.utils.instantiate

    def recording(config, *args, **kwargs):
        key = config._key() if hasattr(config, "_key") else None
        passed.setdefault(key, set()).update(kwargs)
        return instantiate(config, *args, **kwargs)

    monkeypatch.setattr(hydra.utils, "instantiate", recording)
    cfg = compose_config([f"data.data_dir={fashion_dir}", "data.num_workers=0"], tmp_path)
    run.build_task(cfg)
    run.build_trainer(cfg)
    assert {group for group in passed if passed[group]} == {"backbone", "head", "task", "trainer"}
    assert all(passed[group] <= set(filled_by_run(group, cfg[group]._target_)) for group in passed if passed[group])


def test_bad_config_value_stops_before_any_folder_is_made(fashion_dir, tmp_path):
    result = run_cli(tiny(fashion_dir, None, "data.batch_size=0"), cwd=tmp_path)
    assert result.returncode != 0 and "data.batch_size=0 (int): must be a positive integer" in output(result)
    assert not (tmp_path / "logs").exists()


# ---- checkpoints (issue item 7) -----------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_incomplete_checkpoint_is_named(fashion_dir, tmp_path, damage):
    path = fake_checkpoint(tmp_path / "copy.ckpt", "test_vmamba")
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    result = run_cli(tiny(fashion_dir, tmp_path / "run", "mode=eval", f"ckpt_path={path}"), cwd=tmp_path)
    assert result.returncode != 0
    assert f"{path}: " in output(result) and "not a complete checkpoint" in output(result)
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_backbone_names_both(fashion_dir, tmp_path):
    path = fake_checkpoint(tmp_path / "femto.ckpt", "vmamba_femto")
    result = run_cli(tiny(fashion_dir, tmp_path / "run", "mode=eval", f"ckpt_path={path}"), cwd=tmp_path)
    assert result.returncode != 0
    assert (f"ckpt_path={path} was written by a run of backbone=vmamba_femto, experiment=None; this run builds "
            "backbone=test_vmamba") in output(result)


def test_last_picks_the_newest_run_of_the_same_backbone_and_experiment(tmp_path, caplog):
    import os
    import time

    ours = fake_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt", "test_vmamba")
    fake_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt", "vmamba_femto")
    fake_checkpoint(tmp_path / "c" / "checkpoints" / "last.ckpt", "test_vmamba", experiment="fashion_mnist_vmamba")
    (tmp_path / "d" / "checkpoints").mkdir(parents=True)
    (tmp_path / "d" / "checkpoints" / "last.ckpt").write_bytes(b"")
    for age, folder in enumerate("dcba"):  # a is the oldest
        os.utime(tmp_path / folder / "checkpoints" / "last.ckpt", (time.time() - 100 * age,) * 2)
    with caplog.at_level(logging.INFO, logger="mambalab"):
        picked = resolve_checkpoint("last", tmp_path, {"backbone": "test_vmamba", "experiment": None})
    assert picked == str(ours)
    assert f"ckpt_path=last: resuming {ours}" in caplog.text and "empty file" in caplog.text
    with pytest.raises(FileNotFoundError, match="no run of backbone=vmamba_tiny_s1l8, experiment=None"):
        resolve_checkpoint("last", tmp_path, {"backbone": "vmamba_tiny_s1l8", "experiment": None})


# ---- weights without training state (weights=) and pretrained backbones ----------------------------------------

def test_weights_that_cannot_be_used_are_refused_before_anything_is_made(fashion_dir, tmp_path):
    """A missing weights= path, weights= with ckpt_path (which would replace them) and pretrained=true without
    converted weights are config errors, raised before any folder exists."""
    with pytest.raises(ConfigError, match=re.escape("weights='nowhere/model.safetensors' (str): must be an existing "
                                                    "folder written by tools.convert")):
        check_config(compose_config(["weights=nowhere/model.safetensors"], tmp_path))
    ckpt = fake_checkpoint(tmp_path / "run.ckpt", "test_vmamba")
    with pytest.raises(ConfigError, match=re.escape(f"weights={ckpt} with ckpt_path={ckpt}: the checkpoint restores "
                                                    "the whole model")):
        check_config(compose_config([f"weights={ckpt}", f"ckpt_path={ckpt}"], tmp_path))
    with pytest.raises(ConfigError, match=re.escape("backbone.pretrained=true: test_vmamba: pretrained=True needs the "
                                                    "official checkpoint converted with tools.convert")):
        check_config(compose_config(["backbone=test_vmamba", "backbone.pretrained=true"], tmp_path))
    missing = tmp_path / "converted" / "model.safetensors"
    with pytest.raises(ConfigError, match=re.escape(f"pretrained weights file {missing} (pretrained_cfg_overlay.file) "
                                                    "does not exist")):
        check_config(compose_config(["backbone=test_vmamba", "backbone.pretrained=true",
                                     f"+backbone.pretrained_cfg_overlay.file={missing}"], tmp_path))
    result = run_cli(tiny(fashion_dir, None, "mode=eval", f"weights={tmp_path / 'nope'}"), cwd=tmp_path)
    assert result.returncode != 0 and f"weights='{tmp_path / 'nope'}' (str): must be an existing" in output(result)
    assert not (tmp_path / "logs").exists()


def test_weights_from_a_run_checkpoint_load_strictly_and_name_a_foreign_or_broken_one(fashion_dir, tmp_path):
    """weights=<a run's .ckpt>: the task's weights and nothing else; the backbone its run recorded must be this
    run's, and an incomplete file is named, as for ckpt_path."""
    from run import build_task
    from tasks.weights import load_task_weights

    cfg = compose_config(["backbone=test_vmamba", f"data.data_dir={fashion_dir}", "data.num_workers=0"], tmp_path)
    torch.manual_seed(0)
    _, source = build_task(cfg)
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": source.state_dict(), "mambalab": {"backbone": "test_vmamba", "experiment": None}}, path)
    torch.manual_seed(1)
    datamodule, task = build_task(cfg)
    load_task_weights(task, path, "test_vmamba", cfg.head._target_, datamodule)
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in task.state_dict().items())
    foreign = fake_checkpoint(tmp_path / "femto.ckpt", "vmamba_femto", experiment="fashion_mnist_vmamba")
    with pytest.raises(ValueError, match=re.escape(f"weights={foreign} was written by a run of experiment="
                                                   "fashion_mnist_vmamba and holds backbone 'vmamba_femto' (this "
                                                   "run: 'test_vmamba')")):
        load_task_weights(task, foreign, "test_vmamba", cfg.head._target_, datamodule)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=re.escape(f"weights={path}: not a complete checkpoint")):
        load_task_weights(task, path, "test_vmamba", cfg.head._target_, datamodule)


# ---- which data is read (issue item 9) ----------------------------------------------------------------------

def test_missing_data_folder_given_on_the_command_line_is_refused(tmp_path):
    result = run_cli(["data.data_dir=/no/such/fashion", "backbone=test_vmamba"], cwd=tmp_path)
    assert result.returncode != 0
    assert "data.data_dir=/no/such/fashion: no such folder" in output(result)
    assert not (tmp_path / "logs").exists()


def test_fallback_to_the_system_copy_is_logged_naming_both_folders(tmp_path, monkeypatch, caplog):
    from datamodules import fashion_mnist

    system_copy = make_fashion_mnist(tmp_path / "system")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", system_copy)
    datamodule = fashion_mnist.FashionMNISTDataModule(str(tmp_path / "typo"), download=False)
    with caplog.at_level(logging.WARNING, logger="mambalab"):
        source = datamodule.data_source
    assert f"data_dir={tmp_path / 'typo'} has no IDX files; using the system copy in {system_copy}" in caplog.text
    assert str(system_copy / "train-images-idx3-ubyte.gz") in source
