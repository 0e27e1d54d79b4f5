"""Feature fusion: the modalities' features are combined first, then ONE head classifies them."""
import torch

from ..errors import MieInputError
from .encoders import build_encoders
from .head import ClassifierHead
from .multimodal import MultimodalModel

FEATURE_FUSIONS = ("concat", "sum")


class SharedHeadModel(MultimodalModel):
    """Encoders φ_m and one head h on fused features: ``forward(xs)`` → fused logits (B, K).

    ``mode`` "concat": h([φ_1(x_1); …; φ_M(x_M)]) with h: FC(M·d, …);  "sum": h(Σ_m φ_m(x_m)).
    """

    def __init__(self, encoders, head, mode):
        super().__init__(encoders)
        if mode not in FEATURE_FUSIONS:
            raise MieInputError(f"unknown feature fusion '{mode}'; expected one of {FEATURE_FUSIONS}")
        self.head = head
        self.mode = mode

    def combine(self, feats):
        """Fused features: concatenation (B, M·d) in modality order, or the sum (B, d)."""
        values = [feats[m] for m in self.modalities]
        return torch.cat(values, dim=-1) if self.mode == "concat" else torch.stack(values).sum(dim=0)

    def forward(self, xs):
        return self.head(self.combine(self.features(xs)))

    def modality_logits(self, feats):
        """{m: h(fused features with every modality but m zeroed)} from ``features()``."""
        return {m: self.head(self.combine({v: f if v == m else torch.zeros_like(f) for v, f in feats.items()}))
                for m in feats}

    @classmethod
    def build(cls, spec, mode):
        width = spec.dim * len(spec.modalities) if mode == "concat" else spec.dim
        return cls(build_encoders(spec), ClassifierHead(width, spec.num_classes, spec.head_hidden), mode)
