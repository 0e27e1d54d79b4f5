"""Unimodal training: one modality alone, the reference every multimodal method should beat.

The run's data holds exactly one modality u (``--modalities NAME`` / ``data.modalities: [NAME]``);
its encoder φ_u and head h_u are trained on

    z = h_u(φ_u(x_u)),    L = CE(z, y)

with one optimizer. The prediction is softmax(z), which is also the modality's own prediction.
(The "Unimodal" rows of the balancing papers' tables are one such run per modality.)
"""
import torch.nn.functional as F

from ..errors import MieInputError
from .base import SingleOptimizerMethod


def _check_one(name, modalities):
    if len(modalities) != 1:
        raise MieInputError(f"method '{name}' trains one modality alone, but the data has {len(modalities)}: "
                            f"{', '.join(modalities)}; pass --modalities NAME (config: data.modalities: [NAME]) "
                            f"with one of them")


class Unimodal(SingleOptimizerMethod):
    name = "unimodal"
    params = {}
    fusion = "average"          # of one modality: its own prediction

    def build_model(self, spec):
        _check_one(self.name, list(spec.modalities))
        return super().build_model(spec)

    def setup(self, model, ctx):
        _check_one(self.name, list(model.modalities))
        super().setup(model, ctx)

    def training_step(self, batch, step):
        xs, y = batch
        (m,) = self.model.modalities
        loss = F.cross_entropy(self.model.forward_modality(m, xs[m]), y)
        self.minimize(loss)
        return {"loss": loss.detach()}
