"""ERF maps and multirun curve plots from tools/visualise.py."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from tools.visualise import effective_receptive_field, main, multirun_curves, normalise_erf


class LocalConv(nn.Module):
    """A 3x3 conv: its ERF is exactly the 3x3 neighbourhood of the centre pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward_features(self, x):
        return self.conv(x)


def test_erf_of_a_local_conv_is_its_kernel_footprint():
    erf = effective_receptive_field(LocalConv(), torch.randn(2, 3, 9, 9))
    assert erf.shape == (9, 9)
    assert (erf[3:6, 3:6] > 0).all() and erf.sum() == pytest.approx(erf[3:6, 3:6].sum())


def test_vmamba_erf_is_global():
    torch.manual_seed(0)
    erf = effective_receptive_field(timm.create_model("test_vmamba", num_classes=0), torch.randn(2, 3, 32, 32))
    assert np.isfinite(erf).all() and (erf[[0, 0, -1, -1], [0, -1, 0, -1]] > 0).all()
    shown = normalise_erf(erf)
    assert shown.max() == pytest.approx(1.0) and shown.min() >= 0


def test_cli_writes_erf_figure_and_multirun_curves(tmp_path):
    main(["erf", "test_vmamba", "resnet18", "--size", "32", "--count", "1", "--out", str(tmp_path / "erf.png")])
    assert (tmp_path / "erf.png").stat().st_size > 0
    for job, accuracy in (("0", 0.5), ("1", 0.7)):
        (tmp_path / "sweep" / job / ".hydra").mkdir(parents=True)
        (tmp_path / "sweep" / job / ".hydra" / "overrides.yaml").write_text(f"- backbone=b{job}\n")
        (tmp_path / "sweep" / job / "metrics.csv").write_text(f"step,val/acc\n1,{accuracy}\n2,{accuracy + 0.1}\n")
    curves = multirun_curves(tmp_path / "sweep", "val/acc")
    assert list(curves) == ["backbone=b0", "backbone=b1"] and len(curves["backbone=b1"]) == 2
    main(["curves", str(tmp_path / "sweep"), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="val/loss"):
        multirun_curves(tmp_path / "sweep", "val/loss")
