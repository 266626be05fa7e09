"""One folder per run: claimed atomically, shared by the ranks of one job, reused only to resume that run.

The rule (``docs/reliability.md``):

- The default run folder (``hydra.run.dir``'s timestamp, or ``hydra.sweep.dir`` for a multirun) is created with
  an exclusive ``mkdir``; when the name is taken -- another process started in the same second, a SLURM job
  array, a shell loop -- ``_1``, ``_2``, ... is appended until a new folder is made. No two runs share one.
- A folder given explicitly with ``hydra.run.dir=<dir>`` is used as given when it is new or empty. When it already
  holds a run's outputs it is reused only to continue that run: ``mode=train`` with ``ckpt_path`` a checkpoint
  inside it (a resume), or ``mode=eval``. That attempt's ``config.yaml``, ``version.json`` and ``.hydra/`` go to
  ``<dir>/resume_<n>/`` (``eval_<n>/``) so the earlier ones are kept; metrics are appended to ``metrics.csv``.
  Anything else (a new run, a checkpoint of another run, a non-empty folder that is not a run) is refused
  before anything is written.
- Under DDP only rank 0 picks the folder. Lightning relaunches ``run.py`` for the other local ranks with
  ``hydra.run.dir`` set to rank 0's folder; ranks started by torchrun or ``srun`` wait for the folder rank 0
  announces in ``<runs>/.rank0/`` (which must be on a filesystem every node sees, as checkpoints must).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from .checkpoint_io import resolve_checkpoint, run_identity
from .config_checks import check_config

log = logging.getLogger("mambalab")

# Files a run writes at its start: a folder holding one of them is a run folder.
RUN_MARKERS = (".hydra", "config.yaml", "version.json")
# Environment variables naming a process's rank and the job's size, in the order Lightning reads them.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "SLURM_NTASKS")
# Variables that one torchrun / srun launch shares among its ranks, and that differ between launches.
JOB_KEY_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")
PROCESS_START = time.time()


def stop_on_error(function: Callable[[DictConfig], None], config: DictConfig) -> None:
    """Run ``function(config)``; on an error, end the process with its message (Hydra would only warn)."""
    HydraConfig.instance().set_config(config)  # as run_job does first: ${hydra:...} values resolve from it
    try:
        function(config)
    except Exception as err:  # noqa: BLE001 -- every failure must stop the run, not become a warning
        raise SystemExit(f"{type(err).__name__}: {err}") from err


def claim_dir(path: Path, first_index: int = 0) -> Path:
    """Create ``path``, or ``path_1``, ``path_2``, ... when taken, with an exclusive mkdir; return the one made.

    ``first_index=1`` numbers every name (``path_1`` first).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for index in itertools.count(first_index):
        candidate = path if index == 0 else path.with_name(f"{path.name}_{index}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def open_new(path: Path) -> tuple[Path, BinaryIO]:
    """Open a file that did not exist for writing: ``path``, or ``<stem>_1<suffix>``, ... when taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for index in itertools.count():
        candidate = path if index == 0 else path.with_name(f"{path.stem}_{index}{path.suffix}")
        try:
            return candidate, open(candidate, "xb")
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched as one rank of several)."""
    return next((int(os.environ[name]) for name in RANK_VARIABLES if os.environ.get(name)), 0)


def launched_world_size() -> int:
    """How many processes the launcher (torchrun, srun) started for this job; 1 when none did."""
    return next((int(os.environ[name]) for name in WORLD_SIZE_VARIABLES if os.environ.get(name)), 1)


def is_run_folder(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def explicit_override(config: DictConfig, key: str) -> bool:
    """Whether the command line set ``key`` (a Hydra override such as ``hydra.run.dir=...``)."""
    overrides = list(config.hydra.overrides.hydra) + list(config.hydra.overrides.task)
    return any(override.split("=", 1)[0].lstrip("+~") == key for override in overrides)


def _job_key() -> str:
    values = [os.environ[name] for name in JOB_KEY_VARIABLES if os.environ.get(name)]
    if not values:
        raise RuntimeError(f"rank {process_rank()} of {launched_world_size()} processes, but none of "
                           f"{', '.join(JOB_KEY_VARIABLES)} is set to tell this launch from another; "
                           "pass hydra.run.dir=<folder> to every rank")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(values))


def announce_folder(folder: Path) -> None:
    """Rank 0: tell the other ranks of this launch which folder it claimed (in a new file; a reader that finds
    it half-written reads it again)."""
    _, handle = open_new(folder.parent / ".rank0" / f"{_job_key()}.json")
    with handle:
        handle.write(json.dumps({"folder": str(folder), "time": time.time()}).encode())


def await_folder(parent: Path, timeout_s: float, poll_s: float = 0.2) -> Path:
    """Other ranks: the folder rank 0 of this launch announced (newer than this process, within a margin)."""
    deadline, key, not_before = time.time() + timeout_s, _job_key(), PROCESS_START - 60
    while True:
        announced = []
        board = parent / ".rank0"
        for note in [*board.glob(f"{key}.json"), *board.glob(f"{key}_*.json")]:
            try:
                record = json.loads(note.read_text())
            except (OSError, ValueError):  # rank 0 is still writing it
                continue
            if record.get("time", 0) >= not_before:
                announced.append((record["time"], record["folder"]))
        if announced:
            return Path(max(announced)[1])
        if time.time() > deadline:
            raise TimeoutError(f"rank {process_rank()}: rank 0 did not announce its run folder in {parent}/.rank0 "
                               f"within {timeout_s:.0f} s (is the log folder on a filesystem all nodes share?); "
                               "pass hydra.run.dir=<folder> to every rank")
        time.sleep(poll_s)


def checkpoint_inside(ckpt_path: Optional[str], folder: Path) -> bool:
    if not ckpt_path:
        return False
    return folder.resolve() in Path(ckpt_path).expanduser().resolve().parents


class RunFolder(Callback):
    """Hydra callback: check the config and the checkpoint to load, then pick this run's folder (see the
    module docstring). ``ckpt_path=last`` is replaced by the file it resolves to.

    Runs before Hydra creates the folder, so a bad config value or a refused folder leaves nothing behind.
    Hydra turns exceptions raised in callbacks into warnings and carries on, so a failure here ends the
    process with ``SystemExit`` and the error's message instead.

    Args:
        rank_timeout_s: how long ranks started by torchrun/srun wait for rank 0 to announce its folder.
    """

    def __init__(self, rank_timeout_s: float = 300.0) -> None:
        self.rank_timeout_s = rank_timeout_s

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        stop_on_error(self._choose_run_folder, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        stop_on_error(self._choose_sweep_folder, config)

    def _choose_run_folder(self, config: DictConfig) -> None:
        check_config(config, overrides=list(config.hydra.overrides.task))
        rank = process_rank()
        if rank == 0 and config.get("ckpt_path"):
            resolved = resolve_checkpoint(config.ckpt_path, Path(config.paths.log_dir), run_identity(config))
            with read_write(config):
                config.ckpt_path = resolved  # `last` becomes the file it names, in the recorded config too
        if explicit_override(config, "hydra.run.dir"):
            if rank == 0:
                self._reuse_rule(config, Path(config.hydra.run.dir))
            return
        if rank == 0:
            folder = claim_dir(Path(config.hydra.run.dir))
            if launched_world_size() > 1:
                announce_folder(folder)
        else:
            folder = await_folder(Path(config.hydra.run.dir).parent, self.rank_timeout_s)
        with read_write(config.hydra):
            config.hydra.run.dir = str(folder)
            if rank != 0:  # as Lightning does for the ranks it launches: one config record, one log per rank
                config.hydra.output_subdir = None
                config.hydra.job.name = f"{config.hydra.job.name}_rank{rank}"

    @staticmethod
    def _choose_sweep_folder(config: DictConfig) -> None:
        check_config(config, overrides=list(config.hydra.overrides.task))
        sweep_dir = Path(config.hydra.sweep.dir)
        if explicit_override(config, "hydra.sweep.dir"):
            if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
                raise FileExistsError(f"hydra.sweep.dir={sweep_dir} is not empty: its job folders would be "
                                      "written over; choose a new folder (or leave hydra.sweep.dir unset)")
            return
        folder = claim_dir(sweep_dir)
        with read_write(config.hydra):
            config.hydra.sweep.dir = str(folder)
            # every job's config is composed again from these overrides, so the claimed folder goes with them
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={folder}")

    @staticmethod
    def _reuse_rule(config: DictConfig, folder: Path) -> None:
        """An explicit folder: new or empty is fine; a run folder only to continue that run; else refuse."""
        if not folder.is_dir() or not any(folder.iterdir()):
            return
        if not is_run_folder(folder):
            raise FileExistsError(f"hydra.run.dir={folder} is not empty and holds no run (no "
                                  f"{', '.join(RUN_MARKERS)}): a run would write over its files; "
                                  "choose a new or empty folder")
        mode, ckpt_path = config.get("mode"), config.get("ckpt_path")
        if mode == "train" and not checkpoint_inside(ckpt_path, folder):
            raise FileExistsError(
                f"hydra.run.dir={folder} already holds a run; it is reused only to resume that run "
                f"(ckpt_path=<a checkpoint inside it>, e.g. ckpt_path={folder / 'checkpoints' / 'last.ckpt'})"
                + (f", not with ckpt_path={ckpt_path}" if ckpt_path else "")
                + "; for a new run choose another folder or leave hydra.run.dir unset")
        attempt = claim_dir(folder / ("resume" if mode == "train" else str(mode)), first_index=1)
        log.info("continuing run %s: this attempt's config is recorded in %s", folder, attempt)
        with read_write(config.hydra):
            config.hydra.output_subdir = str(attempt.relative_to(folder) / ".hydra")
        with read_write(config.paths), open_dict(config.paths):
            config.paths.record_dir = str(attempt)
