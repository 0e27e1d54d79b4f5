"""CGGM — Classifier-Guided Gradient Modulation.

Guo, Jin, Chen, Zhao: "Classifier-guided Gradient Modulation for Enhanced Multimodal Learning",
NeurIPS 2024 (arXiv 2411.01409); code: github.com/zrguo/CGGM at 21e428c, cited below as file:line:
``src/foodtrain.py`` (FT; two modalities, UPMC-Food 101), ``src/msatrain.py`` (MT; three, CMU-MOSI
and IEMOCAP), ``src/eval_metrics.py``, ``models/msamodel.py``, ``models/foodmodel.py``,
``run/*_run.py``. Only the paper's abstract could be read here: everything below is the released
code, which is the default, except what is marked ours.

Model (``MultiHeadModel``, concatenated features): encoders φ_i, a fused classifier g, and one
auxiliary classifier f_i per modality fed with φ_i's features DETACHED from the graph:

    h_i = φ_i(x_i),    ŷ = g([h_1; …; h_M]),    ŷ_i = f_i(stopgrad(h_i))        (B, K) each

The code's ``hs`` are ``clone().detach()`` copies (foodmodel.py:54, msamodel.py:66). Its fusion is a
transformer over the concatenated token sequences (foodmodel.py:55-59), and each f_i is a small
transformer with an output layer (msamodel.py:77-108). Here g and the f_i are ``ClassifierHead``s
with the run's ``model.head_hidden`` widths. The f_i never enter the fused prediction (the paper's
"discarded at inference"). Their predictions are what this method reports per modality.

One step t on a mini-batch (FT:64-135; MT:56-127 is the same with three modalities):

 1. L = CE(ŷ, y) + λ·L_gm^(t−1), then backward (FT:85-88). L_gm^(t−1) is the direction term of
    the PREVIOUS step: none at the run's first step, and it carries over between epochs (FT:54-58).
 2. Zero the f_i's gradients. Then Σ_i CE(ŷ_i, y), backward into the f_i only (FT:91-104).
 3. ε_i^t is the batch accuracy of argmax ŷ_i (msamodel.py:110-126, eval_metrics.py:56-73), and
        Δ_i = ε_i^t − ε_i^(t−1)      (ε^(−1) = 0 at the run's start, FT:54),
        S = Σ_k Δ_k + 1e-8,    B_i = (S − Δ_i) / S                      (FT:112-120)
 4. L_gm^t = ( Σ_i |B_i| − Σ_i B_i · cos(W_i, W) ) / M                  (FT:110, 122-123)
    W_i is the weight of f_i's output layer and W the weight of g's, each flattened
    (``cal_cos``, eval_metrics.py:165-173). The code calls them ``cls_grad`` and ``fusion_grad``,
    but they hold the parameters, not gradients (FT:97-99, 106-108).
 5. Every gradient of encoder φ_i is multiplied by ρ·B_i (FT:125-129).
 6. Step the f_i (FT:131). Clip the global gradient norm of the fused model (encoders and g, not
    the f_i) to ``clip`` (FT:133). Step the fused model (FT:135).

How L_gm^(t−1) acts. The code keeps L_gm^t's autograd graph, which is built on clones of W_i and W,
and adds λ·L_gm^t to the next step's loss. Its gradient is evaluated at step t's weights and is
accumulated into the gradients of step t+1. The part that reaches the W_i is erased by the
auxiliary zero_grad (FT:91), which runs after that backward. So the term adds
λ·∂L_gm^t/∂W = −(λ/M) Σ_i B_i^t ∂cos(W_i^t, W^t)/∂W to g's output-layer gradient at step t+1, and
does nothing else. Here that gradient is computed at step t and kept for the next step (in
``state_dict``, so a resumed run continues exactly). The Σ|B_i| part has no gradient.

The balancing term is unbounded. When the Δ_k cancel (S = 1e-8), B_i ≈ −Δ_i·1e8. In general
B_i < 0 whenever Δ_i > S > 0 or Δ_i < S < 0. A negative B_i reverses the gradient of that encoder
(ascent), and the clip bounds the step. This is
reproduced. ``coeff_clip=c`` (ours, opt-in) clamps each B_i into [0, c]: c = 1 is the range that
B_i takes when every Δ_k has the same sign. With all Δ_k = 0, every B_i = 1.

Defaults and their sources (the run scripts' argparse defaults):
- ρ = 1.3: food_run.py:63, iemo_run.py:55, mosi_run.py:58 (BraTS: 1.0, brats_run.py:31).
- λ = 0.2: mosi_run.py:59, iemo_run.py:56, and the README's example command. Per dataset: Food-101
  0.05 (food_run.py:64), BraTS 0.1 (brats_run.py:32).
- ``clip`` = 0.8: food_run.py:51, iemo_run.py:45, mosi_run.py:47. The code clips in every run,
  with or without modulation (FT:133). This library's run config has no clipping, so the clip is a
  parameter of this method, on by default because ρ·B_i is unbounded. ``clip=None`` turns it off.
- Auxiliary learning rate = 0.5 × the run's (``cls_lr_ratio``). The scripts use ``--cls_lr`` 5e-4
  against ``--lr`` 1e-3 (food_run.py:53-55, iemo_run.py:47-49, mosi_run.py:49-51). BraTS uses 6e-3
  against a base of 1e-2 (brats_run.py:23, 28). The f_i train with a separate optimizer (FT:21),
  built from the run's optimizer settings. Its parameter group is named ``cggm_classifiers``, and
  ``lr_scale`` gives it the ratio on top of the run's schedule.
- Inference (``fusion``): "model" (default) is softmax(ŷ), the code's prediction (FT:166). The
  alternatives, "average" and "weight", fuse the f_i's predictions (ours).

Training settings the authors report (shared run settings here, not this method's): Food-101 used
AdamW, lr 1e-3, weight decay 6e-3 (3e-3 for the classifiers), batch 128, 60 epochs (FT:21, 36;
food_run.py:49, 57-59). MOSI and IEMOCAP used Adam, lr 1e-3, no weight decay, batch 64, 30 epochs
(MT:21, 30; iemo_run.py:43, 51-52). All of them used ReduceLROnPlateau on the validation loss
(factor 0.1, patience 10; FT:39) and seed 666.

Where this differs from the code:
- Our φ_i is the whole encoder. The code's modulated encoders exclude the 1×1-conv input projections
  (``projv``/``projt``, foodmodel.py:21-22; ``proj``, msamodel.py:28-31), which are not scaled.
- With ``model.head_hidden: []``, g's output layer (K, M·d) and f_i's (K, d) differ in shape.
  Modality i's block of g's columns then takes W's place in cos(W_i, ·) (ours; the code's layers
  always match).
- MOSI's accuracy is by sign (regression). Here it is always argmax accuracy (classification).
- BraTS (``src/segtrain.py``) never clips and scales only parameters named ``vision_encoder`` or
  ``text_encoder``, which its DeepLab model does not have (segtrain.py:106-110). So only L_gm acts
  there. That variant is not reproduced.
- Paper and code: the abstract speaks of modulating the gradients' magnitudes and directions. The
  direction term in the code is the cosine between output-layer weights (step 4), and that is
  followed here.

Any M ≥ 2: B_i and L_gm are sums over the modalities (MT is the M = 3 case, :116-122).

Logged per step: ``loss`` is CE(ŷ, y). The code's ``raw_loss`` adds λ·L_gm^(t−1), whose Σ|B_i| part
has no gradient and can reach 1e7. Also logged: ``cggm_aux_loss``, ``cggm_gm`` (L_gm^t), and per
modality ``cggm_acc_<m>`` (ε_i^t), ``cggm_coeff_<m>`` (B_i) and ``cggm_cos_<m>``.
"""
import torch
import torch.nn.functional as F

