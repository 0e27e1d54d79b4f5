"""MMPareto — Pareto integration of multimodal and unimodal gradients on each encoder.

Wei, Hu: "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024
(arXiv 2405.17730); code: github.com/GeWu-Lab/MMPareto_ICML2024 @a339db3, cited below as
``MP:line`` for ``code/MMPareto.py`` and ``MNS:line`` for ``code/min_norm_solvers.py``. Only the
paper's abstract and introduction could be read here; every detail below is the released code's.

Model (``MultiHeadModel``, ``feature_fusion="concat"``; the code's ``AVClassifier``,
``code/models/models.py:133-184``): encoders φ_m, a unimodal head h_m per encoder and a multimodal
head g on the concatenated features (the authors' heads are single Linear layers: set
``model.head_hidden: []`` for theirs). One forward pass per step (MP:97), and the losses (MP:99-103)

    L_mm = CE(g([φ_1(x_1); …; φ_M(x_M)]), y),        L_m = CE(h_m(φ_m(x_m)), y).

Gradient rule, for each encoder m, over its parameter tensors P ∈ φ_m (heads excluded: names with
"head", MP:76-84):

    g_mm = ∂L_mm/∂φ_m,   g_u = ∂L_m/∂φ_m,   g_sum = ∂(L_mm + Σ_k L_k)/∂φ_m = g_mm + g_u
    cos  = cos(g_mm, g_u)  over the whole encoder, all tensors flattened and concatenated (MP:149-150)
    cos > 0:  (α₁, α₂) = (½, ½)                                                      (MP:165-167)
    cos ≤ 0:  (α₁, α₂) = (c, 1 − c),  c = argmin_{c∈[0,1]} ‖c g_mm + (1 − c) g_u‖²    (MP:168-169)
              with v₁₁ = ‖g_mm‖², v₁₂ = g_mm·g_u, v₂₂ = ‖g_u‖² (MNS:9-30, two vectors: MNS:127-129):
              c = 0.999 if v₁₂ ≥ v₁₁;  else 0.001 if v₁₂ ≥ v₂₂;  else c = (v₂₂ − v₁₂)/(v₁₁ + v₂₂ − 2v₁₂)
    per tensor P (MP:184-207), γ = 1.5 (``gamma``, MP:178):
              d[P] = 2(α₁ g_mm[P] + α₂ g_u[P]),   s[P] = ‖g_sum[P]‖ / ‖d[P]‖,
              grad[P] = γ · max(s[P], 1) · d[P]
    heads (g and every h_m) keep g_sum (MP:187-188); then one optimizer step (MP:209).

So the direction of each encoder's update is decided over the whole encoder and its magnitude per
tensor. Without conflict d = g_sum, s = 1 and the encoder steps along γ·g_sum. Under a conflict
(cos ≤ 0, both gradients non-zero) v₁₂ ≤ 0 < v₁₁, v₂₂, so c is the analytic value, strictly inside
(0, 1) and never clipped: the solver's 0.999 / 0.001 are reached only when g_mm = 0 or g_u = 0. The
code hands the solver each gradient as its list of tensors plus their concatenation (the ``"concat"``
entry, MP:126-145, 169), so every inner product is counted twice (MNS:43-53); c is a ratio of them
and is unchanged. cos = 0 exactly takes the min-norm branch (strict ``> 0``, MP:165).

Backward passes. The code runs M + 2: L_mm, each L_m, then L_mm + Σ L_m (MP:117-147, 180-181).
L_m depends on φ_m and h_m only, so ∂(Σ_k L_k)/∂φ_m = ∂L_m/∂φ_m and g_sum = g_mm + Σ_k g_u^k for
every parameter: here two passes (L_mm, and Σ_m L_m) give the same gradients up to rounding.

Defaults and training settings. γ = 1.5 (MP:178); inference ``fusion="model"``: softmax of the
multimodal head, the prediction the code evaluates (MP:239) ("average" / "weight" fuse the unimodal
heads). The authors' training (MP:28-34, 296, 301; ``code/script/mmpareto.sh``, CREMA-D): SGD, lr
0.002, momentum 0.9, weight decay 1e-4, batch 64, 50 epochs, constant learning rate (a StepLR(30,
0.1) is built but never stepped) — these are the run's ``train.*`` settings here, as for every
method. The code keeps the checkpoint with the best TEST accuracy (MP:316-319); ``mie`` selects on
validation.

Not followed: GeWu-Lab/BalanceBenchmark ``balancemm/trainer/MMPareto_trainer.py`` backpropagates
every loss into the same ``.grad`` before reading them (its "multimodal" gradient already holds the
unimodal ones) and its min-norm branch assigns the solver's result to the loop variable, leaving the
weights at 0.

Three or more modalities: the code has two encoders, but its rule pairs L_mm with one encoder's own
L_m only, so it is applied unchanged to each of M encoders (ours: a direct generalisation).
Under torchrun each rank applies the rule to its shard and the loop then averages the gradients;
the code's DataParallel applies it to the whole batch.

Logged per step (averaged over the epoch by the loop): ``loss`` (L_mm + Σ L_m), ``loss_fused``,
``loss_<m>``, and per encoder ``pareto_cos_<m>`` (cos), ``pareto_conflict_<m>`` (1 when the
min-norm branch ran: its epoch mean is the share of conflicting steps) and ``pareto_alpha_<m>`` (α₁,
the weight of g_mm).
"""
import torch
import torch.nn.functional as F

