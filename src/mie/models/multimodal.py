"""The skeleton every multimodal model shares: one encoder φ_m per modality, named by modality."""
from torch import nn

from .encoders import build_encoders
from .head import ClassifierHead


class MultimodalModel(nn.Module):
    """Encoders φ_m: (B, *shape_m) → (B, d); subclasses add heads and fusion layers."""

    def __init__(self, encoders):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)

    @property
    def modalities(self):
        return list(self.encoders)

    def features(self, xs):
        """{m: φ_m(x_m) (B, d)} for the modalities in ``xs`` ({m: (B, ...)})."""
        return {m: self.encoders[m](xs[m]) for m in self.modalities}


def modality_heads(spec, width=None):
    """{m: ClassifierHead(width or d → … → K)} for every modality of a ``ModelSpec``."""
    return {m: ClassifierHead(width or spec.dim, spec.num_classes, spec.head_hidden) for m in spec.modalities}


class LateFusionModel(MultimodalModel):
    """``forward({m: x_m})`` → ``{m: logits_m}`` with logits_m = h_m(φ_m(x_m)), each (B, K)."""

    def __init__(self, encoders, heads):
        super().__init__(encoders)
        if list(encoders) != list(heads):
            raise ValueError("encoders and heads must name the same modalities in the same order")
        self.heads = nn.ModuleDict(heads)

    def modality_parameters(self, m):
        """θ_m: the parameters of modality m's encoder and head."""
        return list(self.modality_modules(m).parameters())

    def modality_modules(self, m):
        """Modality m's encoder and head, the modules ``forward_modality(m, ·)`` runs."""
        return nn.ModuleList([self.encoders[m], self.heads[m]])

    def forward_modality(self, m, x):
        return self.heads[m](self.encoders[m](x))

    def forward(self, xs):
        return {m: self.forward_modality(m, xs[m]) for m in self.modalities}

    @classmethod
    def build(cls, spec, *args, **kwargs):
        """Build from a ``ModelSpec`` (input shapes, encoder names, dim, classes, head widths);
        subclasses take their own extra arguments after ``spec``."""
        return cls(build_encoders(spec), modality_heads(spec), *args, **kwargs)


class EnsembleHeadsModel(LateFusionModel):
    """A late-fusion model with a second head g_m per modality for the fused prediction: h_m(φ_m(x_m))
    is modality m's own prediction (``forward_modality``), Σ_m g_m(φ_m(x_m)) the fused logits (B, K)
    (``fused_logits``); both heads read the same features φ_m(x_m)."""

    def __init__(self, encoders, heads, ensemble_heads):
        super().__init__(encoders, heads)
        if list(encoders) != list(ensemble_heads):
            raise ValueError("encoders and ensemble heads must name the same modalities in the same order")
        self.ensemble_heads = nn.ModuleDict(ensemble_heads)

    def modality_modules(self, m):
        """Modality m's encoder, its own head and its ensemble head."""
        return nn.ModuleList([self.encoders[m], self.heads[m], self.ensemble_heads[m]])

    def both_heads(self, m, x):
        """(h_m(φ_m(x)), g_m(φ_m(x))), each (B, K), from one pass of the encoder."""
        features = self.encoders[m](x)
        return self.heads[m](features), self.ensemble_heads[m](features)

    def ensemble_modality(self, m, x):
        """g_m(φ_m(x)) (B, K): modality m's share of the fused logits."""
        return self.ensemble_heads[m](self.encoders[m](x))

    def fused_logits(self, xs, modalities=None):
        """Σ_m g_m(φ_m(x_m)) (B, K) over ``modalities`` (default: all)."""
        return sum(self.ensemble_modality(m, xs[m]) for m in (modalities or self.modalities))

    @classmethod
    def build(cls, spec, *args, **kwargs):
        return cls(build_encoders(spec), modality_heads(spec), modality_heads(spec), *args, **kwargs)