from ..models import FUSIONS, MultiHeadModel
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, Space, number

CLASSIFIERS = "cggm_classifiers"      # the auxiliary classifiers' parameter group


def batch_accuracy(logits, y):
    """Fraction of argmax(logits) (B, K) equal to y (B,), as a float."""
    return int((logits.argmax(dim=-1) == y).sum()) / len(y)


def balancing_coefficients(acc, prev_acc, coeff_clip=None):
    """B_i = (S − Δ_i) / S with Δ_i = acc_i − prev_acc_i and S = Σ_k Δ_k + 1e-8 ({m: float} → {m: float}),
    clamped into [0, coeff_clip] when ``coeff_clip`` is given (ours)."""
    delta = {m: acc[m] - prev_acc[m] for m in acc}
    total = sum(delta.values()) + 1e-8
    coeffs = {m: (total - d) / total for m, d in delta.items()}
    if coeff_clip is not None:
        coeffs = {m: min(max(b, 0.0), coeff_clip) for m, b in coeffs.items()}
    return coeffs


def direction_term(aux_weights, fused_weight, coeffs):
    """L_gm = (Σ_i |B_i| − Σ_i B_i cos(W_i, W)) / M, its gradient with respect to W (evaluated at the
    given weights), and {m: cos}. ``aux_weights`` {m: W_i (K, d)}; ``fused_weight`` W (K, d) or, with
    concatenated features and no hidden layer, (K, M·d), of which modality i's block of d columns is used."""
    W = fused_weight.detach().clone().requires_grad_(True)
    cos = {}
    for i, (m, Wi) in enumerate(aux_weights.items()):
        Wi = Wi.detach()
        d = Wi.shape[1]
        Wm = W if W.shape == Wi.shape else W[:, i * d:(i + 1) * d]
        cos[m] = F.cosine_similarity(Wi.reshape(-1), Wm.reshape(-1), dim=0)
    gm = (sum(abs(b) for b in coeffs.values()) - sum(coeffs[m] * cos[m] for m in coeffs)) / len(coeffs)
    grad, = torch.autograd.grad(gm, W)
    return gm.detach(), grad, {m: c.detach() for m, c in cos.items()}


