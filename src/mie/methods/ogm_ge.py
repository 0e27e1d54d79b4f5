"""OGM-GE — On-the-fly Gradient Modulation with Generalization Enhancement.

Peng, Wei, Deng, Wang, Hu: "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
CVPR 2022 (code: GeWu-Lab/OGM-GE_CVPR2022); extended in Wei, Hu, Du, Wen: "On-the-fly Modulation
for Balanced Multimodal Learning", TPAMI 2024 (code: GeWu-Lab/BML_TPAMI2024).

Model: one encoder φ_u and head h_u per modality u (``LateFusionModel``), trained jointly with one
optimizer on the cross-entropy of the SUM of the per-modality logits,

    z_u = h_u(φ_u(x_u)),    z = Σ_u z_u,    L = CE(z, y).

The sum (not the mean) is what matches the authors' decomposition: their fused output of a
concatenation/sum fusion layer is out = out_a + out_v with out_u = W_u φ_u + b/2, and each
modality's score is read from its own additive part out_u. Here z_u is exactly modality u's additive
part of z, so the scores below are taken from the same quantities that make up the fused logit.

Per mini-batch B_t (scores and ratios are computed without gradient):

    s_u = Σ_{i∈B_t} softmax(z_u,i)[y_i]
    ρ_u = s_u / ( (1/(m−1)) Σ_{v≠u} s_v )                        discrepancy ratio
    k_u = 1 − tanh(α · relu(ρ_u − c))   if ρ_u > 1,  else 1       c = ``ratio_offset``

For m = 2 the ratio is the paper's ρ_a = s_a / s_v exactly. For m ≥ 3 we divide by the MEAN score
of the other modalities (this library's rule; it reduces to the paper's for m = 2, and the weakest
modality always has ρ ≤ 1, so at least one modality is never modulated). Every modality with
ρ_u > 1 counts as dominant; for m = 2 that is the one with the larger score. (The authors' later
BalanceBenchmark code divides by the sum of the others for OPM and by the minimum score for OGM;
neither reduces to a single rule, so we do not follow them.)

``ratio_offset`` c: the default c = 1 makes k_u continuous at ρ_u = 1 (k → 1 as the modalities
become balanced), the same tanh(relu(ρ − 1)) shape the TPAMI code uses for OPM's drop
probability. c = 0 reproduces both released codes, ``1 − tanh(α · relu(ρ))`` (the CVPR code
comments it as the paper's eq. 10, "1 − tanh(α·ρ) if ρ > 1"), whose coefficient jumps from 1 to
1 − tanh(α) as ρ crosses 1.

After ``L.backward()``, for each modality u and each parameter θ of ENCODER φ_u (heads untouched):

    g ← k_u · g + ε,    ε ~ N(0, (std(g) + 1e-8)²) elementwise     (GE; std of the unscaled g)

with ε only when ``ge`` is on. ``ge="all"`` (default) adds ε to every modality's encoder
gradients, as both released codes do (k_u = 1 for the weaker modality, noise all the same);
``ge="dominant"`` adds it to the modulated modalities only; ``ge="off"`` is plain OGM. The
noise std is that of the UNSCALED gradient, as in the TPAMI code (``grad*coeff + N(0, grad.std())``
evaluates std before the assignment); the CVPR ``main.py`` scales in place first and so uses the
scaled gradient's std. Tensors with one element have no std and get no noise. ``scope="encoder"``
modulates every encoder tensor; ``scope="encoder_weights"`` only tensors with ≥ 2 dimensions, the
released codes' rule (they touch 4-D conv kernels only) generalised to Linear weights.

Modulation acts only in loop epochs ``modulation_starts <= epoch < modulation_ends`` (0-based;
``None``: to the end of the budget). Outside that window a step is plain joint training on z.
(The CVPR ``main.py`` tests ``starts >= epoch >= ends``, which never holds for 0 < 50, so that code
modulates every epoch; the TPAMI code uses ``starts <= epoch <= ends``, both ends included.)

Defaults and their source: α = 0.8 (OGM-GE README's recommendation for CREMA-D, MIE's main
benchmark; its README's VGGSound setting is 0.1; BML ``train_ogm.sh`` uses 0.8); modulation for the
whole budget (the OGM-GE README trains 100 epochs and modulates epochs 0–50; BML modulates 0–60 or
0–80 of 100 and skips epochs 0–5 as warm-up: set ``modulation_starts``/``modulation_ends`` to match).

Inference (``fusion``): "model" (default) predicts softmax(z) = softmax(Σ_u z_u), the rule the model
is trained with; "average" and "weight" fuse the per-modality predictions softmax(z_u)
(``mie.models.fusion``).

Logged per step and averaged per epoch by the loop: ``ogm_ratio_<m>`` (ρ_m) and ``ogm_coeff_<m>``
(the k_m actually applied; 1 outside the window).
"""
import math

import torch
import torch.nn.functional as F

from ..errors import MieInputError
from ..models import FUSIONS
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, number, one_of
from .window import WINDOW_PARAMS, check_window, in_window

GE_MODES = ("all", "dominant", "off")
SCOPES = ("encoder", "encoder_weights")

