"""Task heads on backbone features: pooled (classification) or multi-scale (dense, pose and medical)."""

from .classification import LinearClassifier
from .maskrcnn import MaskRCNN
from .msvmunet import MSVMUNetDecoder
from .pose import TopdownHeatmapHead
from .upernet import FCNHead, UPerHead, UperNet
from .vmunet import VMUNetDecoder

__all__ = ["FCNHead", "LinearClassifier", "MSVMUNetDecoder", "MaskRCNN", "TopdownHeatmapHead", "UPerHead", "UperNet",
           "VMUNetDecoder"]
