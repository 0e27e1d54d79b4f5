"""MILES — Modality-Informed Learning ratE Scheduler.

Guerra-Manzanares, Shamout, "MILES: Modality-Informed Learning Rate Scheduler for Balancing
Multimodal Learning", IJCNN 2025 (arXiv 2510.17394v1). Two modalities A, B.

Sources. The paper's text (arXiv v1), read from a copy of its PDF kept in a third-party repository
(VuVoCodes/AsynchronousFunction @92a0475, ``Papers/Guerra-Manzanares and Shamout - 2025 - MILES …
.pdf``); cited below as §, Eq., Alg. 1 and Table. The paper links the authors' code
(github.com/nyuad-cai/MILES), which could not be reached here, so nothing below is checked against
it. A third-party re-implementation was read for comparison (VuVoCodes/AsynchronousFunction
``scripts/train.py`` lines 199-375, cited as ASGML:line).

Model (§II-A, §IV-B "Architecture"; ``MultiHeadModel``): a joint-fusion network, an encoder φ_m per
modality whose features are fused by concatenation (``feature_fusion="concat"``, Table II, the
default) or summation ("sum", Table III) into a fusion head g, plus a classification head h_m per
encoder for the auxiliary unimodal loss (§III-D, last assumptions):

    f_m = φ_m(x_m) (B, d),   z_m = h_m(f_m) (B, K),   z_AB = g([f_A; f_B]) or g(f_A + f_B) (B, K).

The paper's g and h_m are single linear layers; here every head has the run's ``model.head_hidden``
widths, as in every ``mie`` method (``model.head_hidden: []`` gives the paper's).

Loss (Eq. 3; γ = ``gamma``, 1 in the paper, other values ours):

    L = CE(z_AB, y) + γ (CE(z_A, y) + CE(z_B, y)).

Conditional utilisation rates (Eq. 4, 5) after each epoch, from the performance metric M
(``metric``: accuracy, or macro F1 as the paper uses F1 on MM-IMDb) of the fused prediction and of
each unimodal head:

    u_A = (M(ŷ_AB) − M(ŷ_B)) / M(ŷ_AB),   u_B = (M(ŷ_AB) − M(ŷ_A)) / M(ŷ_AB),   δ = |u_A − u_B|.

M(ŷ_AB) is the loop's fused metric, i.e. of the prediction the ``fusion`` rule gives: the fusion
head g by default ("model"); under "average" or "weight" that fused prediction's (ours). M(ŷ_m) is
modality m's own head h_m (the paper's "unimodal classification heads").

Learning rates (Alg. 1; §III-D). With α the global rate (``train.lr`` × the loop's schedule), the
fusion head trains at α always (α_AB, never changed) and modality m's group — encoder φ_m and its
head h_m, named by m — at α_m = α · r_m, r_m = ``lr_scale(m)``, r_A = r_B = 1 at the start. After
epoch t's validation (``on_validation``; acting from epoch t+1):

    if δ ≤ τ or (u_A < 0 and u_B < 0):  r_A ← 1, r_B ← 1                      (lines 8-10)
    elif u_A > 0 and u_B < 0:           r_A ← μ                                 (lines 12-13)
    elif u_A < 0 and u_B > 0:           r_B ← μ                                 (lines 14-15)
    elif u_A < u_B:                     r_B ← μ         else:  r_A ← μ          (lines 16-21)

i.e. when the gap exceeds τ and the fused prediction is not worse than both heads, the modality
with the larger u (the higher unimodal metric) trains at μα. μ multiplies the GLOBAL rate, so it
never compounds across epochs. As written in Alg. 1, the branch that lowers one modality leaves
the other's r as it was (it is μ only when the dominant modality switched directly from one epoch
to the next without passing through lines 8-10); ASGML:348-357 resets the other to 1 instead.

Defaults and their sources: τ = 0.2, μ = 0.5 ("the best configurations for MILES in our
experiments", §V-C, used for the ablations; the recommended start, §V "Recommendations"), γ = 1
(Eq. 3), concatenation (Table II), the validation split (``split="val"``: Tables II-III; "train"
recomputes u on the training split, the paper's ablation in Table VI, via ``ctx.evaluate``).
As in the paper (§V-C, Table VI), the validation split that drives the rule is also the split the
loop selects the checkpoint on (``train.select_on``).

The authors' training settings (to be set in the run config, shared by all methods): Adam with
β = (0.9, 0.999); 80 random hyper-parameter draws (learning rate among them) per dataset, fusion
and method, best model chosen on validation; CREMA-D: 1 frame, ResNet-18 encoders, 200 epochs;
S-MNIST 50 epochs (ResNet-10); LUMA 60 (ResNet-6); MM-IMDb 50 (BERT + ResNet-50). Reported
CREMA-D test accuracy: 75.1 concat / 75.7 sum (vanilla 62.6 / 62.9). The example run of Fig. 2
uses lr 0.00069, τ = 0.05, μ = 0.5.

Reconstructed (the paper does not say; our choices):
  - which parameters are "modality A's": here encoder φ_A AND its head h_A (Eq. 3 calls L_A "the
    loss of the encoder of modality A"); ASGML:212-230 keeps the unimodal heads at α with g;
  - when M(ŷ_AB) = 0 (u undefined), lines 8-10 apply (both rates back to α);
  - the learning rate is changed through the loop's param-group scales, so the loop's step schedule
    (``train.lr_step``) multiplies α_AB, α_A and α_B alike; the paper names no other schedule.

Three or more modalities: Eq. 4 and Alg. 1 are defined for a pair; §VII only sketches pairwise
gaps with one conditional block each ("adaptation may be required") and leaves it to future work,
so ``setup`` refuses M ≥ 3.

Inference (``fusion``): "model" (default) predicts softmax(z_AB), the fusion head; "average" and
"weight" fuse the unimodal heads' predictions (``mie.models.fusion``).

Logged by ``on_validation``: ``miles_u_<m>`` (u_m), ``miles_delta`` (δ) and ``miles_scale_<m>``
(r_m for the next epoch); by each step: ``loss``, ``loss_fused`` and ``loss_<m>``.
"""
import math

