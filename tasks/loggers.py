"""A CSV logger that continues a run's ``metrics.csv`` instead of deleting it."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from .run_dir import open_new

log = logging.getLogger("mambalab")


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion: an existing ``metrics.csv`` is continued.

    Lightning's writer deletes ``metrics.csv`` when its folder is not empty, so resuming a run into its own
    folder erased the metric history. Here the file's columns are read back and new rows are appended. When
    a new metric adds a column, the file is rewritten with every earlier row into a temporary file that is
    renamed into place, so no row is lost even if the process is killed mid-way. Hyperparameters go to a
    new ``hparams.yaml`` (``hparams_1.yaml`` when an earlier attempt wrote one).
    """

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.hparams_file: Optional[Path] = None

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        if self.hparams_file is None:
            self.hparams_file, handle = open_new(Path(self.log_dir) / self.NAME_HPARAMS_FILE)
            handle.close()
        save_hparams_to_yaml(self.hparams_file, self.hparams)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])
        log.info("appending to the metric history in %s", path)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(path, newline="") as source, open(temporary, "w", newline="") as target:
                writer = csv.DictWriter(target, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(csv.DictReader(source))
                target.flush()
                os.fsync(target.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` keeps every earlier row of the run (see ``AppendingExperimentWriter``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
