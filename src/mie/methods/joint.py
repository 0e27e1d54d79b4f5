"""Joint training: the baseline every balancing method is compared with.

All modalities are trained together on one cross-entropy, with one optimizer over all parameters.
``feature_fusion`` picks where the modalities meet:

    "late" (default) — one head h_m per modality, the SUM of their logits:
        z = Σ_m h_m(φ_m(x_m)),    L = CE(z, y).      Modality m's own logits: z_m = h_m(φ_m(x_m)).
    "concat" — one shared head h on the concatenated features,
        z = h([φ_1(x_1); …; φ_M(x_M)]),  h: FC(M·d, …) → … → FC(·, K),    L = CE(z, y).
    "sum" — one shared head on the summed features,
        z = h(Σ_m φ_m(x_m)),  h: FC(d, …) → … → FC(·, K),    L = CE(z, y).

Why the sum for "late": it is the additive decomposition of the authors' fusion layers that the
balancing methods are built on. A one-Linear concatenation layer is out = W[φ_a; φ_v] + b =
out_a + out_v with out_u = W_u φ_u + b/2 (GeWu-Lab/OGM-GE_CVPR2022 main.py lines 88-93), their
sum fusion is out = fc_x(φ_a) + fc_y(φ_v) (GeWu-Lab/OGM-GE_CVPR2022 models/fusion_modules.py
line 12, GeWu-Lab/BML_TPAMI2024 code/models/fusion_model.py line 13; OGM-GE supplementary eq. 1:
f(x) = W_a φ_a + b_a + W_v φ_v + b_v). OGM-GE, OPM and OPM+OGM train on this same z through
``late_fusion_logits`` (MSLR too sums the logits), so with their modulation off (α = 0 and no
noise; p_exe = 0) they train exactly like ``joint`` — one joint baseline, not two. (A mean of the logits
would be the sum at temperature M: a different baseline, which ``mie`` does not offer.)

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


def late_fusion_logits(per_modality_logits):
    """z = Σ_m z_m: {m: (B, K)} → (B, K). The one late-fusion rule of ``joint`` and of the methods
    that modulate it (OGM-GE, OPM, OPM+OGM), so that they agree bit for bit when they do not modulate."""
    return torch.stack(list(per_modality_logits.values())).sum(dim=0)


class Joint(SingleOptimizerMethod):
    name = "joint"
    params = {"fusion": fusion_param("model", FUSIONS),
              "feature_fusion": Param("late", one_of("late", "concat", "sum"),
                                      "where modalities meet: late (a head each, logits summed) | concat | sum "
                                      "(one shared head)")}

    @property
    def shared_head(self):
        return self.feature_fusion != "late"

    def build_model(self, spec):
        return SharedHeadModel.build(spec, self.feature_fusion) if self.shared_head else super().build_model(spec)

    def fuse_logits(self, per_logits):
        """z = Σ_m z_m of a late-fusion model; None with a shared head."""
        return None if self.shared_head else late_fusion_logits(per_logits)

    def training_step(self, batch, step):
        xs, y = batch
        z = self.model(xs) if self.shared_head else self.fuse_logits(self.model(xs))
        loss = F.cross_entropy(z, y)
        self.minimize(loss)
        return {"loss": loss.detach()}

    def logits(self, xs):
        if self.shared_head:
            feats = self.model.features(xs)
            return self.model.modality_logits(feats), self.model.head(self.model.combine(feats))
        per = self.model(xs)
        return per, self.fuse_logits(per)
