"""OGM-GE — On-the-fly Gradient Modulation with Generalization Enhancement.

Peng, Wei, Deng, Wang, Hu: "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
CVPR 2022 (arXiv 2203.15332; code: GeWu-Lab/OGM-GE_CVPR2022, ``main.py``, cited below as OGM:line);
extended in Wei, Hu, Du, Wen: "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
(code: GeWu-Lab/BML_TPAMI2024, ``code/main.py``, cited as BML:line).

Model: one encoder φ_u and head h_u per modality u (``LateFusionModel``), trained jointly with one
optimizer on the cross-entropy of the SUM of the per-modality logits — ``joint``'s late fusion
(``mie.methods.joint``), so that with the modulation off a step IS a ``joint`` step:

    z_u = h_u(φ_u(x_u)),    z = Σ_u z_u,    L = CE(z, y).

The sum is the authors' decomposition: their concatenation layer gives out = out_a + out_v with
out_u = W_u φ_u + b/2 (OGM:88-93), and each modality's score is read from its own additive part
out_u. Here z_u is exactly modality u's additive part of z.

Per mini-batch B_t (scores and ratios without gradient; OGM:105-109, BML:119-120):

    s_u = Σ_{i∈B_t} softmax(z_u,i)[y_i]
    ρ_u = s_u / ( (1/(m−1)) Σ_{v≠u} s_v )                       discrepancy ratio (m = 2: s_a / s_v)
    k_u = 1 − tanh(α · relu(ρ_u − c))   if ρ_u > 1,  else 1      c = ``ratio_offset``

Default c = 0: k_u = 1 − tanh(α·ρ_u) for ρ_u > 1, the paper's eq. 10 (quoted at OGM:111-117) and
both released codes (``1 - tanh(alpha * relu(ratio))``, OGM:119-124, BML:138-148). The coefficient
jumps from 1 to 1 − tanh(α) as ρ crosses 1 (α = 0.8: 1 → 0.34). ``ratio_offset=1`` is OURS, a
continuous variant k_u = 1 − tanh(α·(ρ_u − 1)) (→ 1 as the modalities balance; at α = 0.8,
ρ = 1.3: 0.77 instead of the published 0.22). At ρ = 1 exactly the released codes' ``else``
branch scales one encoder by 1 − tanh(α) (the audio one at OGM:122-124, the second one at
BML:146-148); here, as in eq. 10, k = 1 for ρ ≤ 1.

For m ≥ 3 (ours; the paper and codes have two modalities) ρ_u divides by the MEAN score of the
others; it reduces to the paper's ratio for m = 2, and the weakest modality always has ρ ≤ 1, so at
least one modality is never modulated. Every modality with ρ_u > 1 is modulated.

After ``L.backward()``, for each modality u and each SELECTED gradient tensor g of encoder φ_u
(heads untouched), OGM:133-148, BML:155-169:

    g ← k_u · g + ε,    ε ~ N(0, (std(g) + 1e-8)²) elementwise      (GE; std of the UNSCALED g)

with ε only when ``ge`` is on. Both codes write ``grad = grad*coeff + N(0, grad.std())``; the right
side is evaluated before the assignment, so the noise's std is that of the unscaled gradient
(torch's unbiased ``std``). ``ge="all"`` (default) adds ε to every modality's selected tensors, as
both codes do (k_u = 1 for the weaker modality, the noise all the same); ``ge="dominant"`` (ours)
only to the modulated modalities; ``ge="off"`` is plain OGM (OGM:140-141, ``--modulation OGM``).
Tensors with one element have no std and get no noise.

``scope`` — which encoder tensors are selected:
  "encoder_weights" (default): tensors with ≥ 2 dimensions (conv kernels of any dimension, Linear
      weights, embedding tables); BatchNorm/LayerNorm parameters and biases are left alone. The
      codes select ``len(parms.grad.size()) == 4`` (OGM:136, 143; BML:157, 164): the 4-D conv
      kernels of their ResNet18 encoders, which hold no Linear layer. On ``resnet18`` encoders with
      ``model.dim`` 512 (no projection) the two rules select the same tensors; extending the rule to
      Linear weights and 3-D/5-D conv kernels (MLP, BERT, 1-D CNN, I3D encoders, where the 4-D rule
      selects nothing or almost nothing) is OURS.
  "encoder_4d": the codes' rule literally, 4-D tensors only (a notice says when it selects nothing).
  "encoder" (ours; the former default): every encoder tensor, BatchNorm and biases included.

Modulation window: loop epochs ``modulation_starts <= epoch < modulation_ends`` (0-based). Outside
it a step is plain joint training (no scaling, no noise). The codes test ``starts <= epoch <= ends``,
both ends included (OGM:132, BML:154), so their ``--modulation_ends E`` is ``modulation_ends=E+1``
here. Default 0 ≤ epoch < 51: the OGM-GE code's defaults (``--modulation_starts 0
--modulation_ends 50`` with ``--epochs 100``, OGM:34, 41-42, and the README's "default modulation
setting"). (Before its commit 0f64793 of June 2022 the CVPR code tested ``starts >= epoch >= ends``,
which never holds for 0 < 50, so it modulated every epoch; BML skips epochs 0-5 as warm-up,
BML:91, 116, so its ``train_ogm.sh``, ``--modulation_starts 0 --modulation_ends 60``, modulates
epochs 6-60.) ``modulation_ends=None`` modulates
to the end of the budget. ``notices()`` says when the window misses part or all of the run.

Defaults and their source: α = 0.8 (the OGM-GE README's value for CREMA-D, MIE's main benchmark;
its VGGSound value is 0.1; BML ``scripts/train_ogm.sh`` uses 0.8; ``--alpha`` has no default at
OGM:43); ``ge="all"`` (``--modulation OGM_GE``, OGM:23, BML:36); c = 0 (eq. 10); scope = the codes'
tensors; window 0-50 inclusive.

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
from .joint import late_fusion_logits
from .params import Param, Space, number, one_of
from .window import WINDOW_PARAMS, check_window, in_window

GE_MODES = ("all", "dominant", "off")
SCOPES = ("encoder_weights", "encoder_4d", "encoder")

# OGM's hyper-parameters, shared with OPM + OGM
OGM_PARAMS = {
    "alpha": Param(0.8, number(at_least=0), "modulation strength α in k = 1 − tanh(α·relu(ρ − c)) for ρ > 1",
                   Space("log", 0.08, 8.0)),   # ours: a decade each side; holds the authors' 0.1 to 1.0
    "ratio_offset": Param(0.0, number(at_least=0),
                          "c: 0 = the paper's eq. 10 and the released codes, k = 1 − tanh(α·ρ); "
                          "1 = ours, k = 1 − tanh(α·(ρ − 1)), continuous at ρ = 1"),
    "ge": Param("all", one_of(*GE_MODES),
                "GE noise on every encoder (the codes) | the modulated ones only (ours) | off (plain OGM)"),
    "scope": Param("encoder_weights", one_of(*SCOPES),
                   "encoder tensors modulated: >= 2 dims (the codes' 4-D conv kernels, extended to Linear "
                   "weights: ours) | 4-D only (the codes literally) | every tensor (ours)"),
}

# The OGM-GE code's window: epochs 0..50 inclusive (OGM:41-42, 132) → [0, 51) here.
OGM_WINDOW_PARAMS = {
    **WINDOW_PARAMS,
    "modulation_ends": Param(51, number(at_least=1, integer=True, optional=True),
                             "first loop epoch that no longer modulates (None: to the end); 51 = the "
                             "OGM-GE code's inclusive --modulation_ends 50"),
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


def ogm_coefficients(ratios, alpha, ratio_offset=0.0):
    """k_u = 1 − tanh(α · relu(ρ_u − ratio_offset)) for ρ_u > 1, else 1: {m: ρ} → {m: k}.
    ``ratio_offset`` 0 is the paper's eq. 10, 1 − tanh(α·ρ_u)."""
    return {u: 1.0 - math.tanh(alpha * max(r - ratio_offset, 0.0)) if r > 1.0 else 1.0
            for u, r in ratios.items()}


