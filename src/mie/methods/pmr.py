"""PMR — Prototypical Modal Rebalance.

Fan, Xu, Wang, Wang, Sun, Jiang, "PMR: Prototypical Modal Rebalance for Multimodal Learning",
CVPR 2023 (arXiv 2211.07089); code: github.com/fanyunfeng-bit/Modal-Imbalance-PMR
(``main_Prototype_grad.py``, cited below as MPG:line). Two modalities a, v.

Model and base loss. Any of ``joint``'s models, trained with L_CE = CE(z, y) of its fused logits.
``feature_fusion="concat"`` (default, the authors' ``--fusion_method concat``, MPG:28): one head on
[φ_a(x_a); φ_v(x_v)] (the authors' ``ConcatFusion`` is one Linear, ``models/fusion_modules.py``; set
``model.head_hidden: []`` for theirs); "sum": one head on φ_a + φ_v; "late": a head per modality and
``joint``'s late fusion of their logits. PMR acts only on the encoder features z_m = φ_m(x_m), so it needs
nothing from the fusion or the heads; predictions (``fusion``: "model" = softmax(z) by default, or
"average" / "weight") and per-modality accuracies are ``joint``'s.

Prototypes (``calculate_prototype``, MPG:383-441). For modality m and class k, the class mean of
the features, computed with the model in eval mode and no gradient, on a random ``proto_fraction``
of the training set (default 0.1: the code averages the first ``len(loader) // 10`` batches of its
shuffled training loader, MPG:429 — at least one batch):

    c^m_k = (1/N_k) Σ_{i ∈ S, y_i = k} φ_m(x^m_i),     S a fresh random subset each time,

computed before the first epoch and again after every epoch (MPG:535-557). After loop epoch 0 the
new means replace the prototypes; after epoch e ≥ 1 they are mixed with momentum μ_p (``momentum``;
the code's ``if epoch <= 0`` branch, MPG:435-440, is called with the epoch just trained):

    C^m ← (1 − μ_p) C^m_new + μ_p C^m_old.

A class with no sample in S keeps its prototype (the code would divide by zero); one that has no
prototype yet takes its mean over the whole training set. ``proto_fraction=1`` uses every sample
(deterministic; ours). The distance is Euclidean, no temperature (the code's ``--temperature`` is
never read; ``--proto_update_freq`` neither).

Prototypical logits and loss (``EU_dist``, MPG:69-75, 152-153, 166-167):

    ℓ^m_k = −‖z^m − c^m_k‖₂,    p^m = softmax(ℓ^m),    L^m_PCE = CE(ℓ^m, y).

Imbalance ratio on each mini-batch B (MPG:158-160), from the prototype scores

    s_m = Σ_{i ∈ B} p^m_i[y_i],     ρ = s_a / s_v.

Coefficients, ``rule="sign"`` (default; the released code, MPG:169-178, and BalanceBenchmark's
released PMR trainer, GeWu-Lab/BalanceBenchmark balancemm/trainer/PMR_trainer.py:165-175):
the slower modality gets α times its prototype loss, the faster none, a tie neither,

    β_a = α · 1[ρ < 1],    β_v = α · 1[ρ > 1],    L = L_CE + β_a L^a_PCE + β_v L^v_PCE.

``rule="clip"`` (opt-in) grades the weight by the imbalance: β_a = α · clip(1/ρ − 1, 0, 1),
β_v = α · clip(ρ − 1, 0, 1), the form of BalanceBenchmark's commit 01458a1 (PMR_trainer.py:175-181
there; replaced by the sign rule two days later in 59c3446). The paper writes the coefficient as an
increasing function of the imbalance that is zero for the faster modality; the released code's
is the step function above, and that is the default here.

The scores, ratio, coefficients and prototypes are constants (no gradient); the PMR terms reach the
encoders through the features in ℓ^m. Modulation acts in loop epochs ``modulation_starts ≤ e <
modulation_ends`` (``mie.methods.window``; default: every epoch). The code's window is inclusive,
``modulation_starts <= epoch <= modulation_ends`` (MPG:156; its defaults 0 and 100 of 150
epochs), so its ``--modulation_ends K`` is ``modulation_ends=K+1`` here.

Defaults from the released code's arguments: α = 1.0 (``--alpha``, MPG:49), μ_p = 0.2
(``--momentum_coef``, MPG:39), concat fusion (MPG:28), 10% of the training set for the prototypes
(MPG:429). (The authors' run script ``bash.sh`` mostly uses α = 2 and μ_p = 0 on CREMA-D/AVE.)

Variant ``pmr_per`` (registry; ours, after BalanceBenchmark 01458a1): ``rule="clip"`` plus the
paper's prototypical entropy regularisation (PER) of the faster modality, in loop epochs
modulation_starts ≤ e < modulation_starts + ``per_epochs``:

    γ_a = clip(ρ − 1, 0, 1),  γ_v = clip(1/ρ − 1, 0, 1),   E^m = (1/|B|) Σ_{i∈B} H(p^m_i),
    L = L_CE + β_a L^a_PCE + β_v L^v_PCE − μ (γ_a E^a + γ_v E^v),

μ = 0.01 and 10 epochs from that commit's ``trainer_config.yaml`` (``mu``, ``norm_epoch``). Neither
the authors' released code nor BalanceBenchmark's released trainer has PER. Ours differs from
01458a1 in that E^m is the batch MEAN of modality m's own entropies (01458a1 sums over the batch,
takes the features of the modality with the lower unimodal loss against each modality's prototypes,
and runs norm_epoch + 1 epochs).

Three or more modalities: ρ and β are defined only for a pair (BalanceBenchmark's released trainer
switches to an OGM-like gradient scaling for three, which is not PMR), so ``setup`` raises
``MieInputError`` for M ≥ 3.
"""
import torch
import torch.nn.functional as F

