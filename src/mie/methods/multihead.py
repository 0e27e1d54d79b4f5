"""What MSES and OGR-GB share: a late-fusion model with a head per modality AND a fused head, and a
no-gradient pass that measures every output's loss and accuracy on a split.

``MultiHeadModel`` — encoders φ_m (output size d), one head h_m per modality and one fused head g on
the concatenated features, as in Wang et al.'s late-concat audio-visual network with uni-modal
auxiliary heads (G-Blend) and Fujimori et al.'s multitask model (modality-specific classifiers plus a
multimodal classifier):

    f_m = φ_m(x_m),    z_m = h_m(f_m),    z_fused = g([f_1; …; f_M]),

    forward(xs) → {m: z_m for each modality, "fused": z_fused}     (each (B, K) logits)

h_m: FC(d, …) → … → FC(·, K) and g: FC(M·d, …) → … → FC(·, K), both ``ClassifierHead`` with the
model's ``head_hidden`` widths. The fused prediction is softmax(z_fused); modality m's own
prediction is softmax(z_m).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MieInputError
from ..models import ClassifierHead, build_encoders

FUSED = "fused"


class MultiHeadModel(nn.Module):
    """Encoders φ_m, heads h_m and a fused head g on [φ_1; …; φ_M] (see the module docstring)."""

    def __init__(self, encoders, heads, fused_head):
        super().__init__()
        if list(encoders) != list(heads):
            raise ValueError("encoders and heads must name the same modalities in the same order")
        if FUSED in encoders:
            raise MieInputError(f"a modality may not be called '{FUSED}': the name is taken by the fused head")
        self.encoders = nn.ModuleDict(encoders)
        self.heads = nn.ModuleDict(heads)
        self.fused_head = fused_head

    @property
    def modalities(self):
        return list(self.encoders)

    @property
    def outputs(self):
        """The names of the outputs ``forward`` returns: the modalities, then "fused"."""
        return self.modalities + [FUSED]

    def modality_parameters(self, m):
        """θ_m: the parameters of modality m's encoder and head (not the fused head)."""
        return list(self.encoders[m].parameters()) + list(self.heads[m].parameters())

    def features(self, xs):
        return {m: self.encoders[m](xs[m]) for m in self.modalities}

    def heads_from_features(self, feats):
        """{m: h_m(f_m)} and "fused": g([f_1; …; f_M]) from ``features()`` (modality order)."""
        out = {m: self.heads[m](feats[m]) for m in self.modalities}
        out[FUSED] = self.fused_head(torch.cat([feats[m] for m in self.modalities], dim=-1))
        return out

    def forward(self, xs):
        return self.heads_from_features(self.features(xs))

    @classmethod
    def build(cls, spec):
        encoders = build_encoders(spec)
        heads = {m: ClassifierHead(spec.dim, spec.num_classes, spec.head_hidden) for m in spec.modalities}
        fused = ClassifierHead(spec.dim * len(spec.modalities), spec.num_classes, spec.head_hidden)
        return cls(encoders, heads, fused)


@torch.no_grad()
def multihead_predict(model, xs):
    """(softmax(z_fused), {m: softmax(z_m)}) — the ``Method.predict`` of a ``MultiHeadModel``."""
    out = model(xs)
    return (F.softmax(out[FUSED].float(), dim=-1),
            {m: F.softmax(out[m].float(), dim=-1) for m in model.modalities})


@torch.no_grad()
def output_metrics(model, batches):
    """Mean cross-entropy and accuracy of every output of ``model`` over ``batches``.

    ``model(xs)`` must return {name: logits (B, K)}; ``batches`` yields (xs, y). The model runs in
    eval mode (BatchNorm running statistics, no dropout; its mode is restored afterwards) and the
    means are over samples (Σ_i CE_i / N, accumulated in float64), not over batches.
    Returns {name: {"loss": float, "accuracy": float}}.
    """
    was_training = model.training
    model.eval()
    loss, correct, n = {}, {}, 0
    try:
        for xs, y in batches:
            for k, z in model(xs).items():
                z = z.float()
                loss[k] = loss.get(k, 0.0) + F.cross_entropy(z, y, reduction="sum").double().item()
                correct[k] = correct.get(k, 0) + int((z.argmax(dim=-1) == y).sum().item())
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise MieInputError("cannot measure losses on an empty split (no batches)")
    return {k: {"loss": loss[k] / n, "accuracy": correct[k] / n} for k in loss}