def selected(param, scope):
    """Whether ``scope`` modulates the encoder tensor ``param``."""
    if scope == "encoder_4d":
        return param.dim() == 4
    if scope == "encoder_weights":
        return param.dim() >= 2
    return True


@torch.no_grad()
def modulate_gradients(params, k, noise=True, generator=None, scope="encoder"):
    """In place, for each parameter's gradient g that ``scope`` selects: g ← k·g + ε,
    ε ~ N(0, (std(g) + 1e-8)²) with std taken before scaling (ε only when ``noise``; one-element
    tensors get none). Noise is drawn in parameter order, in float32."""
    for p in params:
        if p.grad is None or not selected(p, scope):
            continue
        g = p.grad
        std = g.float().std() if g.numel() > 1 else None
        if k != 1.0:
            g.mul_(k)
        if noise and std is not None:
            eps = torch.randn(g.shape, generator=generator, device=g.device, dtype=torch.float32)
            g.add_((eps * (std + 1e-8)).to(g.dtype))


def apply_ogm(model, ratios, alpha, ratio_offset, ge, scope, generator, active=True):
    """OGM(-GE) on the gradients already in ``model``: scale each modality's selected encoder gradients
    by k_m (from ``ratios``) and add GE noise as ``ge`` says; nothing when not ``active``.
    Modalities are visited in ``model.modalities`` order. Returns the logs (ρ_m and applied k_m)."""
    coeffs = ogm_coefficients(ratios, alpha, ratio_offset) if active else {m: 1.0 for m in ratios}
    if active:
        for m in model.modalities:
            noise = ge == "all" or (ge == "dominant" and ratios[m] > 1.0)
            if coeffs[m] != 1.0 or noise:
                modulate_gradients(model.encoders[m].parameters(), coeffs[m], noise, generator, scope)
    logs = {f"ogm_ratio_{m}": r for m, r in ratios.items()}
    logs.update({f"ogm_coeff_{m}": k for m, k in coeffs.items()})
    return logs


