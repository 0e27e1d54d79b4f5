"""A head per modality AND a fused head (MSES, OGR-GB, DOMFN, MMPareto, MILES).

    f_m = φ_m(x_m),    z_m = h_m(f_m),    z_fused = g(fuse(f_1, …, f_M))

with ``feature_fusion`` "concat" ([f_1; …; f_M], g: FC(M·d, …), the late-concat network of Wang et
al.'s G-Blend and Fujimori et al.'s multitask model), the element-wise "mean" or "max" of the f_m
(DOMFN's options), or their "sum" (MILES's second fusion). Every head is a ``ClassifierHead`` with the model's ``head_hidden`` widths.
"""
import torch

from ..errors import MieInputError
from .encoders import build_encoders
from .head import ClassifierHead
from .multimodal import LateFusionModel, modality_heads

FEATURE_FUSIONS = ("concat", "mean", "max", "sum")
FUSED = "fused"           # the fused head's name in logs and blend weights


class MultiHeadModel(LateFusionModel):
    """``forward(xs)`` → {m: z_m}; ``outputs(xs)`` → ({m: z_m}, z_fused), each (B, K) logits."""

    def __init__(self, encoders, heads, fused_head, feature_fusion="concat"):
        super().__init__(encoders, heads)
        if FUSED in encoders:
            raise MieInputError(f"a modality may not be called '{FUSED}': the name is taken by the fused head")
        if feature_fusion not in FEATURE_FUSIONS:
            raise MieInputError(f"unknown feature_fusion '{feature_fusion}'; expected one of {FEATURE_FUSIONS}")
        self.fused_head = fused_head
        self.feature_fusion = feature_fusion

    def fused_logits(self, feats):
        """z_fused = g(fused features) from ``features()``."""
        values = [feats[m] for m in self.modalities]
        if self.feature_fusion == "concat":
            return self.fused_head(torch.cat(values, dim=-1))
        stacked = torch.stack(values)
        pooled = {"mean": lambda: stacked.mean(dim=0), "max": lambda: stacked.max(dim=0).values,
                  "sum": lambda: stacked.sum(dim=0)}[self.feature_fusion]()
        return self.fused_head(pooled)

    def outputs_from_features(self, feats):
        return {m: self.heads[m](feats[m]) for m in self.modalities}, self.fused_logits(feats)

    def outputs(self, xs):
        return self.outputs_from_features(self.features(xs))

    @classmethod
    def build(cls, spec, feature_fusion="concat"):
        width = spec.dim * len(spec.modalities) if feature_fusion == "concat" else spec.dim
        return cls(build_encoders(spec), modality_heads(spec),
                   ClassifierHead(width, spec.num_classes, spec.head_hidden), feature_fusion)