from ..errors import MieInputError
from ..models import eval_mode
from .joint import Joint
from .params import Param, Space, boolean, number, one_of
from .window import WINDOW_PARAMS, check_window, in_window


def prototype_logits(z, C):
    """ℓ = −‖z_i − c_k‖₂ for features z (B, d) and prototypes C (K, d) → (B, K)."""
    C = C.to(dtype=z.dtype)
    d2 = (z * z).sum(dim=1, keepdim=True) - 2.0 * z @ C.T + (C * C).sum(dim=1)[None, :]
    return -d2.clamp_min(1e-12).sqrt()


def prototype_score(logits, y):
    """s = Σ_i softmax(ℓ)_i[y_i] (a float)."""
    logits = logits.detach()
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return float(F.softmax(logits, dim=-1).gather(1, y.view(-1, 1)).sum())


def pmr_coefficients(scores, alpha=1.0, rule="sign"):
    """({m: β_m}, {m: γ_m}) from the prototype scores {a: s_a, v: s_v} of two modalities.

    β is the weight of a modality's prototype loss: ``rule="sign"`` α·1[the other one is ahead]
    (the released code), ``"clip"`` α·clip(ρ_other − 1, 0, 1). γ (PER weight of ``pmr_per``) is
    clip(ρ_own − 1, 0, 1) under either rule."""
    (a, s_a), (v, s_v) = scores.items()
    rho_a = s_a / max(s_v, 1e-12)
    rho_v = s_v / max(s_a, 1e-12)

    def clip01(x):
        return min(max(x, 0.0), 1.0)

    if rule == "sign":
        beta = {a: alpha if s_a < s_v else 0.0, v: alpha if s_a > s_v else 0.0}
    else:
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
        "feature_fusion": Param("concat", one_of("late", "concat", "sum"),
                                "where modalities meet: concat (the authors' default) | sum (one shared head) | "
                                "late (a head each)"),
        "alpha": Param(1.0, number(at_least=0), "weight α of the slower modality's prototype loss",
                       Space("log", 0.1, 10.0)),        # ours: a decade each side; holds the authors' bash.sh α = 2
        "rule": Param("sign", one_of("sign", "clip"),
                      "prototype-loss weight: sign = α·1[slower] (released code) | clip = α·clip(ρ−1, 0, 1) (opt-in)"),
        "momentum": Param(0.2, number(at_least=0, below=1), "prototype momentum μ_p",
                          Space("float", 0.0, 0.5)),    # ours; holds the authors' bash.sh μ_p = 0
        "proto_fraction": Param(0.1, number(above=0, at_most=1),
                                "random fraction of the training set the prototypes are averaged over "
                                "(0.1: released code; 1: all of it)"),
        "per": Param(False, boolean, "prototypical entropy regularisation of the faster modality (pmr_per; ours)"),
        "mu": Param(0.01, number(at_least=0), "weight μ of the prototypical entropy regularisation (pmr_per)",
                    Space("log", 0.001, 0.1)),          # ours: a decade each side
        "per_epochs": Param(10, number(at_least=0, integer=True), "epochs of entropy regularisation (pmr_per)"),
        **WINDOW_PARAMS,
    }

    @classmethod
    def check_params(cls, values):
        check_window(values)

    @classmethod
    def unused_params(cls, fixed):
        return set() if fixed.get("per") is True else {"per", "mu", "per_epochs"}

    def __init__(self, **values):
        super().__init__(**values)
        self.prototypes = None

    # ---- set-up -----------------------------------------------------------------------
    def setup(self, model, ctx):
        if len(model.modalities) != 2:
            raise MieInputError(
                f"PMR is defined for exactly 2 modalities, got {len(model.modalities)} ({', '.join(model.modalities)}): "
                "its imbalance ratio ρ = s_a/s_v and the coefficient β (prototype loss of the slower modality) "
                "compare one pair, and neither the paper nor the authors' code define them for more. Select 2 "
                "modalities (data.modalities) or use a method that handles M modalities (mie, mla, agm).")
        super().setup(model, ctx)
        head = model.head if self.shared_head else model.heads[model.modalities[0]]
        self.num_classes = head.linears[-1].out_features
        self.prototypes = None
        # The prototype subsets are drawn from a generator of their own, seeded from the run's seed,
        # so they are reproducible and resumable whatever else draws random numbers.
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))

    def notices(self):
        budget = self.ctx.epochs_per_modality if self.ctx is not None else None
        out = []
        if budget is not None and self.modulation_starts >= budget:
            out.append(f"modulation_starts={self.modulation_starts} >= the {budget}-epoch budget: PMR never acts "
                       "(this run is joint training)")
        elif self.per and self.mu > 0 and self.per_epochs == 0:
            out.append("per_epochs=0: the entropy regularisation never acts")
        return out

    # ---- prototypes ---------------------------------------------------------------------
    @torch.no_grad()
    def class_means(self, fraction=None, classes=None):
        """({m: (K, d) class means of φ_m}, counts (K,), {m: nearest-prototype accuracy}), eval mode.

        Over a random ``fraction`` of the training samples (default ``proto_fraction``), or, with
        ``classes`` (bool (K,)), over every training sample of those classes. The accuracy (of the
        current prototypes, on the samples used) is empty before the first prototypes exist."""
        fraction = self.proto_fraction if fraction is None else fraction
        model = self.model
        sums, counts, correct, n = {}, None, {m: 0 for m in model.modalities}, 0
        with eval_mode(model):
            for xs, y in self.ctx.train_batches():
                if classes is not None:
                    keep = classes.to(y.device)[y]
                elif fraction < 1:
                    keep = (torch.rand(len(y), generator=self.generator) < fraction).to(y.device)
                else:
                    keep = None
                if keep is not None:
                    if not bool(keep.any()):
                        continue
                    xs, y = {m: x[keep] for m, x in xs.items()}, y[keep]
                onehot = F.one_hot(y, self.num_classes).to(torch.float64)
                counts = onehot.sum(0) if counts is None else counts + onehot.sum(0)
                n += len(y)
                for m in model.modalities:
                    z = model.encoders[m](xs[m])
                    dtype = z.dtype
                    z = z.to(torch.float64)
                    sums[m] = onehot.T @ z if m not in sums else sums[m] + onehot.T @ z
                    if self.prototypes is not None:
                        pred = prototype_logits(z, self.prototypes[m]).argmax(dim=1)
                        correct[m] += int((pred == y).sum())
        if counts is None:
            return None, None, {}
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype      # (autocast forwards)
        means = {m: (s / counts.clamp_min(1)[:, None]).to(dtype) for m, s in sums.items()}
        acc = {m: correct[m] / max(n, 1) for m in model.modalities} if self.prototypes is not None else {}
        return means, counts, acc

    def update_prototypes(self, fresh):
        """Class means on a random ``proto_fraction`` of the training set; ``fresh``: they replace the
        prototypes, else C ← (1 − μ_p) C_new + μ_p C_old. A class absent from the subset keeps its
        prototype, or (no prototype yet) takes its mean over the whole training set. Returns logs."""
        means, counts, acc = self.class_means()
        K = self.num_classes
        device = next(self.model.parameters()).device
        seen = (torch.zeros(K, dtype=torch.bool) if counts is None else (counts > 0).cpu())
        if self.prototypes is None and not bool(seen.all()):        # no prototype to keep for these
            full, full_counts, _ = self.class_means(classes=~seen)
            if means is None:
                means, counts = full, full_counts
            elif full is not None:
                fill = (~seen)[:, None].to(device)
                means = {m: torch.where(fill, full[m], means[m]) for m in means}
                counts = counts + full_counts
            if means is None:
                raise MieInputError("PMR needs training samples to compute its class prototypes; the training set is empty")
        seen = seen[:, None].to(device)
        if self.prototypes is None:
            self.prototypes = means
        elif means is not None:
            new = means if fresh else {m: (1 - self.momentum) * means[m] + self.momentum * self.prototypes[m]
                                       for m in means}
            self.prototypes = {m: torch.where(seen, new[m], self.prototypes[m]) for m in means}
        return {f"pmr_proto_acc_{m}": a for m, a in acc.items()}

    # ---- training ---------------------------------------------------------------------
    def start_epoch(self, epoch):
        if self.prototypes is None:
            self.update_prototypes(fresh=True)

    def training_step(self, batch, step):
        xs, y = batch
        model, mods = self.model, self.model.modalities
        feats = model.features(xs)
        if self.shared_head:
            z = model.head(model.combine(feats))
        else:
            z = self.fuse_logits({m: model.heads[m](feats[m]) for m in mods})
        loss = F.cross_entropy(z, y)
        logs = {}
        if in_window(step.epoch, self.modulation_starts, self.modulation_ends):
            plog = {m: prototype_logits(feats[m], self.prototypes[m]) for m in mods}
            scores = {m: prototype_score(plog[m], y) for m in mods}
            beta, gamma = pmr_coefficients(scores, self.alpha, self.rule)
            for m in mods:
                pce = F.cross_entropy(plog[m], y)
                if beta[m] > 0:
                    loss = loss + beta[m] * pce
                logs[f"pmr_pce_{m}"] = pce.detach()
                logs[f"pmr_beta_{m}"] = beta[m]
            if self.per and self.mu > 0 and step.epoch < self.modulation_starts + self.per_epochs:      # PER
                for m in mods:
                    if gamma[m] > 0:
                        loss = loss - self.mu * gamma[m] * prototype_entropy(plog[m])
                    logs[f"pmr_gamma_{m}"] = gamma[m]
            logs["pmr_rho"] = scores[mods[0]] / max(scores[mods[1]], 1e-12)
        self.minimize(loss)
        return {"loss": loss.detach(), **logs}

    def end_epoch(self, epoch):
        return self.update_prototypes(fresh=epoch <= 0)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state["prototypes"] = None if self.prototypes is None else {m: c.clone() for m, c in self.prototypes.items()}
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        device = next(self.model.parameters()).device
        self.prototypes = (None if state.get("prototypes") is None
                           else {m: c.to(device) for m, c in state["prototypes"].items()})
        if "generator" in state:
            self.generator.set_state(state["generator"])
