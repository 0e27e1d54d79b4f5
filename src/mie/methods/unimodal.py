"""Unimodal training: one modality alone, the reference every multimodal method should beat.

The run's data holds exactly one modality u (``--modalities NAME`` / ``data.modalities: [NAME]``);
its encoder φ_u and head h_u are trained on

    z = h_u(φ_u(x_u)),    L = CE(z, y)

with one optimizer. The prediction is softmax(z), which is also the modality's own prediction.
(The "Unimodal" rows of the balancing papers' tables are one such run per modality.)
"""
import torch.nn.functional as F

from ..errors import MieInputError
from .base import Method


def _check_one(name, modalities):
    if len(modalities) != 1:
        raise MieInputError(f"method '{name}' trains one modality alone, but the data has {len(modalities)}: "
                            f"{', '.join(modalities)}; pass --modalities NAME (config: data.modalities: [NAME]) "
                            f"with one of them")


class Unimodal(Method):
    name = "unimodal"

    def __init__(self, fusion="average"):
        super().__init__(fusion=fusion)

    def build_model(self, spec):
        _check_one(self.name, list(spec.modalities))
        return super().build_model(spec)

    def setup(self, model, ctx):
        _check_one(self.name, list(model.modalities))
        super().setup(model, ctx)
        self.modality = model.modalities[0]
        self.optimizer = ctx.make_optimizer(model.parameters())

    def train_step(self, xs, y):
        m = self.modality
        loss = F.cross_entropy(self.model.forward_modality(m, xs[m]), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