# OGM's hyper-parameters, shared with OPM + OGM
OGM_PARAMS = {
    "alpha": Param(0.8, number(at_least=0), "modulation strength α in k = 1 − tanh(α·relu(ρ − c))"),
    "ratio_offset": Param(1.0, number(at_least=0), "c: 1 for relu(ρ − 1), 0 for the released codes' relu(ρ)"),
    "ge": Param("all", one_of(*GE_MODES), "GE noise on every encoder | the modulated ones only | off (plain OGM)"),
    "scope": Param("encoder", one_of(*SCOPES), "modulate every encoder tensor | only tensors with >= 2 dims"),
}


# ---- the discrepancy measure, shared with OPM -------------------------------------------------
@torch.no_grad()
def modality_scores(logits, y):
    """s_u = Σ_i softmax(z_u,i)[y_i] for each modality: {m: (B, K) logits}, y (B,) → {m: 0-d tensor}."""
    return {m: F.softmax(z.detach().float(), dim=-1).gather(1, y.view(-1, 1)).sum() for m, z in logits.items()}


@torch.no_grad()
def discrepancy_ratios(scores, eps=1e-12):
    """ρ_u = s_u / mean_{v≠u} s_v (for two modalities s_a / s_v): {m: 0-d tensor} → {m: float}."""
    if len(scores) < 2:
        raise MieInputError("a discrepancy ratio needs at least two modalities")
    names = list(scores)
    values = torch.stack([scores[m] for m in names]).double()
    total, m = values.sum(), len(names)
    return {u: float(values[i] / ((total - values[i]) / (m - 1)).clamp_min(eps)) for i, u in enumerate(names)}


def ogm_coefficients(ratios, alpha, ratio_offset=1.0):
    """k_u = 1 − tanh(α · relu(ρ_u − ratio_offset)) for ρ_u > 1, else 1: {m: ρ} → {m: k}."""
    return {u: 1.0 - math.tanh(alpha * max(r - ratio_offset, 0.0)) if r > 1.0 else 1.0
            for u, r in ratios.items()}


@torch.no_grad()
def modulate_gradients(params, k, noise=True, generator=None, weights_only=False):
    """In place, for each parameter's gradient g: g ← k·g + ε, ε ~ N(0, (std(g) + 1e-8)²) with std
    taken before scaling (ε only when ``noise``; one-element tensors get none). ``weights_only``:
    leave tensors with fewer than 2 dimensions alone. Noise is drawn in parameter order."""
    for p in params:
        if p.grad is None or (weights_only and p.grad.dim() < 2):
            continue
        g = p.grad
        std = g.float().std() if g.numel() > 1 else None
        if k != 1.0:
            g.mul_(k)
        if noise and std is not None:
            eps = torch.randn(g.shape, generator=generator, device=g.device, dtype=torch.float32)
            g.add_((eps * (std + 1e-8)).to(g.dtype))


def apply_ogm(model, ratios, alpha, ratio_offset, ge, scope, generator, active=True):
    """OGM(-GE) on the gradients already in ``model``: scale each modality's encoder gradients by
    k_m (from ``ratios``) and add GE noise as ``ge`` says; nothing when not ``active``.
    Modalities are visited in ``model.modalities`` order. Returns the logs (ρ_m and applied k_m)."""
    coeffs = ogm_coefficients(ratios, alpha, ratio_offset) if active else {m: 1.0 for m in ratios}
    if active:
        for m in model.modalities:
            noise = ge == "all" or (ge == "dominant" and ratios[m] > 1.0)
            if coeffs[m] != 1.0 or noise:
                modulate_gradients(model.encoders[m].parameters(), coeffs[m], noise, generator,
                                   scope == "encoder_weights")
    logs = {f"ogm_ratio_{m}": r for m, r in ratios.items()}
    logs.update({f"ogm_coeff_{m}": k for m, k in coeffs.items()})
    return logs


class OnTheFlyModulation(SingleOptimizerMethod):
    """What OGM-GE, OPM and their combination share: joint training of a ``LateFusionModel`` on the
    sum of per-modality logits with one optimizer, a modulation window, a seeded random generator
    (saved with the run), and the summed logits as the model's fused output."""

    params = {**WINDOW_PARAMS, "fusion": fusion_param("model", FUSIONS)}

    @classmethod
    def check_params(cls, values):
        check_window(values)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        super().setup(model, ctx)
        # A generator of its own (seeded from the run's seed) so the noise and the drops are
        # reproducible and resumable, whatever else draws random numbers.
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))

    def active(self, step):
        """Whether modulation acts at ``step`` (its epoch lies in the window)."""
        return in_window(step.epoch, self.modulation_starts, self.modulation_ends)

    def logits(self, xs):
        per = self.model(xs)
        return per, torch.stack(list(per.values())).float().sum(dim=0)     # z = Σ_u z_u, the training rule

    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.set_state(state["generator"].cpu())


class OGMGE(OnTheFlyModulation):
    name = "ogm_ge"
    params = {**OGM_PARAMS, **OnTheFlyModulation.params}

    def training_step(self, batch, step):
        xs, y = batch
        logits = self.model(xs)
        loss = F.cross_entropy(sum(logits.values()), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ratios = discrepancy_ratios(modality_scores(logits, y))
        logs = apply_ogm(self.model, ratios, self.alpha, self.ratio_offset, self.ge, self.scope, self.generator,
                         self.active(step))
        self.optimizer.step()
        return {"loss": loss.detach(), **logs}
