"""DOMFN — Divergence-Orientated Multi-modal Fusion Network.

Yang, Zhang, Gao, Gao, Zhu, "DOMFN: A Divergence-Orientated Multi-Modal Fusion Network for Resume
Assessment", ACM Multimedia 2022 (doi 10.1145/3503161.3548203); official code:
github.com/njustkmg/MM22_DOMFN, three branches: "Paddle" (the paper's resume task, two modalities:
``engines/resume_trainer.py``, ``models/encoder.py``), "Torch" (the default branch; CMU-MOSI, three
modalities: ``engines/mosi_trainer.py``, ``models/encoder.py``) and "MindSpore" (MOSI);
readable hyper-parameters in ``config/resume_config.py`` and ``config/mosi_config.py`` (Torch and
MindSpore branches). Below, P: = Paddle, T: = Torch, followed by file:line.

Idea (the paper's abstract): fusing modalities can be worse than the best single modality when
their predictions diverge, so DOMFN measures the divergence of the uni-modal predictions of each
sample with a "functional penalty score", fuses only the samples whose divergence is small, and
trains with an "amended loss" built from the same score.

Model (``mie.models.MultiHeadModel``). Encoders φ_m (output size d) with a uni-modal head h_m
each, and a fusion head g on the concatenated features (``feature_fusion``: "concat", the configs'
default, or their element-wise "mean" or "max", the code's three options):

    z_m = h_m(φ_m(x_m)),   q_m = softmax(z_m),   z_f = g([φ_1(x_1); …; φ_M(x_M)]),   q_f = softmax(z_f)

The paper's equations were not available to us; the two released codes differ in the reference
the penalty is measured against and in what a rejected sample trains, so ``form`` picks one code's
rules, each with its own config's τ:

  form "resume" — the Paddle code of the paper's task (P:models/encoder.py:122-126,
  P:engines/resume_trainer.py:44-78), τ = 0.2 (config/resume_config.py:61):
      p_m,i = max_c ( q_m,i,c − q_f,i,c )²                     (against the FUSED prediction)
      a rejected sample trains each modality on its own amended loss L̃_m (below), modality m's
      optimizer stepping on ∇ of L̃_m (its encoder and head only; the fused prediction in p_m is
      followed into φ_m, the other encoders and g are not updated).
  form "mosi" — the Torch code (T:models/encoder.py:100-107, T:engines/mosi_trainer.py:63-105),
  τ = 0.5 (config/mosi_config.py:46):
      p_m,i = max_c ( q_m,i,c − q̄_i,c )²,   q̄ = (1/M) Σ_j q_j   (against the MEAN uni-modal prediction)
      a rejected sample trains each modality on its plain cross-entropy ℓ_m (T:86-94).
  form "auto" (default): "resume" for two modalities (the paper's setting), "mosi" for three or
  more (the only released code for more than two). Either form on the other number of modalities
  (``form="resume"`` with three, ``form="mosi"`` with two) is ours: the same rules, applied there.

Fusion decision (``consistent_mask``; P:53, T:73): sample i is consistent when every modality's
scaled penalty lies below the margin γ, strictly:

    c_i = 1[ max_m p_m,i / τ < γ ]

Amended loss (ℓ = cross-entropy, η ≥ 0), per sample:

    L̃_m,i = ½ ℓ(z_m,i, y_i)² − η p_m,i                        (P:124-125, T:104-106)
    consistent:  L_i = Σ_m L̃_m,i + Σ_m ℓ(z_m,i, y_i) + ℓ(z_f,i, y_i)
                 (``text_loss + image_loss + multi_loss``, multi_loss = Σ_m ℓ_m + ℓ_f; P:54, T:70),
                 one backward through everything (the penalty reaches g and every encoder it
                 depends on) and every optimizer steps;
    rejected:    modality m steps on L̃_m,i ("resume") or ℓ_m,i ("mosi"); g is not trained.

Here a mini-batch's loss is the mean over its samples: the consistent part's gradient goes to
every parameter, each modality's rejected part's gradient to that modality's encoder and head only
(``torch.autograd.grad`` restricted to them), then one optimizer step. −η p pushes each uni-modal
prediction away from the reference ("divergence-orientated"), bounded because q ∈ [0, 1].

Prediction (``domfn_predict``; P:120-125, T:158-165): the fused prediction q_f for consistent
samples; for rejected samples the uni-modal prediction of the most confident modality,
argmax_m max_c q_m,i,c (``fusion="divergence"``, the default). ``fusion="model"`` always uses the
fusion head; "average"/"weight" fuse the uni-modal q_m. Modality m's own accuracy is q_m.

Defaults, from the readable configs: η = 0.5 and γ = 0.8 (resume_config.py:59-60 and
mosi_config.py:44-45 agree), τ per form (``tau=None``; 0.2 resume, 0.5 mosi), concat fusion
(resume_config.py:56, mosi_config.py:42). Under "mosi" with two modalities p ≤ ¼ < γτ = 0.4, so
no sample is ever rejected — ``notices()`` says so whenever the margin cannot act.

Known differences from the released code:
  * the code runs with batch size 1 (``--batch 1``, ``if text_p < gamma`` on one sample); the
    decision is per sample ("instance-aware"), so here it is applied sample by sample inside a
    mini-batch and the losses are averaged over it.
  * the code ends every head with a Sigmoid and feeds those outputs to CrossEntropyLoss (a softmax
    over sigmoids); here heads output logits, ℓ is the ordinary cross-entropy, and the penalty and
    the confidence use the softmax probabilities q (in [0, 1] like the code's sigmoid outputs).
  * one optimizer (``train.*``) for all parameters instead of one Adam per modality and one for g
    with their own learning rates (P:23-31, T:28-39).
  * the code pre-trains the uni-modal branches by default (``is_pretrain=True``: Σ_m ℓ_m for
    ``pre_epoch`` = 15 (resume) / 30 (MOSI) epochs at batch 64 before its 100 / 200 epochs,
    resume_config.py:19-22, mosi_config.py:18-21). Here that is the first ``pretrain_epochs`` loop
    epochs of the budget, default 0 (no pre-training): set it to reproduce the code's schedule.
  * MindSpore's branch steps rejected samples through cells called without inputs
    (``self.text_trainer()``), which does not follow the paper or the other two branches; not
    followed.
  * ties in the confidence rule go to the first modality (the Torch code leaves ``out`` unset).

Logged per step (averaged per epoch): ``loss``, ``domfn_ce_<m>``, ``domfn_ce_fused``,
``domfn_penalty_<m>`` (mean p_m), ``domfn_fused_frac`` (fraction of consistent samples).
"""
import torch
import torch.nn.functional as F

from ..models import FUSIONS, MultiHeadModel
from ..models.multi_head import FEATURE_FUSIONS
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, Space, number, one_of

FORMS = ("auto", "resume", "mosi")
FORM_TAU = {"resume": 0.2, "mosi": 0.5}     # config/resume_config.py:61, config/mosi_config.py:46


def resolve_form(form, num_modalities):
    """"auto" → "resume" for two modalities, "mosi" for more."""
    return ("resume" if num_modalities == 2 else "mosi") if form == "auto" else form


# ---- the paper's quantities, as plain functions ------------------------------------------------
def divergence_penalties(probs, fused_probs=None):
    """p_m = max_c (q_m − r)² per sample: {m: (B, K)} → {m: (B,)}, with the reference r the fused
    prediction ``fused_probs`` (B, K) when given ("resume"), else the mean q̄ = mean_j q_j ("mosi")."""
    ref = fused_probs if fused_probs is not None else torch.stack(list(probs.values())).mean(dim=0)
    return {m: (q - ref).pow(2).max(dim=-1).values for m, q in probs.items()}


def consistent_mask(penalties, tau, gamma):
    """c_i = 1[max_m p_m,i / τ < γ]: {m: (B,)} → bool (B,)."""
    scaled = torch.stack([p.detach() for p in penalties.values()]) / tau
    return (scaled < gamma).all(dim=0)


def max_penalty(form, num_modalities):
    """The largest value p_m can take: 1 against the fused prediction, ((M−1)/M)² against the mean."""
    return 1.0 if form == "resume" else ((num_modalities - 1) / num_modalities) ** 2


def domfn_terms(uni_logits, fused_logits, y, eta, tau, gamma, form):
    """The per-sample terms of the amended loss under ``form`` ("resume" or "mosi").

    Returns {"joint": (B,) the loss of a consistent sample, Σ_m (½ℓ_m² − η p_m) + Σ_m ℓ_m + ℓ_f;
    "rejected": {m: (B,)} what modality m trains on for a rejected sample (½ℓ_m² − η p_m for
    "resume", ℓ_m for "mosi"); "ce": {m: (B,)}; "ce_fused": (B,); "penalty": {m: (B,)};
    "consistent": bool (B,)}."""
    probs = {m: F.softmax(z, dim=-1) for m, z in uni_logits.items()}
    fused_probs = F.softmax(fused_logits, dim=-1) if form == "resume" else None
    penalty = divergence_penalties(probs, fused_probs)
    c = consistent_mask(penalty, tau, gamma)
    ce = {m: F.cross_entropy(z, y, reduction="none") for m, z in uni_logits.items()}
    ce_f = F.cross_entropy(fused_logits, y, reduction="none")
    amended = {m: 0.5 * ce[m] * ce[m] - eta * penalty[m] for m in ce}
    joint = sum(amended.values()) + sum(ce.values()) + ce_f
    rejected = amended if form == "resume" else ce
    return {"joint": joint, "rejected": rejected, "ce": ce, "ce_fused": ce_f, "penalty": penalty, "consistent": c}


def domfn_predict(uni_logits, fused_logits, tau, gamma, form):
    """Per sample: softmax(z_f) if consistent, else q of the most confident modality → (B, K)."""
    probs = {m: F.softmax(z.float(), dim=-1) for m, z in uni_logits.items()}
    fused = F.softmax(fused_logits.float(), dim=-1)
    c = consistent_mask(divergence_penalties(probs, fused if form == "resume" else None), tau, gamma)
    stacked = torch.stack(list(probs.values()))                          # (M, B, K)
    best = stacked.max(dim=-1).values.argmax(dim=0)                       # (B,) first on ties
    uni = stacked.gather(0, best.view(1, -1, 1).expand(1, *stacked.shape[1:])).squeeze(0)
    return torch.where(c.unsqueeze(-1), fused, uni)


