"""PMR — Prototypical Modal Rebalance.

Fan, Xu, Wang, Wang, Sun, Jiang, "PMR: Prototypical Modal Rebalance for Multimodal Learning",
CVPR 2023 (arXiv 2211.07089); code: github.com/fanyunfeng-bit/Modal-Imbalance-PMR
(``main_Prototype_grad.py``).

Model and base loss. Any of ``joint``'s models, trained with L_CE = CE(z, y) of its fused logits:
``feature_fusion="late"`` (default) — one head h_m per modality, z = (1/M) Σ_m h_m(φ_m(x_m));
"concat" — one head on [φ_1(x_1); …; φ_M(x_M)] (the authors' default ``--fusion_method concat``);
"sum" — one head on Σ_m φ_m(x_m). PMR acts only on the encoder features z_m = φ_m(x_m)
(d-dimensional), so it needs nothing from the fusion or the heads; predictions (``fusion``:
"model" = softmax(z) by default, or "average" / "weight") and per-modality accuracies are ``joint``'s.

Prototypes. For modality m and class k, the class mean of the features over the training data,
computed with the model in eval mode and no gradient (here: one full pass of ``ctx.train_batches``),

    c^m_k = (1/N_k) Σ_{i: y_i = k} φ_m(x^m_i),

fresh before the first epoch, then after every epoch with momentum μ_p (``momentum``):

    C^m ← (1 − μ_p) C^m_new + μ_p C^m_old          (a class absent from the pass keeps C_old).

Prototypical classifier and loss. With Euclidean distances d(z, c) = ‖z − c‖₂, the prototypical
logits of a sample are the negative distances, and PCE is their cross-entropy:

    ℓ^m_k = −d(z^m, c^m_k),    p^m = softmax(ℓ^m),    L^m_PCE = CE(ℓ^m, y).

Imbalance ratio (two modalities a, v), on each mini-batch B, from the prototype scores

    s_m = Σ_{i ∈ B} p^m_i[y_i],     ρ_a = s_a / s_v,     ρ_v = s_v / s_a = 1/ρ_a.

Coefficients. The slower modality gets the prototype loss, the dominant one an entropy
regularisation that keeps it from converging prematurely (prototypical entropy regularisation,
PER, E^m = (1/|B|) Σ_i H(p^m_i), only in loop epochs modulation_starts ≤ e < modulation_starts +
``per_epochs`` of the modulation window):

    β_a = α · clip(ρ_v − 1, 0, 1),    β_v = α · clip(ρ_a − 1, 0, 1)      (PCE weights)
    γ_a =     clip(ρ_a − 1, 0, 1),    γ_v =     clip(ρ_v − 1, 0, 1)      (PER weights)

    L = L_CE + β_a L^a_PCE + β_v L^v_PCE − μ (γ_a E^a + γ_v E^v).

At most one modality has ρ > 1, so at most one β and one γ are non-zero: if v dominates, a is
pulled towards its prototypes (β_a > 0) and v's prototype predictions are kept soft (γ_v > 0).
The scores, ratios, coefficients and prototypes are constants (no gradient); the PMR terms reach
the encoders through the features in ℓ^m.

Sources and differences. The paper defines ρ, the coefficients as a bounded increasing function of
ρ − 1 that is zero for the dominant modality's PCE, and the PER term with μ; the bound is taken
here as clip(·, 0, 1), the form BalanceBenchmark's PMR trainer (GeWu-Lab) implements.
The authors' released code keeps only a sign rule (β = α if ρ_v > 1 else 0, likewise for v) and
has no PER; it also averages the prototypes over the first 10% of a shuffled training loader,
whereas ``ctx.train_batches`` is unshuffled, so here the whole training set is used. Defaults:
α = 1.0 (``--alpha``) and μ_p = 0.2 (``--momentum_coef``) from the released code; μ = 0.01 and
10 PER epochs from BalanceBenchmark (GeWu-Lab, ``trainer_config.yaml``: mu, norm_epoch), as the
released code has no PER; modulation in every epoch (``modulation_starts``/``modulation_ends``, the
shared window of ``mie.methods.window``; the code modulates epochs 0–100 of 150).

Three or more modalities: ρ, β and γ are defined only for a pair (neither the paper nor the
authors' later code says which modality is "the other" when there are more), so ``setup`` raises
``MieInputError`` for M ≥ 3.
"""
import torch
import torch.nn.functional as F

from ..errors import MieInputError
from ..models import eval_mode
from .joint import Joint
from .params import Param, number
from .window import WINDOW_PARAMS, check_window, in_window


def prototype_logits(z, C):
    """ℓ = −‖z_i − c_k‖₂ for features z (B, d) and prototypes C (K, d) → (B, K)."""
    C = C.to(dtype=z.dtype)
    d2 = (z * z).sum(dim=1, keepdim=True) - 2.0 * z @ C.T + (C * C).sum(dim=1)[None, :]
    return -d2.clamp_min(1e-12).sqrt()


def prototype_score(logits, y):
    """s = Σ_i softmax(ℓ)_i[y_i] (a float)."""
    return float(F.softmax(logits.detach().float(), dim=-1).gather(1, y.view(-1, 1)).sum())


def pmr_coefficients(scores, alpha=1.0):
    """({m: β_m}, {m: γ_m}) from the prototype scores {a: s_a, v: s_v} of two modalities."""
    (a, s_a), (v, s_v) = scores.items()
    rho_a = s_a / max(s_v, 1e-12)
    rho_v = s_v / max(s_a, 1e-12)

    def clip01(x):
        return min(max(x, 0.0), 1.0)

    beta = {a: alpha * clip01(rho_v - 1.0), v: alpha * clip01(rho_a - 1.0)}
    gamma = {a: clip01(rho_a - 1.0), v: clip01(rho_v - 1.0)}
    return beta, gamma


