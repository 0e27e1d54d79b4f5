"""Encoders (by name), heads, the multimodal model skeletons and the late-fusion rules."""
from .encoders import ENCODERS, build_encoders, create_encoder, default_encoder
from .fusion import FUSIONS, LATE_FUSIONS, entropy_weights, fuse, fused_prediction
from .head import ClassifierHead
from .modes import eval_mode
from .multi_head import MultiHeadModel
from .multimodal import EnsembleHeadsModel, LateFusionModel, MultimodalModel, modality_heads
from .shared_head import SharedHeadModel
from .spec import ModelSpec

__all__ = ["ENCODERS", "build_encoders", "create_encoder", "default_encoder", "ClassifierHead", "MultimodalModel",
           "LateFusionModel", "EnsembleHeadsModel", "SharedHeadModel", "MultiHeadModel", "modality_heads", "ModelSpec", "fuse",
           "fused_prediction", "entropy_weights", "eval_mode", "FUSIONS", "LATE_FUSIONS"]