from ..models import FUSIONS, MultiHeadModel
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, Space, number


def pareto_weights(g_mm, g_u):
    """(α₁, cos), 0-d tensors, for one encoder's flat gradients g_mm, g_u (n,): ½ if cos > 0, else the
    min-norm weight of g_mm in the convex hull of {g_mm, g_u} (MNS:9-30); α₂ = 1 − α₁. Computed
    without reading the device (every branch evaluated, the rule's one selected)."""
    cos = F.cosine_similarity(g_mm, g_u, dim=0)
    v11, v12, v22 = g_mm @ g_mm, g_mm @ g_u, g_u @ g_u
    interior = (v22 - v12) / (v11 + v22 - 2 * v12).clamp_min(torch.finfo(v11.dtype).tiny)
    alpha = torch.where(v12 >= v11, 0.999, torch.where(v12 >= v22, 0.001, interior))
    return torch.where(cos > 0, 0.5, alpha).to(g_mm.dtype), cos


def pareto_gradients(g_mm, g_u, gamma=1.5):
    """One encoder's new gradients: lists g_mm, g_u of its tensors' gradients (same shapes) →
    ([γ·max(s[P], 1)·d[P] for each tensor P], α₁, cos)."""
    alpha, cos = pareto_weights(torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_u]))
    new = []
    for a, b in zip(g_mm, g_u):
        d = 2 * (alpha * a + (1 - alpha) * b)
        s = (a + b).norm() / d.norm()
        new.append(gamma * torch.where(s > 1, s, 1.0) * d)      # s = 0/0 (P has no gradient): 1
    return new, alpha, cos


class MMPareto(SingleOptimizerMethod):
    name = "mmpareto"
    params = {
        "gamma": Param(1.5, number(above=0), "γ: the encoders' gradient magnitude factor (the code's 1.5)",
                       Space("log", 0.15, 15.0)),   # ours: a decade each side
        "fusion": fusion_param("model", FUSIONS),
    }

    def build_model(self, spec):
        return MultiHeadModel.build(spec)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        super().setup(model, ctx)

    def training_step(self, batch, step):
        xs, y = batch
        model = self.model
        per, fused = model.outputs(xs)
        loss_mm = F.cross_entropy(fused, y)
        uni = {m: F.cross_entropy(per[m], y) for m in model.modalities}
        params = [p for p in model.parameters() if p.requires_grad]
        g_mm = torch.autograd.grad(loss_mm, params, retain_graph=True, allow_unused=True)
        g_u = torch.autograd.grad(sum(uni.values()), params, allow_unused=True)
        self.optimizer.zero_grad(set_to_none=True)
        mm, u = {}, {}
        for p, a, b in zip(params, g_mm, g_u):
            if a is not None or b is not None:
                mm[p] = torch.zeros_like(p) if a is None else a
                u[p] = torch.zeros_like(p) if b is None else b
                p.grad = mm[p] + u[p]                      # g_sum: what the heads keep
        logs = {}
        for m in model.modalities:
            enc = [p for p in model.encoders[m].parameters() if p in mm]
            if not enc:                                    # a frozen encoder (e.g. a frozen text backbone)
                continue
            new, alpha, cos = pareto_gradients([mm[p] for p in enc], [u[p] for p in enc], self.gamma)
            for p, g in zip(enc, new):
                p.grad = g
            logs.update({f"pareto_cos_{m}": cos, f"pareto_conflict_{m}": (cos <= 0).float(),
                         f"pareto_alpha_{m}": alpha})
        self.optimizer.step()
        loss = loss_mm + sum(uni.values())
        return {"loss": loss.detach(), "loss_fused": loss_mm.detach(),
                **{f"loss_{m}": v.detach() for m, v in uni.items()}, **logs}

    def logits(self, xs):
        return self.model.outputs(xs)