class CGGM(SingleOptimizerMethod):
    name = "cggm"
    params = {
        "rho": Param(1.3, number(at_least=0), "ρ: encoder i's gradients are multiplied by ρ·B_i",
                     Space("log", 0.13, 13.0)),     # ours: a decade each side; holds the scripts' 1.0 (BraTS)
        "lam": Param(0.2, number(at_least=0), "λ: weight of the direction term L_gm (from the previous step)",
                     Space("log", 0.02, 2.0)),      # a decade each side; holds the scripts' 0.05 and 0.1
        "clip": Param(0.8, number(above=0, optional=True),
                      "max global gradient norm of the encoders and fused head (None: no clipping)"),
        "cls_lr_ratio": Param(0.5, number(above=0), "auxiliary classifiers' learning rate / the run's (5e-4 / 1e-3)",
                              Space("log", 0.05, 5.0)),     # ours: a decade each side; holds BraTS's 0.6
        "coeff_clip": Param(None, number(above=0, optional=True),
                            "None: B_i unbounded (released code); c: B_i clamped into [0, c] (ours)"),
        "fusion": fusion_param("model", FUSIONS),
    }

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        return MultiHeadModel.build(spec, "concat")

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        super().setup(model, ctx)
        self.aux_optimizer = ctx.make_optimizer([{"params": list(model.heads.parameters()), "name": CLASSIFIERS}])
        self.prev_acc = {m: 0.0 for m in model.modalities}     # ε^(t−1)
        self.gm_grad = None                                      # ∂L_gm^(t−1)/∂W

    def parameter_groups(self, model):
        """The fused model: encoders and fused head (the auxiliary classifiers have their own optimizer)."""
        return list(model.encoders.parameters()) + list(model.fused_head.parameters())

    def lr_scale(self, group):
        return self.cls_lr_ratio if group == CLASSIFIERS else 1.0

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch, step):
        xs, y = batch
        model, mods = self.model, self.model.modalities
        feats = model.features(xs)
        task = F.cross_entropy(model.fused_logits(feats), y)
        self.optimizer.zero_grad(set_to_none=True)
        task.backward()
        W = model.fused_head.linears[-1].weight
        if self.gm_grad is not None:                                   # λ·L_gm^(t−1)
            W.grad.add_(self.gm_grad, alpha=self.lam)

        self.aux_optimizer.zero_grad(set_to_none=True)
        aux = {m: model.heads[m](feats[m].detach()) for m in mods}
        aux_loss = sum(F.cross_entropy(aux[m], y) for m in mods)
        aux_loss.backward()

        acc = {m: batch_accuracy(aux[m], y) for m in mods}
        coeffs = balancing_coefficients(acc, self.prev_acc, self.coeff_clip)
        gm, gm_grad, cos = direction_term({m: model.heads[m].linears[-1].weight for m in mods}, W, coeffs)
        for m in mods:
            for p in model.encoders[m].parameters():
                if p.grad is not None:
                    p.grad.mul_(coeffs[m] * self.rho)
        self.aux_optimizer.step()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.parameter_groups(model), self.clip)
        self.optimizer.step()

        self.prev_acc, self.gm_grad = acc, gm_grad
        logs = {"loss": task.detach(), "cggm_aux_loss": aux_loss.detach(), "cggm_gm": gm}
        for m in mods:
            logs.update({f"cggm_acc_{m}": acc[m], f"cggm_coeff_{m}": coeffs[m], f"cggm_cos_{m}": cos[m]})
        return logs

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        return self.model.outputs(xs)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "aux_optimizer": self.aux_optimizer.state_dict(),
                "prev_acc": dict(self.prev_acc),
                "gm_grad": None if self.gm_grad is None else self.gm_grad.clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.aux_optimizer.load_state_dict(state["aux_optimizer"])
        self.prev_acc = dict(state["prev_acc"])
        device = next(self.model.parameters()).device
        self.gm_grad = None if state["gm_grad"] is None else state["gm_grad"].to(device)
