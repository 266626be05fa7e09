"""ERF maps and multirun curve plots from tools/visualise.py."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from tools.visualise import area_ratio, effective_receptive_field, main, multirun_curves, normalise_erf


class LocalConv(nn.Module):
    """A 3x3 conv with all-one weights and a positive bias: on positive inputs every output is positive,
    so ReLU passes it and the input gradient of the centre point is exactly out_channels (= 4) at each of
    the 3x3 neighbours, for each input channel, and exactly 0 elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        nn.init.ones_(self.conv.weight)
        nn.init.ones_(self.conv.bias)

    def forward_features(self, x):
        return self.conv(x)


def test_erf_of_a_local_conv_is_exactly_its_kernel_footprint():
    erf = effective_receptive_field(LocalConv(), torch.rand(2, 3, 9, 9))
    expected = np.zeros((9, 9))
    expected[3:6, 3:6] = 4 * 3  # out_channels x input channels, small integers: exact in float
    np.testing.assert_array_equal(erf, expected)
    assert area_ratio(erf, 0.99) == pytest.approx(9 / 81)
    shown = normalise_erf(erf)
    assert shown.max() == 1.0 and shown[0, 0] == 0.0


# Smallest 4x4 corner-block mean / ERF maximum measured for test_vmamba over seeds 0-2 at 32 and 64 px:
# 4.7e-3 (typically 1e-2 to 1e-1). A purely local model gives exactly 0 there, and float32 rounding in the
# gradient is ~1e-7 of the largest terms, so 1e-3 is far above noise and still 4x below the smallest seen.
CORNER_FRACTION = 1e-3


def vmamba_erf(threads: int) -> np.ndarray:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = timm.create_model("test_vmamba", num_classes=0)
        return effective_receptive_field(model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    finally:
        torch.set_num_threads(previous)


def test_vmamba_erf_reaches_every_corner_by_a_wide_margin():
    erf = vmamba_erf(threads=1)
    assert np.isfinite(erf).all() and erf.max() > 0
    corners = [erf[:4, :4], erf[:4, -4:], erf[-4:, :4], erf[-4:, -4:]]
    assert min(block.mean() for block in corners) > CORNER_FRACTION * erf.max()
    assert area_ratio(erf, 0.99) > 0.5  # 99 % of the contribution needs most of the image
    shown = normalise_erf(erf)
    assert shown.max() == pytest.approx(1.0) and shown.min() >= 0


def test_erf_does_not_depend_on_the_thread_count():
    # Different thread counts change reduction order only: agreement to float32 round-off (1e-5 of the max).
    one, two = vmamba_erf(threads=1), vmamba_erf(threads=2)
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-5 * one.max())


def test_erf_skips_non_finite_maps_and_refuses_when_none_is_left():
    class Poisoned(LocalConv):
        """NaN features for bright images (mean above 1), the plain conv otherwise."""

        def forward_features(self, x):
            return self.conv(x) * torch.where(x.mean() > 1, torch.tensor(float("nan")), torch.tensor(1.0))

    bright, dim = 1.5 + torch.rand(3, 9, 9), torch.rand(3, 9, 9)
    clean = effective_receptive_field(LocalConv(), dim[None])
    np.testing.assert_array_equal(effective_receptive_field(Poisoned(), torch.stack([bright, dim])), clean)
    with pytest.raises(FloatingPointError, match="non-finite"):
        effective_receptive_field(Poisoned(), bright[None])


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
