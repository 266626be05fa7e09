"""Output folders that never lose a user's files: what ``tools.convert`` and ``tools.export`` write, and only that.

A tool writes its files into a temporary folder beside ``--out`` first. A new ``--out`` is created by renaming
that folder into place; into an existing one, each file is moved in with an atomic rename. The folder then
gets a manifest (``.mambalab-manifest.json``) naming every file the tool wrote with its SHA-256, so that a later
run can recognise its own files:

- a folder holding only a previous output (files the manifest lists, unchanged) is updated in place: the tool's
  files are replaced, other files in it are left alone, and the tool's own files this run no longer writes
  (``model.onnx`` of an earlier ``--onnx`` export) are removed, so nothing stale is left beside the new weights;
- a non-empty folder with no manifest is refused unless ``--force`` is given, and even then no file of the user's
  is replaced: a file with one of the tool's names that the manifest does not list unchanged (the user's own,
  or one the user has edited since) stops the write with its name;
- ``--out`` naming an existing file, not a folder, is an error.

Everything is checked before the tool starts its (slow) work, and again when the files are moved in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

MANIFEST = ".mambalab-manifest.json"


class OutputFolderError(ValueError):
    """``--out`` cannot be written without touching files the tool did not write."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def previous_output(out_dir: Path) -> Dict[str, str]:
    """The files (name -> SHA-256) an earlier run of a mambalab tool wrote into ``out_dir``; empty if none."""
    manifest = Path(out_dir) / MANIFEST
    if not manifest.is_file():
        return {}
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise OutputFolderError(f"--out {out_dir}: its {MANIFEST} cannot be read ({err}); move the folder's "
                                f"files elsewhere or choose another --out") from err
    return {str(name): str(digest) for name, digest in files.items()}


def _own_unchanged(out_dir: Path, own: Dict[str, str]) -> set:
    """The manifest's files that are still in ``out_dir`` exactly as the tool wrote them."""
    return {name for name, digest in own.items() if (out_dir / name).is_file() and _sha256(out_dir / name) == digest}


def check_output_folder(out_dir: Path, tool: str, force: bool = False, names: Iterable[str] = ()) -> None:
    """Raise ``OutputFolderError`` unless ``tool`` may write ``names`` into ``out_dir`` (see the module doc)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputFolderError(f"--out {out_dir} is an existing file, not a folder; {tool} writes a folder "
                                f"(model.safetensors, config.json, ...): choose a folder path")
    if not out_dir.is_dir():
        return
    own = previous_output(out_dir)
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name != MANIFEST and p.name not in own)
    if foreign and not own and not force:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputFolderError(f"--out {out_dir} is a non-empty folder that {tool} did not write (it holds "
                                f"{listed}); choose a new or empty folder, or pass --force to add the files "
                                f"beside them ({tool} never replaces or deletes a file it did not write)")
    unchanged = _own_unchanged(out_dir, own)
    clashes = sorted(name for name in names if (out_dir / name).exists() and name not in unchanged)
    if clashes:
        raise OutputFolderError(f"--out {out_dir}: {', '.join(clashes)} already exist(s) and {tool} did not write "
                                f"{'it' if len(clashes) == 1 else 'them'} (or it was changed since); nothing was "
                                f"written; move {'it' if len(clashes) == 1 else 'them'} away or choose another --out")


def write_output_folder(out_dir: Path, write: Callable[[Path], None], tool: str, force: bool = False,
                        source: Optional[str] = None) -> Path:
    """Run ``write(folder)`` into a temporary folder and move its files into ``out_dir`` as the module doc says;
    return the resolved ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    check_output_folder(out_dir, tool, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(staging)
        names = sorted(p.name for p in staging.iterdir())
        if any((staging / name).is_dir() for name in names) or MANIFEST in names:
            raise RuntimeError(f"{tool} wrote a folder or a {MANIFEST} of its own into {staging}")
        manifest = {"tool": tool, "source": source, "files": {name: _sha256(staging / name) for name in names}}
        if not out_dir.exists():
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            staging.rename(out_dir)
            return out_dir
        check_output_folder(out_dir, tool, force, names)
        stale = set(_own_unchanged(out_dir, previous_output(out_dir))) - set(names)
        for name in names:
            os.replace(staging / name, out_dir / name)
        for name in stale:
            (out_dir / name).unlink()
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.replace(staging / MANIFEST, out_dir / MANIFEST)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir
