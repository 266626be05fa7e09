"""What a head tells the rest of the program about itself, as types instead of strings and attribute probes.

``HeadInputs`` says what a head reads from the backbone; every head class declares it as ``inputs``, and
run.py builds the backbone to match and tells the head the widths it needs. ``AuxiliaryHead`` is the
protocol of heads with an extra training-only output (UperNet's FCN head), which tasks add to the loss.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional, Protocol, Sequence, runtime_checkable

from torch import Tensor


class HeadInputs(Enum):
    """What a head reads from the backbone.

    ``POOLED``: one pooled vector per image (a classifier); the backbone is built with ``num_classes=0`` and
    the head receives ``in_features``. ``FEATURES``: the multi-scale NCHW maps (dense heads, detectors); the
    backbone is built with ``features_only=True`` and the head receives ``in_channels`` and ``strides``.
    ``FEATURES_AND_STAGE_INPUTS``: those maps followed by each level's stage input, the map entering the
    level's blocks after its downsample (same channels and stride; VM-UNet's skips); the backbone, a staged
    family, is also built with ``stage_inputs=True``, and the head receives the levels' ``in_channels`` and
    ``strides``.
    """

    POOLED = "pooled"
    FEATURES = "features"
    FEATURES_AND_STAGE_INPUTS = "features_and_stage_inputs"


@runtime_checkable
class AuxiliaryHead(Protocol):
    """A dense head with an auxiliary output for training: its loss is added with weight ``aux_weight``."""

    aux_weight: float

    def forward_aux(self, features: Sequence[Tensor]) -> Optional[Tensor]:
        """Auxiliary logits, or None when this instance was built without the auxiliary branch."""


def head_inputs(head_class: type) -> HeadInputs:
    """The ``inputs`` a head class declares; a class that declares none, or not a ``HeadInputs``, is named."""
    inputs = getattr(head_class, "inputs", None)
    if not isinstance(inputs, HeadInputs):
        raise TypeError(f"{head_class.__module__}.{head_class.__qualname__} must declare `inputs` as one of "
                        f"{[f'HeadInputs.{member.name}' for member in HeadInputs]} (heads.interface), got {inputs!r}")
    return inputs
