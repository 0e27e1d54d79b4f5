"""DOMFN — Divergence-Orientated Multi-modal Fusion Network.

Yang, Zhang, Gao, Gao, Zhu, "DOMFN: A Divergence-Orientated Multi-Modal Fusion Network for Resume
Assessment", ACM Multimedia 2022 (doi 10.1145/3503161.3548203); official code:
github.com/njustkmg/MM22_DOMFN (Paddle, two modalities: ``models/encoder.py``,
``engines/resume_trainer.py``), github.com/njustkmg/DOMFN and lyqcom/MM22_DOMFN (PyTorch /
MindSpore, three modalities on CMU-MOSI: ``models/encoder.py``, ``engines/mosi_trainer.py``).

Idea (the paper's abstract): fusing modalities can be worse than the best single modality when
their predictions diverge, so DOMFN measures the divergence of the uni-modal predictions of each
sample with a "functional penalty score", fuses only the samples whose divergence is small, and
trains with an "amended loss" built from the same score.

Model (``mie.models.MultiHeadModel``). Encoders φ_m (output size d) with a uni-modal head h_m
each, and a fusion head g on the concatenated features (``feature_fusion``: "concat", or their
element-wise "mean" or "max", the code's three options):

    z_m = h_m(φ_m(x_m)),   q_m = softmax(z_m),   z_f = g([φ_1(x_1); …; φ_M(x_M)])

Penalty score of modality m on sample i (``divergence_penalties``), against the mean uni-modal
prediction q̄ = (1/M) Σ_j q_j:

    p_m,i = max_c ( q_m,i,c − q̄_i,c )²

For M = 2, p_a = p_b = ¼ max_c (q_a,c − q_b,c)²: the divergence between the two uni-modal
predictions. The authors' three-modality code uses this mean reference; their two-modality
Paddle code compares each q_m with the FUSED prediction instead (``(text_logit − multi_logit)²``);
``mie`` follows the mean form, which is defined by the uni-modal predictions alone and is the
same rule for every M ≥ 2 (the code's rule for M = 3; for M = 2 it is the pairwise divergence),
so no separate pairwise generalisation is needed.

Fusion decision (the margin; ``consistent_mask``): sample i is consistent when every modality's
scaled penalty lies below the margin γ,

    c_i = 1[ max_m p_m,i / τ < γ ]                           (strict, as the code's ``p < gamma``)

Amended loss (per sample, ℓ = cross-entropy, η > 0):

    L̃_m,i = ½ ℓ(z_m,i, y_i)² − η p_m,i
    L_i   = Σ_m L̃_m,i + c_i ( Σ_m ℓ(z_m,i, y_i) + ℓ(z_f,i, y_i) )
    L     = (1/B) Σ_i L_i

A consistent sample trains the encoders, the uni-modal heads and the fusion head on
Σ_m L̃_m + Σ_m ℓ_m + ℓ_f (``loss = text_loss + image_loss + multi_loss`` in the released code); a
rejected sample trains each modality on its own amended loss only and never reaches the fusion
head. −η p pushes each uni-modal prediction away from the others ("divergence-orientated"),
bounded because q ∈ [0, 1]. Gradient routing follows the released code: for consistent samples
one backward through everything (p_m reaches every modality through q̄); for rejected samples
each modality steps on its own L̃_m (the code's per-modality ``backward`` + ``step``), so in p_m
the other modalities' q_j are constants: q̄ = (q_m + Σ_{j≠m} sg(q_j)) / M, sg = stop-gradient.

Prediction (``domfn_predict``): the fused prediction softmax(z_f,i) for consistent samples; for
rejected samples the uni-modal prediction of the most confident modality, argmax_m max_c q_m,i,c
(``fusion="divergence"``, the default, the paper's rule). ``fusion="model"`` always uses the
fusion head; "average"/"weight" fuse the uni-modal q_m. Modality m's own accuracy is q_m.

Known differences from the released code, all deliberate:
  * the released code can only run with batch size 1 (``if text_p < gamma`` and ``.item()`` on
    per-sample tensors); the decision is per sample ("instance-aware" in the paper), so here it
    is applied sample by sample inside a mini-batch.
  * the code ends every head with a Sigmoid and feeds those outputs to CrossEntropyLoss (a softmax
    over sigmoids); here heads output logits, ℓ is the ordinary cross-entropy and the penalty and
    the confidence use the softmax probabilities q (like the code's sigmoid outputs, in [0, 1]).
  * one optimizer (``train.*``) for all parameters instead of four Adams with their own learning
    rates; the code's optional uni-modal pre-training (``is_pretrain``: Σ_m ℓ_m for ``pre_epoch``
    epochs) is the first ``pretrain_epochs`` loop epochs of the budget (default 0).
  * the three released versions disagree on the two branches of the loss (PyTorch: rejected
    samples use plain ℓ_m; MindSpore: consistent samples use Σ_m L̃_m + ℓ_f without Σ_m ℓ_m);
    ``mie`` uses the form on which the Paddle (paper's resume task) and PyTorch codes agree for
    consistent samples and the Paddle and MindSpore codes for rejected ones.

Defaults: the released repositories ship their hyper-parameters only as compiled
``config/*.pyc`` files (no readable source), and the paper's values were not available to us, so
the defaults are ``mie``'s choice, documented as such: η = 0.1, τ = 1, γ = 0.1. With two
modalities p ≤ ¼, so γτ = 0.1 rejects fusion when the uni-modal probabilities of some class
differ by more than √0.4 ≈ 0.63; set γ ≥ 0.25/τ to always fuse, γ = 0 to never fuse.

Logged per step (averaged per epoch): ``loss``, ``domfn_ce_<m>``, ``domfn_ce_fused``,
``domfn_penalty_<m>`` (mean p_m), ``domfn_fused_frac`` (fraction of consistent samples).
"""
import torch
import torch.nn.functional as F

