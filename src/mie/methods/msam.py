"""M-SAM — Modality-Aware Sharpness-Aware Minimization.

Nowdeh (Rajoli), Ji, Ma, Afghah, "Modality-Aware SAM: Sharpness-Aware-Minimization Driven Gradient
Modulation for Harmonized Multimodal Learning", NeurIPS 2025 (arXiv 2510.24919; OpenReview
22O1ejTxj3). No code is public ("The code will be released", OpenReview abstract). What could be read:
the abstract and the start of the introduction (arxiv.org/html/2510.24919v1), a third-party TL;DR
(sciencestack.ai/paper/2510.24919: "aligns sharpness-aware updates with the dominant modality per
batch … decomposing the per-batch loss via Shapley values and applying a targeted SAM perturbation
only to the dominant modality"), and a third-party transcription of the update rule
(junaidaliop/zij ``canon/math/msammodalityawaresam.md``, the equations below). The method section of
the paper itself could not be reached, so everything beyond those equations is reconstructed (list
at the end).

Model. ``joint``'s models; by default (``feature_fusion="late"``) a head per modality and the sum of
their logits, z = Σ_m z_m (``late_fusion_logits``), ℓ = CE(z, y); "concat" / "sum" (one shared head on
the fused features) are offered for the paper's early-fusion setting, whose architecture could not be
read. Per-modality predictions and inference (``fusion``) are ``joint``'s.

One step on a mini-batch (x, y) at parameters θ:

1. Dominant modality (no gradient, eval mode). For every coalition S ⊆ N = {1..M} of present
   modalities, v(S) = batch accuracy of the fused prediction with the modalities outside S removed
   (``mask``), v(∅) = 0. Shapley value of modality i,

       φ_i = Σ_{S ⊆ N∖{i}} |S|! (M − |S| − 1)! / M! · (v(S ∪ {i}) − v(S)),

   weights ν_i = max(φ_i, 0) / Σ_k max(φ_k, 0) (ν_i = 1/M when no φ is positive), d = argmax_i ν_i
   (the first in modality order on a tie).
2. Loss split: L_d = ν_d · ℓ, L_s = Σ_{m≠d} ν_m · ℓ = (1 − ν_d) · ℓ.
3. SAM on L_d only:  ε = ρ ∇L_d(θ) / ‖∇L_d(θ)‖₂  (``mie.optim.SAM.first_step``; ‖·‖ over all of θ),

       θ ← base_step(θ, ∇L_d(θ + ε) + ∇L_s(θ)),

   with the run's optimizer as base_step (plain SGD: θ − η[…], its weight decay adding λθ as in the
   transcription). Since ∇L_d(θ) = ν_d ∇ℓ(θ), ε is plain SAM's perturbation, and the update direction
   is ν_d ∇ℓ(θ + ε) + (1 − ν_d) ∇ℓ(θ): the SAM gradient and the plain gradient mixed by ν_d. A
   modality that carries the batch alone (ν_d = 1) gives a SAM step, balanced modalities
   (ν_d → 1/M) a step closer to plain SGD. BatchNorm statistics are updated by the pass at θ only
   (``frozen_batchnorm_stats`` for the pass at θ + ε).

Cost per step: one eval-mode pass for the coalitions (for late fusion the coalition logits are sums of
per-modality logits, so M encoder passes on x plus M on a zero input of one sample give all 2^M − 1 of
them; a shared head runs 2^M − 1 times on cached features) and SAM's two training passes.

Defaults. ρ = 0.05: the paper's value could not be read; 0.05 is SAM's default (Foret et al., ICLR
2021) and ``mie``'s (``MIE.rho``). ``mask="input"``; ``feature_fusion="late"``. Logged per epoch:
``msam_nu_<m>`` (mean ν_m) and ``msam_dominant_<m>`` (share of batches where m is dominant).

Training settings the paper reports (second-hand, ../shared/METHODS-NEXT.md; ``mie`` takes them from
the run's ``train.*`` config like every method's): SGD, lr 1e-3, momentum 0.9, weight decay 1e-4,
lr × 0.1 every 70 epochs; datasets AV-MNIST, CREMA-D, UR-Funny (3 modalities), AVE; early and late
fusion.

Reconstructed (the paper's method section could not be read):
- ε form: ρ g/‖g‖₂ (the transcription above; SAM's own form). Another second-hand description
  (../shared/METHODS-NEXT.md) has ρ·sign(g); it is not offered here.
- ρ: 0.05 (see Defaults).
- v(S): batch accuracy (the abstract: "modalities' contribution in the accuracy using Shapley"),
  computed on each mini-batch, every step ("In every iteration", abstract; "per batch", TL;DR), on the
  parameters θ before the step, with the whole model in eval mode and no gradient (as the Shapley
  passes of AGM, whose four datasets the paper uses, ``mie.methods.agm``). Not an epoch-level estimate.
- Absent modalities (``mask``): "input" (default) feeds the modality an all-zero input, AGM's padding
  (model-agnostic, any fusion); "output" removes its branch's output instead: for late fusion its
  logits leave the sum (v({m}) is then modality m's own accuracy as ``mie`` reports it), for a shared
  head its features are zeroed (``joint``'s per-modality rule). v(∅) = 0 (nothing present, nothing
  predicted; the empty coalition is not evaluated).
- ν normalisation: the Shapley values of accuracy sum to v(N) and can be negative; negative ones are
  clipped to 0 and the rest divided by their sum, so ν lies on the simplex, ν_d ∈ [1/M, 1] and
  L_d + L_s = ℓ (un-normalised φ would scale the whole loss by the batch accuracy).
- Ties in argmax: the first modality in order.

Three or more modalities: the Shapley value is defined over all 2^M coalitions and the paper runs
UR-Funny with three; ``mie`` accepts 2 ≤ M ≤ 10 (2^M coalitions per step). Under torchrun each rank
computes ν on its own shard of the batch.
"""
from itertools import combinations
from math import factorial

import torch
import torch.nn.functional as F

from ..errors import MieInputError
from ..models import SharedHeadModel, eval_mode
from ..optim import SAM, frozen_batchnorm_stats
from .base import require_two_modalities
from .joint import Joint, late_fusion_logits
from .params import Param, Space, number, one_of

MAX_MODALITIES = 10


@torch.no_grad()
def coalition_logits(model, xs, mask="input"):
    """{frozenset(S): fused logits (B, K) with only the modalities in S present} for every non-empty
    S, the whole model in eval mode (each module's own mode restored). An absent modality gets an
    all-zero input (``mask="input"``) or a zero branch output (``"output"``: logits of a late-fusion
    model, features of a ``SharedHeadModel``)."""
    mods = model.modalities
    shared = isinstance(model, SharedHeadModel)
    branch = model.encoders if shared else {m: (lambda x, m=m: model.forward_modality(m, x)) for m in mods}
    with eval_mode(*model.modules()):
        present = {m: branch[m](xs[m]) for m in mods}
        if mask == "input":
            absent = {m: branch[m](torch.zeros_like(xs[m][:1])) for m in mods}
        else:
            absent = {m: torch.zeros_like(present[m][:1]) for m in mods}
        out = {}
        for size in range(1, len(mods) + 1):
            for S in combinations(mods, size):
                u = {m: present[m] if m in S else absent[m].expand_as(present[m]) for m in mods}
                out[frozenset(S)] = model.head(model.combine(u)) if shared else late_fusion_logits(u)
    return out


def coalition_accuracy(logits, y):
    """{S: v(S)} batch accuracy of each coalition's logits, with v(∅) = 0."""
    acc = torch.stack([(z.argmax(dim=-1) == y).double().mean() for z in logits.values()]).tolist()
    return {**dict(zip(logits, acc)), frozenset(): 0.0}


def shapley_values(value, modalities):
    """φ_i = Σ_{S ⊆ N∖{i}} |S|!(M−|S|−1)!/M! (v(S ∪ {i}) − v(S)) from {frozenset(S): v(S)} (all 2^M)."""
    M = len(modalities)
    phi = {}
    for i in modalities:
        others = [m for m in modalities if m != i]
        phi[i] = sum(factorial(k) * factorial(M - k - 1) / factorial(M)
                     * (value[frozenset(S) | {i}] - value[frozenset(S)])
                     for k in range(M) for S in combinations(others, k))
    return phi


def shapley_weights(phi):
    """ν_i = max(φ_i, 0) / Σ_k max(φ_k, 0), or 1/M each when no φ is positive."""
    pos = {m: max(v, 0.0) for m, v in phi.items()}
    total = sum(pos.values())
    return {m: v / total for m, v in pos.items()} if total > 0 else {m: 1.0 / len(phi) for m in phi}


class MSAM(Joint):
    name = "msam"
    params = {
        **Joint.params,
        "rho": Param(0.05, number(at_least=0), "SAM radius ρ of the dominant modality's perturbation (paper's value "
                                               "unknown; SAM's default)",
                     Space("log", 0.005, 0.5)),     # a decade each side; holds SAM's grid 0.01-0.5 (Foret et al.)
        "mask": Param("input", one_of("input", "output"),
                      "how a modality is removed for the coalition accuracies: input = all-zero input (AGM's "
                      "padding) | output = its logits (late) or features (shared head) zeroed"),
    }

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        if len(model.modalities) > MAX_MODALITIES:
            raise MieInputError(f"method '{self.name}' evaluates all 2^M modality coalitions on every batch; "
                                f"{len(model.modalities)} modalities give 2^{len(model.modalities)}, more than this "
                                f"implementation allows (at most {MAX_MODALITIES} modalities)")
        super().setup(model, ctx)
        self.optimizer = SAM(self.optimizer, rho=self.rho, model=model)

    def notices(self):
        return ["rho=0: no perturbation, every step is plain joint training"] if self.rho == 0 else []

    def loss(self, xs, y):
        """ℓ = CE(fused logits, y) in the model's current mode."""
        z = self.model(xs) if self.shared_head else late_fusion_logits(self.model(xs))
        return F.cross_entropy(z, y)

    def weights(self, xs, y):
        """ν: {m: Shapley weight} of this mini-batch."""
        value = coalition_accuracy(coalition_logits(self.model, xs, self.mask), y)
        return shapley_weights(shapley_values(value, self.model.modalities))

    def training_step(self, batch, step):
        xs, y = batch
        nu = self.weights(xs, y)
        d = max(nu, key=nu.get)
        nu_d, opt = nu[d], self.optimizer
        opt.zero_grad(set_to_none=True)
        loss = self.loss(xs, y)
        loss.backward()                                                  # ∇ℓ(θ)
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        plain = [(p, (1.0 - nu_d) * p.grad) for p in params]              # ∇L_s(θ)
        for p in params:
            p.grad.mul_(nu_d)                                             # ∇L_d(θ)
        opt.first_step(zero_grad=True)                                    # θ + ε
        with frozen_batchnorm_stats(self.model):
            (nu_d * self.loss(xs, y)).backward()                          # ∇L_d(θ + ε)
        for p, g in plain:
            p.grad = g if p.grad is None else p.grad.add_(g)
        opt.second_step(zero_grad=True)                                   # back to θ, base step
        logs = {f"msam_nu_{m}": v for m, v in nu.items()}
        logs.update({f"msam_dominant_{m}": float(m == d) for m in nu})
        return {"loss": loss.detach(), **logs}
