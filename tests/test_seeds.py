"""tools.seeds: runs an experiment per seed and writes mean ± std with the seeds listed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.fixtures import make_fashion_mnist
from tools.seeds import collect, main, markdown, summarise


def fake_run(folder: Path, seed: int, rows: list[dict]) -> Path:
    """A run folder as run.py writes it: config.yaml and Lightning's metrics.csv (sparse columns)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed: {seed}\ntask_name: demo\n")
    columns = ["epoch", "step", "val/acc", "test/acc", "test/loss"]
    lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_collect_reads_each_runs_seed_and_last_values_and_summarises(tmp_path):
    sweep = tmp_path / "multirun"
    for index, (seed, acc) in enumerate(((3, 0.80), (1, 0.84), (2, 0.88))):
        fake_run(sweep / str(index), seed, [{"epoch": 0, "step": 9, "val/acc": 0.5},
                                            {"epoch": 1, "step": 19, "test/acc": acc, "test/loss": 1.0 + seed}])
    results = collect([sweep])
    assert [r.seed for r in results] == [1, 2, 3]
    summary = summarise(results)
    assert list(summary) == ["test/acc", "test/loss"]  # val/ columns only when asked
    assert summary["test/acc"]["mean"] == pytest.approx(0.84)
    assert summary["test/acc"]["std"] == pytest.approx(0.04)  # sample std of 0.84, 0.88, 0.80
    assert summary["test/acc"]["values"] == [0.84, 0.88, 0.80]
    text = markdown(summary, "`experiment=demo`", percent=True)
    # percent applies to fractions; the loss (values 2-4) stays as logged
    assert "| `experiment=demo` | acc 84.0 ± 4.0 %, loss 3.0000 ± 1.0000 | seeds 1, 2, 3 |" in text
    assert summarise(results, ["val/acc"])["val/acc"]["std"] == 0


def test_problems_are_named(tmp_path):
    fake_run(tmp_path / "a", 1, [{"test/acc": 0.5}])
    fake_run(tmp_path / "b", 1, [{"test/acc": 0.6}])
    with pytest.raises(ValueError, match="seed 1 appears twice"):
        collect([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(KeyError, match=r"test/mIoU is missing from .*a"):
        summarise(collect([tmp_path / "a"]), ["test/mIoU"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no metrics.csv"):
        collect([tmp_path / "empty"])
    assert math.isnan(summarise(collect([tmp_path / "a"]))["test/acc"]["std"])  # one run has no spread


def test_summary_files_never_replace_a_file_the_tool_did_not_write(tmp_path):
    fake_run(tmp_path / "runs" / "0", 1, [{"test/acc": 0.5}])
    fake_run(tmp_path / "runs" / "1", 2, [{"test/acc": 0.7}])
    out = tmp_path / "out"
    assert main(["collect", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert main(["collect", str(tmp_path / "runs"), "--out", str(out)]) == 0  # its own files are refreshed
    assert json.loads((out / "summary.json").read_text())["metrics"]["test/acc"]["seeds"] == [1, 2]
    (out / "summary.md").write_text("my notes\n")
    with pytest.raises(FileExistsError, match="summary.md exists and was not written by tools.seeds"):
        main(["collect", str(tmp_path / "runs"), "--out", str(out)])
    assert (out / "summary.md").read_text() == "my notes\n"


def tiny_run(data: Path) -> list[str]:
    """Overrides of a run of a few batches on the Fashion-MNIST fixture."""
    return [f"data.data_dir={data}", "data.num_workers=0", "data.batch_size=8", "data.val_size=16",
            "backbone=test_vmamba", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=2", "callbacks.rich_progress_bar=null",
            "print_config=false"]


def test_a_seed_folder_that_is_neither_finished_nor_resumable_is_named_and_kept(tmp_path):
    (tmp_path / "seed_1").mkdir()
    (tmp_path / "seed_1" / "notes.txt").write_text("mine\n")
    with pytest.raises(RuntimeError, match="seed_1 exists but holds neither a finished run"):
        main(["run", "--seeds", "1", "--out", str(tmp_path), "--", "experiment=demo_medical_brain"])
    assert (tmp_path / "seed_1" / "notes.txt").read_text() == "mine\n"


@pytest.mark.slow
def test_an_interrupted_seed_resumes_in_its_folder_with_its_history(tmp_path, capsys):
    """A run stopped before its test (here: no test batches) is resumed from its last.ckpt, not collected as a
    finished run nor started afresh; the rows it logged stay in its metrics.csv."""
    data = make_fashion_mnist(tmp_path / "fashion")
    out = tmp_path / "seeds"
    untested = [*tiny_run(data), "trainer.limit_test_batches=0"]
    with pytest.raises(ValueError, match="no test/ metrics"):
        main(["run", "--seeds", "4", "--out", str(out), "--", *untested])
    before = (out / "seed_4" / "metrics.csv").read_text().splitlines()
    assert (out / "seed_4" / "checkpoints" / "last.ckpt").is_file() and len(before) > 1
    capsys.readouterr()
    assert main(["run", "--seeds", "4", "--out", str(out), "--", *tiny_run(data)]) == 0
    assert "was interrupted: resuming seed 4" in capsys.readouterr().out
    after = (out / "seed_4" / "metrics.csv").read_text().splitlines()
    assert len(after) > len(before) and json.loads((out / "summary.json").read_text())["metrics"]["test/loss"]


@pytest.mark.slow
def test_three_seeds_of_a_tiny_run_end_to_end(tmp_path, capsys):
    data = make_fashion_mnist(tmp_path / "fashion")
    out = tmp_path / "seeds"
    tiny = tiny_run(data)
    assert main(["run", "--seeds", "1", "2", "3", "--out", str(out), "--", *tiny]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["seed_1", "seed_2", "seed_3", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    loss = summary["metrics"]["test/loss"]
    assert loss["seeds"] == [1, 2, 3] and len(set(loss["values"])) == 3  # the seed reached the model
    assert "seeds 1, 2, 3 |" in (out / "summary.md").read_text()
    assert summary["machine"]["cpu_capability"]
    # A second call reuses the finished runs instead of training again.
    capsys.readouterr()
    assert main(["run", "--seeds", "1", "2", "3", "--out", str(out), "--", *tiny]) == 0
    assert capsys.readouterr().out.count("exists: collecting it") == 3
