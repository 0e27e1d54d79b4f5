"""Joint training with late fusion: the baseline every balancing method is compared with.

All modalities are trained together on one cross-entropy of the fused logits,

    z = (1/m) Σ_m h_m(φ_m(x_m)),    L = CE(z, y),

with one optimizer over all parameters. The prediction is softmax(z); modality m's own accuracy
is read from h_m(φ_m(x_m)) alone.
"""
import torch
import torch.nn.functional as F

from .base import Method


class Joint(Method):
    name = "joint"

    def __init__(self, fusion="average"):
        super().__init__(fusion=fusion)

    def setup(self, model, ctx):
        super().setup(model, ctx)
        self.optimizer = ctx.make_optimizer(model.parameters())

    def train_step(self, xs, y):
        logits = self.model(xs)
        loss = F.cross_entropy(torch.stack(list(logits.values())).mean(dim=0), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def fuse(self, logits, probs):
        if self.fusion == "average":  # the rule the model was trained with: softmax of mean logits
            return F.softmax(torch.stack(list(logits.values())).float().mean(dim=0), dim=-1)
        return super().fuse(logits, probs)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
