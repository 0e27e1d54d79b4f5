"""OPM — On-the-fly Prediction Modulation.

Wei, Hu, Du, Wen: "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
(arXiv 2410.11582; code: GeWu-Lab/BML_TPAMI2024, cited below as BML: ``code/main.py`` lines as
main:N, ``code/models/Classifier.py`` lines as Cls:N).

Model and objective as in OGM-GE (``mie.methods.ogm_ge``) and ``joint``: one encoder φ_u and head h_u
per modality, one optimizer, CE on the SUM of per-modality logits (BML's one-Linear concatenation
layer is the sum of the per-modality parts, Cls:139-140). OPM weakens the dominant modality in the
FEED-FORWARD pass by dropping its features with a probability that grows with its lead.

Per mini-batch, from the undropped features f_u = φ_u(x_u) and logits z_u = h_u(f_u) (no gradient;
Cls:139-143, where z_u = f_u W_u^T + b/2):

    s_u = Σ_i softmax(z_u,i)[y_i],    ρ_u = s_u / mean_{v≠u} s_v          (m = 2: s_a / s_v, Cls:61-62)
    q_u = clip(q_base · (1 + λ · tanh(relu(ρ_u − 1))), 0, 1)   if ρ_u > 1,  else q_u = 0   (Cls:58-72)

Then, with probability ``p_exe`` (one draw per step, Cls:34: executed when U[0,1) ≥ 1 − p_exe), the
drop is executed: each sample i keeps modality u's whole feature vector with probability 1 − q_u
(κ_u,i ~ Bernoulli(1 − q_u), Cls:45-48), and the kept features are rescaled (``rescale``):

    "shared" (default, the released code, Cls:38-49): EVERY modality's features, dropped or not,
        f̃_u,i = κ_u,i · f_u,i / (1 − θ),    θ = Σ_u d_u q_u / Σ_u d_u    (d_u the feature size; here
        all d_u are equal, so θ is the mean of the q_u: θ = q/2 for two modalities). The code's
        ``custom_autograd`` passes the gradient through the same 1/(1 − θ) (Cls:9-21), i.e. a plain
        division.
    "modality" (ours): inverted dropout per modality, f̃_u,i = κ_u,i · f_u,i / (1 − q_u) for the
        dropped modalities only (E[f̃_u] = f_u), the undropped ones unchanged.

The loss is L = CE(Σ_u h_u(f̃_u), y) (main:104). A dropped sample's head sees the zero vector, so
h_u(0) (the head's bias path) is what remains of the modality, as the authors' concatenation layer
keeps its bias. When the drop is not executed, or outside the window, L = CE(Σ_u z_u, y): a ``joint``
step. The code removes samples whose every modality was dropped (main:95-101, Cls:51-52); none
arise: the weakest modality has ρ ≤ 1, so q = 0 for it (for m = 2 the code has the same property).
For m ≥ 3 the ratio to the mean of the others is ours.

Window: loop epochs ``modulation_starts <= epoch < modulation_ends``. Default: from epoch 6 to the
end of the budget — the code's warm-up, ``warm_up = 1 if epoch <= 5`` (main:91), during which
nothing is dropped (Cls:145); its ``--modulation_ends`` bounds only OGM (main:154), never OPM. A run
of 6 epochs or fewer therefore never drops anything; ``notices()`` says so.

Random draws come from the method's own generator, in this order: the execute draw
u ~ U[0, 1) (executed when u ≥ 1 − p_exe, Cls:34), then, if executed, the keep mask as one
``torch.bernoulli`` draw of shape (B, M) with probabilities 1 − q_u, sample-major, modalities in
``model.modalities`` order (Cls:45's ``Bernoulli(1 - q).sample([B, 1])``, the undropped modalities
included with probability 1). The code draws u with numpy and the mask with torch's global
generator; the operations are the same, only the generator is the method's own.

Defaults from the authors' code: q_base = 0.5, λ = 0.5, p_exe = 0.7 (main:42-44 and
``scripts/train_opm.sh``; ``config.py`` holds q_base = 0.4, but main.py's argparse values override
it), rescale "shared", warm-up 6 epochs. The paper's text was not available here to compare.

Inference (``fusion``) as in OGM-GE: "model" (default) is softmax(Σ_u z_u) on the undropped features
(nothing is dropped at inference, Cls:153 with warm_up=1 at validation, main:193); "average" and
"weight" fuse the per-modality predictions.

Logged per step (averaged per epoch by the loop): ``opm_ratio_<m>``, ``opm_q_<m>`` (0 outside the
window) and ``opm_executed`` (the fraction of steps whose drop was executed).
"""
import math

