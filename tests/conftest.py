"""Shared fixtures: real-format data on disk and Hydra composition of the real configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from tests.fixtures import make_fashion_mnist, make_imagefolder

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    """Fashion-MNIST in its released IDX .gz format, small."""
    return make_fashion_mnist(tmp_path_factory.mktemp("fashion-mnist"))


@pytest.fixture(scope="session")
def imagefolder_dir(tmp_path_factory) -> Path:
    """An ImageNet-layout folder (train/<class>/*.JPEG, val/<class>/*.JPEG), small."""
    return make_imagefolder(tmp_path_factory.mktemp("imagenet"))


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as run.py would, with outputs under ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def cli_env() -> dict[str, str]:
    """The environment of a user's shell running run.py from a checkout."""
    return dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python run.py <args>`` as a user would, from ``cwd``."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str], cwd: Path, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start ``python [launcher] run.py <args>`` without waiting, as a shell loop or job array does."""
    return subprocess.Popen([sys.executable, *launcher, str(ROOT / "run.py"), *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
