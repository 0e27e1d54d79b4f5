"""OPM — On-the-fly Prediction Modulation.

Wei, Hu, Du, Wen: "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
(code: GeWu-Lab/BML_TPAMI2024, ``models/Classifier.py``: ``calcu_q`` and ``Modality_drop``).

Model and objective as in OGM-GE (``mie.methods.ogm_ge``): one encoder φ_u and head h_u per
modality, one optimizer, CE on the sum of per-modality logits. OPM weakens the dominant modality in
the FEED-FORWARD pass by dropping its features with a probability that grows with its lead.

Per mini-batch, from the undropped features f_u = φ_u(x_u) and logits z_u = h_u(f_u) (no gradient):

    s_u = Σ_i softmax(z_u,i)[y_i],    ρ_u = s_u / mean_{v≠u} s_v          (as in OGM-GE; m = 2: s_a/s_v)
    q_u = clip(q_base · (1 + λ · tanh(relu(ρ_u − 1))), 0, 1)   if ρ_u > 1,  else q_u = 0

Then, with probability ``p_exe`` (one draw per step), the drop is executed: for each modality u with
q_u > 0, each sample i keeps its whole feature vector with probability 1 − q_u,

    κ_u,i ~ Bernoulli(1 − q_u),    f̃_u,i = κ_u,i · f_u,i / (1 − q_u)        (``rescale="modality"``)

and the loss is L = CE(Σ_u h_u(f̃_u), y) with f̃_v = f_v for the modalities that are not dropped. A
dropped sample's head sees the zero vector (so h_u(0), the head's bias path, is what remains of the
modality, as the authors' concat layer keeps its bias). When the drop is not executed, or outside
the window ``modulation_starts <= epoch < modulation_ends``, L = CE(Σ_u z_u, y), plain joint training.

The weakest modality always has ρ ≤ 1, so at least one modality is never dropped and no sample
loses all its modalities (the authors' code removes such samples; here none arise).

``rescale``: "modality" (default) is inverted dropout per modality, E[κ_u/(1−q_u)] = 1, the
1/(1−q) of the paper's description. "shared" reproduces the released code: every modality's
features (dropped or not) are divided by 1 − θ with θ = Σ_u d_u q_u / Σ_u d_u, d_u the feature size
(here all d_u are equal, so θ is the mean of the q_u).

Random draws come from the method's own generator, in this order: the execute draw
u ~ U[0, 1) (executed when u < p_exe), then, if executed, one U[0, 1) per sample for each modality with
q_u > 0 in ``model.modalities`` order (sample i is dropped when its draw is < q_u).

Defaults from the authors' code: q_base = 0.5, λ = 0.5, p_exe = 0.7 (``main.py`` argparse defaults and
``scripts/train_opm.sh``; ``config.py`` holds q_base = 0.4). Their ``main.py`` also skips OPM in epochs
0–5 as warm-up: ``modulation_starts=6`` reproduces that; the default here modulates from epoch 0.

Inference (``fusion``) as in OGM-GE: "model" (default) is softmax(Σ_u z_u) on the undropped features
(nothing is dropped at inference); "average" and "weight" fuse the per-modality predictions.

Logged per step (averaged per epoch by the loop): ``opm_ratio_<m>``, ``opm_q_<m>`` (0 outside the
window) and ``opm_executed`` (the fraction of steps whose drop was executed).
"""
import math

import torch
import torch.nn.functional as F

from .ogm_ge import OnTheFlyModulation, discrepancy_ratios, modality_scores
from .params import Param, number, one_of

RESCALES = ("modality", "shared")

OPM_PARAMS = {
    "q_base": Param(0.5, number(at_least=0, at_most=1), "base drop probability q_base"),
    "lam": Param(0.5, number(at_least=0), "λ: how fast q grows with the dominant modality's lead"),
    "p_exe": Param(0.7, number(at_least=0, at_most=1), "probability that a step executes the drop"),
    "rescale": Param("modality", one_of(*RESCALES),
                     "kept features × 1/(1 − q_u) per modality | × 1/(1 − θ) for all (the released code)"),
}


def drop_probabilities(ratios, q_base, lam):
    """q_u = clip(q_base·(1 + λ·tanh(relu(ρ_u − 1))), 0, 1) for ρ_u > 1, else 0: {m: ρ} → {m: q}."""
    out = {}
    for u, r in ratios.items():
        q = q_base * (1.0 + lam * math.tanh(max(r - 1.0, 0.0)))
        out[u] = min(max(q, 0.0), 1.0) if r > 1.0 else 0.0
    return out


def drop_samples(f, q, generator=None):
    """Keep mask κ (B,) with P(κ_i = 1) = 1 − q, one U[0,1) draw per sample; returns (f·κ, κ)."""
    u = torch.rand(f.shape[0], generator=generator, device=f.device)
    keep = (u >= q).to(f.dtype)
    return f * keep.view(-1, *([1] * (f.dim() - 1))), keep


class OPM(OnTheFlyModulation):
    name = "opm"
    params = {**OPM_PARAMS, **OnTheFlyModulation.params}

    def forward_opm(self, xs, y, step):
        """(fused logits used for the loss, undropped per-modality logits {m: z_m}, ratios, q, executed)."""
        model = self.model
        feats = model.features(xs)
        logits = {m: model.heads[m](f) for m, f in feats.items()}
        ratios = discrepancy_ratios(modality_scores(logits, y))
        active = self.active(step)
        q = drop_probabilities(ratios, self.q_base, self.lam) if active else {m: 0.0 for m in ratios}
        executed = False
        if active:
            draw = torch.rand((), generator=self.generator, device=self.generator.device)
            executed = bool(draw < self.p_exe) and any(v > 0 for v in q.values())
        if not executed:
            return sum(logits.values()), logits, ratios, q, False
        if self.rescale == "shared":
            sizes = {m: f[0].numel() for m, f in feats.items()}
            theta = sum(sizes[m] * q[m] for m in feats) / sum(sizes.values())
        terms = []
        for m in model.modalities:
            f = feats[m]
            if q[m] > 0:
                f, _ = drop_samples(f, q[m], self.generator)
                if self.rescale == "modality" and q[m] < 1:
                    f = f / (1.0 - q[m])
            if self.rescale == "shared":
                terms.append(model.heads[m](f / (1.0 - theta)))
            else:
                terms.append(model.heads[m](f) if q[m] > 0 else logits[m])
        return sum(terms), logits, ratios, q, True

    def training_step(self, batch, step):
        xs, y = batch
        z, logits, ratios, q, executed = self.forward_opm(xs, y, step)
        loss = F.cross_entropy(z, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logs = {"loss": loss.detach(), "opm_executed": float(executed)}
        logs.update({f"opm_ratio_{m}": r for m, r in ratios.items()})
        logs.update({f"opm_q_{m}": v for m, v in q.items()})
        logs.update(self.after_backward(ratios, step))
        self.optimizer.step()
        return logs

    def after_backward(self, ratios, step):
        """Hook between backward and the optimizer step (OPM+OGM modulates gradients here)."""
        return {}