class DOMFN(SingleOptimizerMethod):
    name = "domfn"
    params = {
        "form": Param("auto", one_of(*FORMS),
                      "released code followed: resume (Paddle, the paper's task: penalty against the fused "
                      "prediction, rejected samples on their amended loss) | mosi (Torch: against the mean "
                      "uni-modal prediction, rejected samples on plain CE) | auto (resume for 2 modalities, "
                      "mosi for more)"),
        "eta": Param(0.5, number(at_least=0), "weight η of the divergence term (configs: 0.5)",
                     Space("log", 0.05, 5.0)),      # ours: a decade each side
        "tau": Param(None, number(above=0, optional=True),
                     "penalty scale τ (None: the form's config, 0.2 resume / 0.5 mosi)"),
        "gamma": Param(0.8, number(at_least=0), "fusion margin γ: a sample is fused when max_m p_m/τ < γ (configs: 0.8)",
                       Space("log", 0.08, 8.0)),    # ours: a decade each side
        "feature_fusion": Param("concat", one_of(*FEATURE_FUSIONS), "the fusion head's input: concat | mean | max"),
        "pretrain_epochs": Param(0, number(at_least=0, integer=True),
                                 "loop epochs of uni-modal pre-training (the code: 15 resume / 30 MOSI)"),
        "fusion": fusion_param("divergence", ("divergence",) + FUSIONS),
    }

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        return MultiHeadModel.build(spec, self.feature_fusion)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        super().setup(model, ctx)

    @property
    def resolved_form(self):
        """The form for this model's number of modalities (also when a checkpoint is only evaluated)."""
        return resolve_form(self.form, len(self.model.modalities))

    @property
    def penalty_scale(self):
        return FORM_TAU[self.resolved_form] if self.tau is None else self.tau

    def notices(self):
        out = []
        M = len(self.model.modalities)
        bound = max_penalty(self.resolved_form, M)
        if self.gamma == 0:
            out.append("gamma=0: no sample is ever fused (p/τ < 0 never holds); DOMFN trains and predicts uni-modally")
        elif bound < self.gamma * self.penalty_scale:
            out.append(f"form {self.resolved_form} with {M} modalities: p ≤ {bound:.3g} < γτ = "
                       f"{self.gamma * self.penalty_scale:.3g}, so every sample is fused and the margin never rejects")
        budget = self.ctx.epochs_per_modality if self.ctx is not None else None
        if budget is not None and self.pretrain_epochs >= budget:
            out.append(f"pretrain_epochs={self.pretrain_epochs} >= the {budget}-epoch budget: only uni-modal "
                       "pre-training runs; the amended loss never acts")
        return out

    # ---- training ---------------------------------------------------------------------
    def modality_parameters(self, m):
        """Modality m's encoder and uni-modal head: what its own optimizer steps in the released code."""
        return list(self.model.encoders[m].parameters()) + list(self.model.heads[m].parameters())

    def training_step(self, batch, step):
        xs, y = batch
        uni, fused = self.model.outputs(xs)
        if step.epoch < self.pretrain_epochs:           # uni-modal pre-training: Σ_m ℓ_m
            ce = {m: F.cross_entropy(z, y) for m, z in uni.items()}
            loss = sum(ce.values())
            self.minimize(loss)
            return {"loss": loss.detach(), **{f"domfn_ce_{m}": v.detach() for m, v in ce.items()}}

        parts = domfn_terms(uni, fused, y, self.eta, self.penalty_scale, self.gamma, self.resolved_form)
        c = parts["consistent"]
        B = len(y)
        joint = (parts["joint"] * c).sum() / B
        rejected = {m: (r * ~c).sum() / B for m, r in parts["rejected"].items()}
        self.optimizer.zero_grad(set_to_none=True)
        if bool(c.any()):                               # consistent samples: one backward through everything
            joint.backward(retain_graph=True)
        if not bool(c.all()):                           # rejected samples: each modality on its own term
            for m, term in rejected.items():
                params = [p for p in self.modality_parameters(m) if p.requires_grad]
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
        self.optimizer.step()
        loss = joint.detach() + sum(r.detach() for r in rejected.values())
        logs = {f"domfn_ce_{m}": v.detach().mean() for m, v in parts["ce"].items()}
        logs["domfn_ce_fused"] = parts["ce_fused"].detach().mean()
        logs.update({f"domfn_penalty_{m}": p.detach().mean() for m, p in parts["penalty"].items()})
        logs["domfn_fused_frac"] = c.float().mean()
        return {"loss": loss, **logs}

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        return self.model.outputs(xs)

    @torch.no_grad()
    def predict(self, xs):
        if self.fusion != "divergence":
            return super().predict(xs)
        uni, fused_logits = self.logits(xs)
        per_modality = {m: F.softmax(z.float(), dim=-1) for m, z in uni.items()}
        return domfn_predict(uni, fused_logits, self.penalty_scale, self.gamma, self.resolved_form), per_modality