def prototype_entropy(logits):
    """E = mean_i H(softmax(ℓ_i))."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


class PMR(Joint):
    name = "pmr"
    params = {
        **Joint.params,
        "alpha": Param(1.0, number(at_least=0), "weight α of the slower modality's prototype loss"),
        "momentum": Param(0.2, number(at_least=0, below=1), "prototype momentum μ_p"),
        "mu": Param(0.01, number(at_least=0), "weight μ of the prototypical entropy regularisation"),
        "per_epochs": Param(10, number(at_least=0, integer=True), "epochs of entropy regularisation"),
        **WINDOW_PARAMS,
    }

    @classmethod
    def check_params(cls, values):
        check_window(values)

    def __init__(self, **values):
        super().__init__(**values)
        self.prototypes = None

    # ---- set-up -----------------------------------------------------------------------
    def setup(self, model, ctx):
        if len(model.modalities) != 2:
            raise MieInputError(
                f"PMR is defined for exactly 2 modalities, got {len(model.modalities)} ({', '.join(model.modalities)}): "
                "its imbalance ratio ρ = s_a/s_v and the coefficients β (prototype loss of the slower modality) "
                "and γ (entropy regularisation of the faster one) compare one pair, and neither the paper nor "
                "the authors' code define them for more. Select 2 modalities (data.modalities) or use a method "
                "that handles M modalities (mie, mla, agm).")
        super().setup(model, ctx)
        head = model.head if self.shared_head else model.heads[model.modalities[0]]
        self.num_classes = head.linears[-1].out_features
        self.prototypes = None

    # ---- prototypes ---------------------------------------------------------------------
    @torch.no_grad()
    def class_means(self):
        """({m: (K, d) class means of φ_m over the training data}, counts (K,)), eval mode.

        Also returns {m: accuracy of the nearest-prototype classifier with the current prototypes}."""
        model = self.model
        sums, counts, correct, n = {}, None, {m: 0 for m in model.modalities}, 0
        with eval_mode(model):
            for xs, y in self.ctx.train_batches():
                onehot = F.one_hot(y, self.num_classes).to(torch.float64)
                counts = onehot.sum(0) if counts is None else counts + onehot.sum(0)
                n += len(y)
                for m in model.modalities:
                    z = model.encoders[m](xs[m]).to(torch.float64)
                    sums[m] = onehot.T @ z if m not in sums else sums[m] + onehot.T @ z
                    if self.prototypes is not None:
                        pred = prototype_logits(z, self.prototypes[m]).argmax(dim=1)
                        correct[m] += int((pred == y).sum())
        means = {m: (s / counts.clamp_min(1)[:, None]).float() for m, s in sums.items()}
        acc = {m: correct[m] / max(n, 1) for m in model.modalities} if self.prototypes is not None else {}
        return means, counts, acc

    def update_prototypes(self):
        """Fresh class means the first time, then C ← (1 − μ_p) C_new + μ_p C_old. Returns logs."""
        means, counts, acc = self.class_means()
        if self.prototypes is None:
            self.prototypes = means
        else:
            seen = (counts > 0)[:, None].to(means[next(iter(means))].device)
            self.prototypes = {m: torch.where(seen, (1 - self.momentum) * means[m] + self.momentum * self.prototypes[m],
                                              self.prototypes[m]) for m in means}
        return {f"pmr_proto_acc_{m}": a for m, a in acc.items()}

    # ---- training ---------------------------------------------------------------------
    def start_epoch(self, epoch):
        if self.prototypes is None:
            self.update_prototypes()

    def training_step(self, batch, step):
        xs, y = batch
        model, mods = self.model, self.model.modalities
        feats = model.features(xs)
        if self.shared_head:
            z = model.head(model.combine(feats))
        else:
            z = self.fused_logits({m: model.heads[m](feats[m]) for m in mods})
        loss = F.cross_entropy(z, y)
        logs = {}
        if in_window(step.epoch, self.modulation_starts, self.modulation_ends):
            plog = {m: prototype_logits(feats[m], self.prototypes[m]) for m in mods}
            scores = {m: prototype_score(plog[m], y) for m in mods}
            beta, gamma = pmr_coefficients(scores, self.alpha)
            for m in mods:
                pce = F.cross_entropy(plog[m], y)
                if beta[m] > 0:
                    loss = loss + beta[m] * pce
                logs[f"pmr_pce_{m}"] = pce.detach()
                logs[f"pmr_beta_{m}"] = beta[m]
            if self.mu > 0 and step.epoch < self.modulation_starts + self.per_epochs:       # PER
                for m in mods:
                    if gamma[m] > 0:
                        loss = loss - self.mu * gamma[m] * prototype_entropy(plog[m])
                    logs[f"pmr_gamma_{m}"] = gamma[m]
            logs["pmr_rho"] = scores[mods[0]] / max(scores[mods[1]], 1e-12)
        self.minimize(loss)
        return {"loss": loss.detach(), **logs}

    def end_epoch(self, epoch):
        return self.update_prototypes()

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state["prototypes"] = None if self.prototypes is None else {m: c.clone() for m, c in self.prototypes.items()}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        device = next(self.model.parameters()).device
        self.prototypes = (None if state.get("prototypes") is None
                           else {m: c.to(device) for m, c in state["prototypes"].items()})