def scope_notices(model, scope):
    """A line for each modality whose encoder has no tensor that ``scope`` selects."""
    out = []
    for m in model.modalities:
        if not any(selected(p, scope) for p in model.encoders[m].parameters()):
            out.append(f"scope={scope} selects no tensor of modality {m}'s encoder, so OGM never modulates it "
                       f"(the released codes' 4-D rule acts on conv kernels only; scope=encoder_weights "
                       f"extends it to Linear weights)")
    return out


def window_notice(rule, starts, ends, epochs):
    """A line when the window [starts, ends) misses part or all of loop epochs 0..epochs−1; else None."""
    last = epochs if ends is None else min(ends, epochs)
    if starts >= last:
        return (f"{rule} never acts: its window starts at loop epoch {starts}"
                + (f" and ends before {ends}" if ends is not None else "")
                + f", the run has epochs 0-{epochs - 1}; this run is plain joint training")
    if starts > 0 or last < epochs:
        return f"{rule} acts in loop epochs {starts}-{last - 1} only, of 0-{epochs - 1}"
    return None


class OnTheFlyModulation(SingleOptimizerMethod):
    """What OGM-GE, OPM and their combination share: ``joint``'s late-fusion training (the sum of
    per-modality logits) with one optimizer, a modulation window, a seeded random generator (saved
    with the run), and the summed logits as the model's fused output."""

    params = {**WINDOW_PARAMS, "fusion": fusion_param("model", FUSIONS)}
    rule = "modulation"

    @classmethod
    def check_params(cls, values):
        check_window(values)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        super().setup(model, ctx)
        # A generator of its own so the noise and the drops are reproducible and resumable. It is
        # seeded from the run's seed WITHOUT drawing from torch's global stream, so that dropout masks
        # (and so a run with the modulation off) are exactly those of ``joint``.
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed((torch.initial_seed() ^ 0x5DEECE66D) % 2**63)

    def active(self, step):
        """Whether modulation acts at ``step`` (its epoch lies in the window)."""
        return in_window(step.epoch, self.modulation_starts, self.modulation_ends)

    def notices(self):
        line = window_notice(self.rule, self.modulation_starts, self.modulation_ends,
                             self.num_epochs(self.ctx.epochs_per_modality))
        return [line] if line else []

    def fuse_logits(self, per_logits):
        """z = Σ_u z_u, the training rule."""
        return late_fusion_logits(per_logits).float()

    def logits(self, xs):
        per = self.model(xs)
        return per, self.fuse_logits(per)

    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.set_state(state["generator"].cpu())


class OGMGE(OnTheFlyModulation):
    name = "ogm_ge"
    rule = "OGM"
    params = {**OGM_PARAMS, **OnTheFlyModulation.params, **OGM_WINDOW_PARAMS}

    def notices(self):
        return super().notices() + scope_notices(self.model, self.scope)

    def training_step(self, batch, step):
        xs, y = batch
        logits = self.model(xs)
        loss = F.cross_entropy(late_fusion_logits(logits), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ratios = discrepancy_ratios(modality_scores(logits, y))
        logs = apply_ogm(self.model, ratios, self.alpha, self.ratio_offset, self.ge, self.scope, self.generator,
                         self.active(step))
        self.optimizer.step()
        return {"loss": loss.detach(), **logs}