from ..models import FUSIONS, MultiHeadModel
from ..models.multi_head import FEATURE_FUSIONS
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, number, one_of


# ---- the paper's quantities, as plain functions ------------------------------------------------
def divergence_penalties(probs, own_only=False):
    """p_m = max_c (q_m − q̄)² per sample, q̄ = mean_j q_j: {m: (B, K)} → {m: (B,)}.

    ``own_only``: in p_m every q_j with j ≠ m is detached (the gradient of p_m reaches modality m only)."""
    mods = list(probs)
    M = len(mods)
    out = {}
    for m in mods:
        others = [probs[j].detach() if own_only else probs[j] for j in mods if j != m]
        mean = (probs[m] + sum(others)) / M
        out[m] = (probs[m] - mean).pow(2).max(dim=-1).values
    return out


def consistent_mask(penalties, tau, gamma):
    """c_i = 1[max_m p_m,i / τ < γ]: {m: (B,)} → bool (B,)."""
    scaled = torch.stack([p.detach() for p in penalties.values()]) / tau
    return (scaled < gamma).all(dim=0)


def domfn_loss(uni_logits, fused_logits, y, eta, tau, gamma):
    """The amended loss L = mean_i [Σ_m (½ℓ_m,i² − η p_m,i) + c_i (Σ_m ℓ_m,i + ℓ_f,i)].

    Returns (L, parts) with parts = {"ce": {m: (B,)}, "ce_fused": (B,), "penalty": {m: (B,)},
    "consistent": bool (B,)}."""
    probs = {m: F.softmax(z, dim=-1) for m, z in uni_logits.items()}
    full = divergence_penalties(probs)
    own = divergence_penalties(probs, own_only=True)
    c = consistent_mask(full, tau, gamma)
    penalty = {m: torch.where(c, full[m], own[m]) for m in probs}      # same values, routed gradients
    ce = {m: F.cross_entropy(z, y, reduction="none") for m, z in uni_logits.items()}
    ce_f = F.cross_entropy(fused_logits, y, reduction="none")
    amended = sum(0.5 * ce[m] * ce[m] - eta * penalty[m] for m in ce)
    joint = sum(ce.values()) + ce_f
    per_sample = amended + torch.where(c, joint, torch.zeros_like(joint))
    return per_sample.mean(), {"ce": ce, "ce_fused": ce_f, "penalty": full, "consistent": c}


def domfn_predict(uni_logits, fused_logits, tau, gamma):
    """Per sample: softmax(z_f) if consistent, else q of the most confident modality → (B, K)."""
    probs = {m: F.softmax(z.float(), dim=-1) for m, z in uni_logits.items()}
    c = consistent_mask(divergence_penalties(probs), tau, gamma)
    stacked = torch.stack(list(probs.values()))                          # (M, B, K)
    best = stacked.max(dim=-1).values.argmax(dim=0)                       # (B,) first on ties
    uni = stacked.gather(0, best.view(1, -1, 1).expand(1, *stacked.shape[1:])).squeeze(0)
    return torch.where(c.unsqueeze(-1), F.softmax(fused_logits.float(), dim=-1), uni)


class DOMFN(SingleOptimizerMethod):
    name = "domfn"
    params = {
        "eta": Param(0.1, number(at_least=0), "weight η of the divergence term"),
        "tau": Param(1.0, number(above=0), "penalty scale τ"),
        "gamma": Param(0.1, number(at_least=0), "fusion margin γ: a sample is fused when max_m p_m/τ < γ"),
        "feature_fusion": Param("concat", one_of(*FEATURE_FUSIONS), "the fusion head's input: concat | mean | max"),
        "pretrain_epochs": Param(0, number(at_least=0, integer=True), "loop epochs of uni-modal pre-training"),
        "fusion": fusion_param("divergence", ("divergence",) + FUSIONS),
    }

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        return MultiHeadModel.build(spec, self.feature_fusion)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        super().setup(model, ctx)

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch, step):
        xs, y = batch
        uni, fused = self.model.outputs(xs)
        if step.epoch < self.pretrain_epochs:           # uni-modal pre-training: Σ_m ℓ_m
            ce = {m: F.cross_entropy(z, y) for m, z in uni.items()}
            loss = sum(ce.values())
            logs = {f"domfn_ce_{m}": v.detach() for m, v in ce.items()}
        else:
            loss, parts = domfn_loss(uni, fused, y, self.eta, self.tau, self.gamma)
            logs = {f"domfn_ce_{m}": v.detach().mean() for m, v in parts["ce"].items()}
            logs["domfn_ce_fused"] = parts["ce_fused"].detach().mean()
            logs.update({f"domfn_penalty_{m}": p.detach().mean() for m, p in parts["penalty"].items()})
            logs["domfn_fused_frac"] = parts["consistent"].float().mean()
        self.minimize(loss)
        return {"loss": loss.detach(), **logs}

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        return self.model.outputs(xs)

    @torch.no_grad()
    def predict(self, xs):
        if self.fusion != "divergence":
            return super().predict(xs)
        uni, fused_logits = self.logits(xs)
        per_modality = {m: F.softmax(z.float(), dim=-1) for m, z in uni.items()}
        return domfn_predict(uni, fused_logits, self.tau, self.gamma), per_modality