import torch.nn.functional as F

from ..errors import MieInputError
from ..models import FUSIONS, MultiHeadModel
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, Space, number, one_of

FEATURE_FUSIONS = ("concat", "sum")
SPLITS = ("val", "train")
METRICS = ("accuracy", "macro_f1")


def utilization_rates(fused, unimodal):
    """Eq. 4: {A: M(ŷ_A), B: M(ŷ_B)} and M(ŷ_AB) → {A: u_A, B: u_B}; None when M(ŷ_AB) = 0."""
    (a, metric_a), (b, metric_b) = unimodal.items()
    if fused <= 0:
        return None
    return {a: (fused - metric_b) / fused, b: (fused - metric_a) / fused}


def miles_scales(scales, util, tau, mu):
    """Alg. 1 lines 8-23: the rate factors {m: α_m / α} for the next epoch, from the current ones
    and the utilisation rates ``util`` (None: lines 8-10)."""
    a, b = scales
    if util is None or abs(util[a] - util[b]) <= tau or (util[a] < 0 and util[b] < 0):
        return {a: 1.0, b: 1.0}
    if util[a] > 0 and util[b] < 0:
        dominant = a
    elif util[a] < 0 and util[b] > 0:
        dominant = b
    else:
        dominant = b if util[a] < util[b] else a
    return {**scales, dominant: mu}


class MILES(SingleOptimizerMethod):
    name = "miles"
    params = {
        "tau": Param(0.2, number(at_least=0, at_most=1), "τ: target difference threshold on δ = |u_A − u_B| (paper: 0.2)",
                     Space("log", 0.02, 1.0)),  # ours: a decade below, up to the bound; holds Fig. 2's 0.05
        "mu": Param(0.5, number(above=0, at_most=1), "μ: the dominant modality trains at μ × the global rate (paper: 0.5)",
                    Space("float", 0.1, 0.9)),  # ours (1 would never slow the dominant modality)
        "gamma": Param(1.0, number(at_least=0), "γ: weight of each unimodal head's loss (paper, Eq. 3: 1)",
                       Space("log", 0.1, 10.0)),    # ours: a decade each side
        "feature_fusion": Param("concat", one_of(*FEATURE_FUSIONS),
                                "fusion head input: concatenated (paper Table II) or summed (Table III) features"),
        "split": Param("val", one_of(*SPLITS), "split the utilisation rates are computed on (paper: val; "
                                               "train is its Table VI ablation)"),
        "metric": Param("accuracy", one_of(*METRICS), "performance metric M of Eq. 4"),
        "fusion": fusion_param("model", FUSIONS),
    }

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        return MultiHeadModel.build(spec, self.feature_fusion)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        if len(model.modalities) > 2:
            raise MieInputError(
                f"MILES is defined for exactly 2 modalities, got {len(model.modalities)} ({', '.join(model.modalities)}): "
                "its conditional utilisation rates (Eq. 4) and the rule on δ = |u_A − u_B| (Algorithm 1) compare one "
                "pair, and the paper leaves more modalities to future work. Select 2 modalities (data.modalities) "
                "or use a method that handles M modalities (mie, mla, agm).")
        super().setup(model, ctx)
        self.scales = {m: 1.0 for m in model.modalities}

    def parameter_groups(self, model):
        groups = [{"params": model.modality_parameters(m), "name": m} for m in model.modalities]
        return groups + [{"params": list(model.fused_head.parameters())}]

    def lr_scale(self, group):
        return self.scales.get(group, 1.0)

    def notices(self):
        if self.mu == 1:
            return ["mu=1: no learning rate ever changes (paper Table V: MILES disabled); this run is joint "
                    "training with unimodal losses"]
        epochs = self.ctx.epochs_per_modality
        if epochs < 2:
            return [f"a learning rate can first change in epoch 2 (after epoch 1's {self.split} metrics); this run "
                    f"has {epochs} epoch, so it is joint training with unimodal losses at the global rate"]
        return []

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch, step):
        xs, y = batch
        per, fused = self.model.outputs(xs)
        fused_loss = F.cross_entropy(fused, y)
        unimodal = {m: F.cross_entropy(z, y) for m, z in per.items()}
        loss = fused_loss + self.gamma * sum(unimodal.values())
        self.minimize(loss)
        return {"loss": loss.detach(), "loss_fused": fused_loss.detach(),
                **{f"loss_{m}": v.detach() for m, v in unimodal.items()}}

    def on_validation(self, epoch, metrics):
        """Alg. 1 lines 5-23 on this epoch's metrics of ``split``; the new rates act from the next epoch."""
        if self.split == "train":
            metrics = self.ctx.evaluate("train")
        unimodal = {m: metrics["per_modality"][m][self.metric] for m in self.model.modalities}
        util = utilization_rates(metrics[self.metric], unimodal)
        self.scales = miles_scales(self.scales, util, self.tau, self.mu)
        a, b = self.model.modalities
        logs = {"miles_delta": math.nan if util is None else abs(util[a] - util[b])}
        for m in (a, b):
            logs[f"miles_u_{m}"] = math.nan if util is None else util[m]
            logs[f"miles_scale_{m}"] = self.scales[m]
        return logs

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        per, fused = self.model.outputs(xs)
        return {m: z.float() for m, z in per.items()}, fused.float()

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "scales": dict(self.scales)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.scales = dict(state["scales"])
