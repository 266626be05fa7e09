"""tools.convert / tools.export never delete or overwrite a file they did not write: each test performs the
fault (``--out`` at a user's folder, at a file, over an edited output) and checks every user file byte for byte."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.test_convert import TEST_VMAMBA, vmamba_official
from tools.convert import main as convert_main
from tools.export import main as export_main
from tools.output_folder import MANIFEST


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> SHA-256)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("official") / "official.pth"
    torch.save({"model": vmamba_official(**TEST_VMAMBA, num_classes=5)}, path)
    return path


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder a user owns: notes, a sub-folder of data, a checkpoint."""
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "data" / "labels.csv").write_text("a,b\n1,2\n")
    torch.save({"w": torch.ones(3)}, folder / "mine.pth")
    return folder


def test_out_dot_in_a_users_folder_is_refused_and_nothing_is_lost(official, user_folder, monkeypatch, capsys):
    before = _snapshot(user_folder)
    monkeypatch.chdir(user_folder)
    assert convert_main([str(official), "test_vmamba", "--out", "."]) == 1
    err = capsys.readouterr().err
    assert "non-empty folder that tools.convert did not write" in err and "--force" in err and "notes.txt" in err
    assert _snapshot(user_folder) == before
    assert export_main([str(official), "test_vmamba", "--out", "."]) == 1
    assert "non-empty folder that tools.export did not write" in capsys.readouterr().err
    assert _snapshot(user_folder) == before


def test_force_writes_beside_the_users_files_and_never_over_them(official, user_folder, capsys):
    before = _snapshot(user_folder)
    assert convert_main([str(official), "test_vmamba", "--out", str(user_folder), "--force"]) == 0
    after = _snapshot(user_folder)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"config.json", "model.safetensors", MANIFEST}
    manifest = json.loads((user_folder / MANIFEST).read_text())
    assert manifest["tool"] == "tools.convert" and sorted(manifest["files"]) == ["config.json", "model.safetensors"]
    assert manifest["source"] == "official.pth"

    clash = user_folder.parent / "clash"
    clash.mkdir()
    (clash / "config.json").write_text('{"mine": true}')
    assert convert_main([str(official), "test_vmamba", "--out", str(clash), "--force"]) == 1
    assert "config.json already exist(s) and tools.convert did not write it" in capsys.readouterr().err
    assert _snapshot(clash) == {"config.json": hashlib.sha256(b'{"mine": true}').hexdigest()}


def test_an_earlier_output_is_updated_in_place_keeping_what_the_user_added(official, tmp_path, capsys):
    out = tmp_path / "weights"
    assert convert_main([str(official), "test_vmamba", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("evaluated on 2024-05-01")
    first = _snapshot(out)
    weights = out / "model.safetensors"
    assert export_main([str(weights), "test_vmamba", "--out", str(out)]) == 0  # export over the convert output
    assert (out / "README.md").is_file() and (out / "notes.txt").read_text() == "evaluated on 2024-05-01"
    assert json.loads((out / MANIFEST).read_text())["tool"] == "tools.export"
    assert convert_main([str(official), "test_vmamba", "--out", str(out)]) == 0
    # The export's model card is the tools' own and no longer describes the folder, so it goes; the notes stay.
    assert _snapshot(out) == first
    capsys.readouterr()


def test_an_output_file_the_user_edited_is_not_replaced(official, tmp_path, capsys):
    out = tmp_path / "weights"
    assert convert_main([str(official), "test_vmamba", "--out", str(out)]) == 0
    (out / "config.json").write_text('{"edited": true}')
    edited = _snapshot(out)
    for force in ([], ["--force"]):
        assert convert_main([str(official), "test_vmamba", "--out", str(out), *force]) == 1
        assert "config.json already exist(s)" in capsys.readouterr().err
        assert _snapshot(out) == edited


def test_out_naming_an_existing_file_is_an_error(official, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"\x00user data")
    for main in (convert_main, export_main):
        assert main([str(official), "test_vmamba", "--out", str(target)]) == 1
        assert f"--out {target} is an existing file, not a folder" in capsys.readouterr().err
        assert target.read_bytes() == b"\x00user data"


def test_an_empty_folder_is_used_and_a_failed_conversion_writes_nothing(official, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_main([str(official), "test_msvmamba", "--out", str(empty)]) == 1  # wrong family: fails
    assert list(empty.iterdir()) == [] and not list(tmp_path.glob(".empty.*"))
    assert convert_main([str(official), "test_vmamba", "--out", str(empty)]) == 0
    assert sorted(p.name for p in empty.iterdir()) == sorted(["config.json", "model.safetensors", MANIFEST])
    capsys.readouterr()
