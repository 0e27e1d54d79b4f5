"""Encoders (by name), the per-modality head, late-fusion rules and the late-fusion model."""
from .encoders import ENCODERS, build_encoders, create_encoder, default_encoder
from .fusion import FUSIONS, entropy_weights, fuse
from .head import ClassifierHead
from .late_fusion import LateFusionModel
from .spec import ModelSpec

__all__ = ["ENCODERS", "build_encoders", "create_encoder", "default_encoder", "ClassifierHead", "LateFusionModel",
           "ModelSpec", "fuse", "entropy_weights", "FUSIONS"]
