"""What torch.fx symbolic tracing treats as leaves, registered with timm's FX helpers in one place.

timm's FX feature extraction (``timm.models.create_feature_extractor``, ``features_only=True,
feature_cls='fx'``) and torchvision's ``create_feature_extractor`` with timm's tracer arguments trace
every model down to these: each one decides something from run-time values (tensor shapes, the scan
backend), which a symbolic trace cannot record, so it stays a single call in the graph and runs eagerly.
Everything else in the families traces through.
"""

from __future__ import annotations

from timm.models import register_notrace_function, register_notrace_module

from .mhs import ScanHead
from .msvmamba import MultiScaleSS2D
from .ss2d import SS2D, RouteSSM
from .ssm import selective_scan
from .vim import PatchEmbed, resample_pos_embed

__all__ = ["FX_LEAF_FUNCTIONS", "FX_LEAF_MODULES"]

# The reason each one cannot be traced through.
FX_LEAF_FUNCTIONS = {
    selective_scan: "picks its backend from the input's device and dtype and checks shapes at run time",
    resample_pos_embed: "compares the stored and the input's patch grid and resizes only when they differ",
}
FX_LEAF_MODULES = {
    RouteSSM: "checks the routes it is given against its parameter sets, then calls the selective scan",
    SS2D: "its scan pattern may build gather indices from the map size at run time (RouteConcat)",
    MultiScaleSS2D: "both scales' RouteConcat patterns build gather indices from the map size at run time",
    PatchEmbed: "refuses inputs smaller than one patch, a check on the input's size",
    ScanHead: "its RouteTable builds the route tables for the map size at run time (and checks them once per size)",
}

for _function in FX_LEAF_FUNCTIONS:
    register_notrace_function(_function)
for _module in FX_LEAF_MODULES:
    register_notrace_module(_module)
