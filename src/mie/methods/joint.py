"""Joint training: the baseline every balancing method is compared with.

All modalities are trained together on one cross-entropy, with one optimizer over all parameters.
``fusion`` picks where the modalities meet:

    "average" (default), "weight" — late fusion: one head h_m per modality,
        z = (1/m) Σ_m h_m(φ_m(x_m)),    L = CE(z, y).
        "average" predicts softmax(z); "weight" predicts the per-sample entropy-weighted mean of the
        per-modality softmaxes (``mie.models.fusion``). Modality m's accuracy is h_m(φ_m(x_m)) alone.
    "concat" — feature (mid) fusion: one shared head h on the concatenated features,
        z = h([φ_1(x_1); …; φ_m(x_m)]),  h: FC(m·d, …) → … → FC(·, K),    L = CE(z, y).
    "sum" — feature fusion: one shared head on the summed features,
        z = h(Σ_m φ_m(x_m)),  h: FC(d, …) → … → FC(·, K),    L = CE(z, y).

With a shared head a modality has no head of its own, so modality m's own prediction is the shared
head on its features with every other modality's features set to zero:
concat: h([0; …; φ_m(x_m); …; 0]),  sum: h(φ_m(x_m)). This is how OGM-GE reads per-modality outputs
from a concatenation layer (its out_m uses modality m's block of the weight); the head's biases stay
in, and for a non-linear head it is the head's response to "only modality m present".
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MieInputError
from ..models import ClassifierHead, build_encoders
from .base import Method

LATE_FUSIONS = ("average", "weight")
FEATURE_FUSIONS = ("concat", "sum")


class SharedHeadModel(nn.Module):
    """Encoders φ_m and ONE head h on fused features: ``forward(xs)`` → fused logits (B, K)."""

    def __init__(self, encoders, head, mode):
        super().__init__()
        if mode not in FEATURE_FUSIONS:
            raise MieInputError(f"unknown feature fusion '{mode}'; expected one of {FEATURE_FUSIONS}")
        self.encoders = nn.ModuleDict(encoders)
        self.head = head
        self.mode = mode

    @property
    def modalities(self):
        return list(self.encoders)

    def features(self, xs):
        """{m: φ_m(x_m) (B, d)}."""
        return {m: self.encoders[m](xs[m]) for m in self.modalities}

    def combine(self, feats):
        """Fused features: concatenation (B, m·d) in modality order, or the sum (B, d)."""
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
        encoders = build_encoders(spec)
        width = spec.dim * len(spec.modalities) if mode == "concat" else spec.dim
        return cls(encoders, ClassifierHead(width, spec.num_classes, spec.head_hidden), mode)


class Joint(Method):
    name = "joint"

    def __init__(self, fusion="average"):
        if fusion not in LATE_FUSIONS + FEATURE_FUSIONS:
            raise MieInputError(f"unknown fusion '{fusion}' for joint training; expected one of "
                                f"{', '.join(LATE_FUSIONS + FEATURE_FUSIONS)}")
        super().__init__(fusion=fusion)

    @property
    def shared_head(self):
        return self.fusion in FEATURE_FUSIONS

    def build_model(self, spec):
        return SharedHeadModel.build(spec, self.fusion) if self.shared_head else super().build_model(spec)

    def setup(self, model, ctx):
        super().setup(model, ctx)
        self.optimizer = ctx.make_optimizer(model.parameters())

    def train_step(self, xs, y):
        if self.shared_head:
            z = self.model(xs)
        else:
            z = torch.stack(list(self.model(xs).values())).mean(dim=0)
        loss = F.cross_entropy(z, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def predict(self, xs):
        if not self.shared_head:
            return super().predict(xs)
        feats = self.model.features(xs)
        fused = F.softmax(self.model.head(self.model.combine(feats)).float(), dim=-1)
        per_modality = {m: F.softmax(z.float(), dim=-1) for m, z in self.model.modality_logits(feats).items()}
        return fused, per_modality

    def fuse(self, logits, probs):
        if self.fusion == "average":  # the rule the model was trained with: softmax of mean logits
            return F.softmax(torch.stack(list(logits.values())).float().mean(dim=0), dim=-1)
        return super().fuse(logits, probs)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
