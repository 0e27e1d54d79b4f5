"""One encoder φ_m and one head h_m per modality; predictions are fused only at inference."""
from torch import nn

from .encoders import build_encoders
from .head import ClassifierHead


class LateFusionModel(nn.Module):
    """``forward({m: x_m})`` → ``{m: logits_m}`` with logits_m = h_m(φ_m(x_m)), each (B, K)."""

    def __init__(self, encoders, heads):
        super().__init__()
        if list(encoders) != list(heads):
            raise ValueError("encoders and heads must name the same modalities in the same order")
        self.encoders = nn.ModuleDict(encoders)
        self.heads = nn.ModuleDict(heads)

    @property
    def modalities(self):
        return list(self.encoders)

    def modality_parameters(self, m):
        """θ_m: the parameters of modality m's encoder and head."""
        return list(self.encoders[m].parameters()) + list(self.heads[m].parameters())

    def forward_modality(self, m, x):
        return self.heads[m](self.encoders[m](x))

    def forward(self, xs):
        return {m: self.forward_modality(m, xs[m]) for m in self.modalities}

    @classmethod
    def build(cls, spec):
        """Build from a ``ModelSpec`` (input shapes, encoder names, dim, classes, head widths)."""
        encoders = build_encoders(spec)
        heads = {m: ClassifierHead(spec.dim, spec.num_classes, spec.head_hidden) for m in spec.modalities}
        return cls(encoders, heads)
