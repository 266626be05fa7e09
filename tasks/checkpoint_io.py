"""Checkpoint files: writing that a kill cannot truncate, and checks of a checkpoint before it is used."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mambalab")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside its target, fsync it, then rename it into place.

    A rename within one directory is atomic, so a reader (or a resumed run) sees either the previous
    complete file or the new complete file, never a partial one -- also when the run directory is on
    another filesystem than the system temp directory (where Lightning's own temp-then-move copies).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)


# The key under which a task records what wrote a checkpoint (see BackboneHeadTask.on_save_checkpoint).
IDENTITY_KEY = "mambalab"


def run_identity(cfg: DictConfig) -> dict[str, Optional[str]]:
    """What this run's checkpoints record about their origin: the backbone's name and the experiment."""
    if "hydra" in cfg:
        choices = cfg.hydra.runtime.choices
    else:
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {"backbone": OmegaConf.select(cfg, "backbone.name"), "experiment": choices.get("experiment")}


def describe(identity: dict) -> str:
    return f"backbone={identity.get('backbone')}, experiment={identity.get('experiment')}"


def checkpoint_record(path: Path) -> dict[str, Any]:
    """The identity a checkpoint recorded ({} when it predates the record), after checking it is complete.

    A ``torch.save`` file is a zip archive whose directory is at its end: an empty file or one cut short (a
    copy or download that stopped) has none. The pickle is read with ``weights_only`` and its tensors are
    memory-mapped, not loaded.
    """
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a complete checkpoint")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a complete checkpoint ({size} bytes and no zip directory at its end: "
                         "truncated, e.g. a copy that stopped, or not written by torch.save)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 -- any failure to read means the same to the user
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint written by run.py (no state_dict)")
    return dict(checkpoint.get(IDENTITY_KEY) or {})


def resolve_checkpoint(ckpt_path: Optional[str], log_dir: Path, identity: dict) -> Optional[str]:
    """Check a user-given checkpoint before anything is built, naming the file and what is wrong with it.

    ``last`` means the most recently written ``checkpoints/last.ckpt`` under ``log_dir`` of a run with the
    same backbone and experiment as this one. A checkpoint written by another backbone is refused, naming both.
    """
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        return str(newest_last_checkpoint(log_dir, identity))
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
    record = checkpoint_record(path)
    if not record:
        log.warning("ckpt_path=%s records no backbone (written before checkpoints recorded it); "
                    "it must match backbone=%s", path, identity.get("backbone"))
    elif record.get("backbone") != identity.get("backbone"):
        raise ValueError(f"ckpt_path={path} was written by a run of {describe(record)}; this run builds "
                         f"backbone={identity.get('backbone')}: pass backbone={record.get('backbone')} "
                         "(or a checkpoint of this backbone)")
    return str(path)


def newest_last_checkpoint(log_dir: Path, identity: dict) -> Path:
    """The newest ``checkpoints/last.ckpt`` under ``log_dir`` of a run with this backbone and experiment."""
    candidates = sorted(log_dir.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    others = []
    for candidate in candidates:
        try:
            record = checkpoint_record(candidate)
        except ValueError as err:
            log.warning("ckpt_path=last: skipping %s", err)
            continue
        if all(record.get(key) == identity.get(key) for key in ("backbone", "experiment")):
            log.info("ckpt_path=last: resuming %s, the newest last.ckpt of %s under %s",
                     candidate, describe(identity), log_dir)
            return candidate
        others.append(f"{candidate} ({describe(record) if record else 'no record'})")
    raise FileNotFoundError(f"ckpt_path=last: no run of {describe(identity)} under {log_dir} has "
                            "checkpoints/last.ckpt" + (f"; runs of others: {'; '.join(others[:5])}" if others else ""))
