"""Skin-lesion classification on HAM10000 with five timm backbones, Lightning and Hydra."""

from skinlesion.labels import CLASSES, NUM_CLASSES

__all__ = ["CLASSES", "NUM_CLASSES", "__version__"]
__version__ = "0.1.0"
