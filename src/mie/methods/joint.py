"""Joint training: the baseline every balancing method is compared with.

All modalities are trained together on one cross-entropy, with one optimizer over all parameters.
``feature_fusion`` picks where the modalities meet:

    "late" (default) — one head h_m per modality,
        z = (1/M) Σ_m h_m(φ_m(x_m)),    L = CE(z, y).      Modality m's own logits: h_m(φ_m(x_m)).
    "concat" — one shared head h on the concatenated features,
        z = h([φ_1(x_1); …; φ_M(x_M)]),  h: FC(M·d, …) → … → FC(·, K),    L = CE(z, y).
    "sum" — one shared head on the summed features,
        z = h(Σ_m φ_m(x_m)),  h: FC(d, …) → … → FC(·, K),    L = CE(z, y).

With a shared head a modality has no head of its own, so modality m's own prediction is the shared
head on its features with every other modality's features set to zero:
concat: h([0; …; φ_m(x_m); …; 0]),  sum: h(φ_m(x_m)). This is how OGM-GE reads per-modality outputs
from a concatenation layer (its out_m uses modality m's block of the weight); the head's biases stay
in, and for a non-linear head it is the head's response to "only modality m present".

Inference (``fusion``): "model" (default) predicts softmax(z), the rule the model was trained with;
"average" and "weight" fuse the per-modality predictions (``mie.models.fusion``).
"""
import torch
import torch.nn.functional as F

from ..models import FUSIONS, SharedHeadModel
from .base import SingleOptimizerMethod, fusion_param
from .params import Param, one_of


class Joint(SingleOptimizerMethod):
    name = "joint"
    params = {"fusion": fusion_param("model", FUSIONS),
              "feature_fusion": Param("late", one_of("late", "concat", "sum"),
                                      "where modalities meet: late (a head each) | concat | sum (one shared head)")}

    @property
    def shared_head(self):
        return self.feature_fusion != "late"

    def build_model(self, spec):
        return SharedHeadModel.build(spec, self.feature_fusion) if self.shared_head else super().build_model(spec)

    def fused_logits(self, per_modality_logits):
        """z = (1/M) Σ_m z_m of a late-fusion model."""
        return torch.stack(list(per_modality_logits.values())).mean(dim=0)

    def training_step(self, batch, step):
        xs, y = batch
        z = self.model(xs) if self.shared_head else self.fused_logits(self.model(xs))
        loss = F.cross_entropy(z, y)
        self.minimize(loss)
        return {"loss": loss.detach()}

    def logits(self, xs):
        if self.shared_head:
            feats = self.model.features(xs)
            return self.model.modality_logits(feats), self.model.head(self.model.combine(feats))
        per = self.model(xs)
        return per, self.fused_logits(per)