import torch
import torch.nn.functional as F

from .joint import late_fusion_logits
from .ogm_ge import OnTheFlyModulation, discrepancy_ratios, modality_scores
from .params import Param, Space, number, one_of
from .window import WINDOW_PARAMS

RESCALES = ("shared", "modality")

OPM_PARAMS = {
    "q_base": Param(0.5, number(at_least=0, at_most=1), "base drop probability q_base",
                    Space("float", 0.1, 0.9)),  # ours; holds the authors' 0.4 (config.py) and 0.5 (main.py)
    "lam": Param(0.5, number(at_least=0), "λ: how fast q grows with the dominant modality's lead",
                 Space("log", 0.05, 5.0)),      # ours: a decade each side
    "p_exe": Param(0.7, number(at_least=0, at_most=1), "probability that a step executes the drop",
                   Space("float", 0.4, 1.0)),   # ours
    "rescale": Param("shared", one_of(*RESCALES),
                     "every modality's features × 1/(1 − θ), θ = mean q (the released code) | "
                     "kept features × 1/(1 − q_u) per dropped modality (ours)"),
}

# The released code's warm-up: nothing is dropped in epochs 0-5 (main.py:91).
OPM_WINDOW_PARAMS = {
    **WINDOW_PARAMS,
    "modulation_starts": Param(6, number(at_least=0, integer=True),
                               "first loop epoch (0-based) that modulates; 6 = the released code's warm-up "
                               "of epochs 0-5"),
}


def drop_probabilities(ratios, q_base, lam):
    """q_u = clip(q_base·(1 + λ·tanh(relu(ρ_u − 1))), 0, 1) for ρ_u > 1, else 0: {m: ρ} → {m: q}."""
    out = {}
    for u, r in ratios.items():
        q = q_base * (1.0 + lam * math.tanh(max(r - 1.0, 0.0)))
        out[u] = min(max(q, 0.0), 1.0) if r > 1.0 else 0.0
    return out


def drop_mask(q, batch_size, generator=None, device=None):
    """Keep mask κ (B, M), κ[i, u] ~ Bernoulli(1 − q_u), for q = [q_1..q_M] in modality order: one
    ``torch.bernoulli`` draw of B·M values, sample-major — the released code's
    ``Bernoulli(1 − q).sample([B, 1])`` (Cls:45). A modality with q_u = 0 is always kept."""
    keep = torch.tensor([1.0 - v for v in q], dtype=torch.float32, device=device)
    return torch.bernoulli(keep.expand(batch_size, len(q)), generator=generator)


class OPM(OnTheFlyModulation):
    name = "opm"
    rule = "OPM"
    params = {**OPM_PARAMS, **OnTheFlyModulation.params, **OPM_WINDOW_PARAMS}

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
            executed = bool(draw >= 1.0 - self.p_exe) and any(v > 0 for v in q.values())    # Cls:34
        if not executed:
            return late_fusion_logits(logits), logits, ratios, q, False
        mods = model.modalities
        mask = drop_mask([q[m] for m in mods], y.shape[0], self.generator, self.generator.device)
        if self.rescale == "shared":
            sizes = {m: feats[m][0].numel() for m in mods}
            theta = sum(sizes[m] * q[m] for m in mods) / sum(sizes.values())           # Cls:39-41
        terms = {}
        for j, m in enumerate(mods):
            f = feats[m]
            keep = mask[:, j].to(device=f.device, dtype=f.dtype).view(-1, *([1] * (f.dim() - 1)))
            if self.rescale == "shared":
                terms[m] = model.heads[m](f * keep / (1.0 - theta))                          # Cls:47-49
            elif q[m] > 0:
                terms[m] = model.heads[m](f * keep / (1.0 - q[m]) if q[m] < 1 else f * keep)
            else:
                terms[m] = logits[m]
        return late_fusion_logits(terms), logits, ratios, q, True

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
