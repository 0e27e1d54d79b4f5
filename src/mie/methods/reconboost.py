"""ReconBoost — modality-alternating boosting with a reconcilement loss.

Hua, Xu, Bao, Yang, Huang, "ReconBoost: Boosting Can Achieve Modality Reconcilement", ICML 2024
(arXiv 2405.09321); code: github.com/huacong/ReconBoost @14ab57a, cited below as T:line for
``train.py``, D:line for ``models/dynamic_net.py``, S:line for ``schedule.py`` and MSA:line for
``train_MSA.py``. Only the paper's abstract could be read here; the equations below are the
released code's, which the paper's three ingredients map onto: the KL-based reconcilement
regularisation (phase 1's weighting), memory consolidation (the α term) and global rectification
(phase 2).

Model. Learner f_m = h ∘ φ_m: modality m's encoder φ_m and ONE head h shared by every modality
(``--common_space`` True, T:61; ``model.fc = net_ensemble.head``, T:287-288; the head, D:5-15 and
D:38-42, is the run's ``model.head_hidden`` here). The ensemble is F = β Σ_m f_m with a learnable
scalar β ("boost rate", 1.0 at start: ``--boost_rate``, T:57; D:33, D:135, D:170).

Training is a sequence of stages s = 0, 1, …; stage s belongs to modality m = cycle[s mod M]
(round robin, S:33-61; ``order``, default the data's order). A stage has two phases.

Phase 1, ``epochs_per_stage`` epochs (T:295-356): only f_m learns (φ_m and h: the optimizer is
built on ``model.parameters()``, which include the shared head as ``model.fc``, T:296). Per sample,
with C classes, the other learners' ensemble and f_m's prediction

    q = softmax(β Σ_{k≠m} f_k(x_k))   (no gradient: D:122-135, ``.detach()`` T:340)
    p = softmax(f_m(x_m))
    ℓ = (1/C) (w1 − w2 · q_y) (−log p_y)          (T:337-340; the 1/C is ``.mean(-1)`` over classes)
    L = mean_batch ℓ + α · MSE(sg softmax f_m, sg softmax f_k')     (T:344-352)

where k' is the modality trained in the previous stage (the partner fixed per modality in
T:267-284 and MSA:211-222) and sg stops the gradient: the code detaches BOTH inputs of this
"memory consolidation" term (T:349), so it changes the reported loss and no gradient. That is
reproduced, not repaired: ``alpha`` moves the logged ``loss`` only. As in the code the term is
absent in stage 0 (T:345-346). A sample the others already classify (q_y → 1) weighs (w1 − w2)/C,
one they miss weighs up to w1/C: f_m is pushed towards what the other modalities get wrong.

Phase 2, "global rectification", ``rectify_epochs`` epochs (``--correct_epoch``, T:369-402):
CE(F(x), y) on every encoder, the head and β (D:59-73, D:137-170).

The code builds a new SGD optimizer for each phase (T:296, T:371), so momentum restarts at every
phase. Here one optimizer from the run's config holds every parameter; a phase trains only the
parameters that receive a gradient (the others keep theirs at None and are skipped), and
``restart_optimizer`` (default True, the code) clears the optimizer's state at each phase start,
which makes it the code's fresh optimizer exactly.

Inference: softmax(β Σ_m f_m) (T:131-134: ``fusion="model"``, the default); modality m's own
prediction is softmax(f_m).

Defaults (the code's CREMA-D settings): w1 = 5 (``--weight1``, T:75, README's CREMA-D command;
README uses 4 for AVE and ModelNet40; MSA:77-78 use w1 = 1, w2 = 0.25), w2 = 1 (T:76), α = 0.5
(T:77), 4 + 4 epochs per stage (T:59-60), β = 1 at start. Authors' reported training settings (not
the method's: ``train.*`` sets them for every method): batch 64, SGD lr 0.01 for both phases
(T:64-65), momentum 0.9, weight decay 5e-4 (also on β; T:296, T:371), ×0.1 every 30 stages on
CREMA-D (T:449-451), ×0.5 at stage 40 on AVE, 1001 stages (``utils.check_status``), encoders
pre-trained uni-modally (``--use_pretrain`` in every README command), the checkpoint chosen on the
TEST split after each stage from stage 3 on (T:408, T:420). Reported: CREMA-D 81.11 (released
checkpoint name); BalanceBenchmark's rerun 74.01.

Budget. ``mie compare`` holds every modality at E = ``train.epochs`` epochs of updates. In a cycle
of M stages modality m is updated in its own P = ``epochs_per_stage`` phase-1 epochs and in all
M·R rectification epochs (R = ``rectify_epochs``): P + M·R epochs, in M·(P + R) loop epochs. The
run is ⌊E / (P + M·R)⌋ whole cycles, then, for the rest E' > 0, one shortened cycle in the same
order: each stage has a = round(E'·P / (P + M·R)) phase-1 epochs (at least 1, so that the
reweighting acts) and the r = E' − a rectification epochs are spread over its stages, earlier
stages taking one more (``stage_plan``). Every modality ends with exactly E. The paper's CREMA-D
4 + 4 on two modalities is a 16-epoch cycle giving each modality 12 epochs; E = 100 is 8 cycles
and a last cycle of 1 + 2 and 1 + 1 epochs, 133 loop epochs. (The code's checkpoint, stage 99, had
50 such cycles: 600 epochs per modality.) A budget shorter than one cycle is announced
(``notices``). ``train.lr_step`` reads the run's progress on the budget's scale,
⌊e·E / L⌋ at loop epoch e of L, as the code's decay is indexed by stage, i.e. by progress.

Where this differs from the code:
- Every learner is in the ensemble from the start, as in the code's ``--use_pretrain`` path that
  every published command takes (T:243-249). Without it the code's first stage sees a constant
  ensemble of one column (q_y = 1, T:331-332, D:97-98) and its second only the first learner.
  Whether the encoders start pre-trained is the run's ``model`` config here.
- The code runs the partner's forward a second time for the α term (T:348), in train mode, which
  updates its BatchNorm statistics twice per step; here the forward that gave q is reused. The
  other learners run in train mode for q, as in the code (``to_train``, T:291, T:298).
- The loop chooses the checkpoint on validation after every epoch, mid-stage included.
- M ≥ 3 works as in MSA (same loss; one ensemble of all other learners).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MieInputError
from ..models import FUSIONS, ClassifierHead, MultimodalModel, build_encoders
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, Space, boolean, modality_list, number

BOOST, RECTIFY = "boost", "rectify"


class ReconBoostModel(MultimodalModel):
    """Encoders φ_m, one shared head h and β: ``forward(xs)`` → {m: f_m = h(φ_m(x_m)) (B, K)}."""

    def __init__(self, encoders, head, boost_rate=1.0):
        super().__init__(encoders)
        self.head = head
        self.boost_rate = nn.Parameter(torch.tensor(float(boost_rate)))

    def learner(self, m, x):
        return self.head(self.encoders[m](x))

    def forward(self, xs):
        return {m: self.learner(m, xs[m]) for m in self.modalities}

    def ensemble(self, logits):
        """β Σ of the learners' logits {m: (B, K)} given → (B, K)."""
        return self.boost_rate * torch.stack(list(logits.values())).sum(dim=0)

    @classmethod
    def build(cls, spec, boost_rate=1.0):
        return cls(build_encoders(spec), ClassifierHead(spec.dim, spec.num_classes, spec.head_hidden), boost_rate)


def stage_plan(cycle, boost_epochs, rectify_epochs, epochs):
    """[(stage, modality, phase)] for each loop epoch, phase ``BOOST`` or ``RECTIFY``: whole cycles
    of stages (P boost + R rectify epochs each), then one shortened cycle, so that every modality
    has exactly ``epochs`` epochs of updates (its boost epochs + every rectify epoch)."""
    M, P, R = len(cycle), boost_epochs, rectify_epochs
    per_cycle = P + M * R
    whole, rest = divmod(epochs, per_cycle)
    stages = [(P, [R] * M)] * whole
    if rest:
        a = min(P, max(1, (2 * rest * P + per_cycle) // (2 * per_cycle)))
        r = rest - a
        stages.append((a, [r // M + (i < r % M) for i in range(M)]))
    plan = []
    for k, (a, rs) in enumerate(stages):
        for i, m in enumerate(cycle):
            s = k * M + i
            plan += [(s, m, BOOST)] * a + [(s, m, RECTIFY)] * rs[i]
    return plan


def reconcilement_weights(others_logits, y, w1, w2):
    """(w1 − w2·q_y)/C per sample, q = softmax of the other learners' ensemble logits (B, C) → (B,)."""
    q_y = F.softmax(others_logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)
    return (w1 - w2 * q_y) / others_logits.shape[-1]


class ReconBoost(SingleOptimizerMethod):
    name = "reconboost"
    params = {
        "fusion": fusion_param("model", FUSIONS),
        "epochs_per_stage": Param(4, number(at_least=1, integer=True), "phase-1 epochs of a stage (code: 4)"),
        "rectify_epochs": Param(4, number(at_least=0, integer=True),
                                "global-rectification epochs after each phase 1 (code --correct_epoch: 4)"),
        "w1": Param(5.0, number(above=0), "weight w1 of −log p_y (code --weight1: 5 on CREMA-D)",
                    Space("log", 1.0, 25.0)),   # holds the code's 5 (CREMA-D), 4 (AVE, ModelNet40), 1 (MSA)
        "w2": Param(1.0, number(at_least=0), "weight w2 of q_y·(−log p_y) (code --weight2: 1)",
                    Space("log", 0.2, 5.0)),    # holds the code's 1 and 0.25 (MSA); w2 > w1 gives negative weights
        "alpha": Param(0.5, number(at_least=0),
                       "weight of the code's consolidation MSE, whose inputs are both detached: logged loss only"),
        "boost_rate": Param(1.0, number(), "β at the start (code --boost_rate: 1.0)"),
        "order": Param(None, modality_list, "the modality cycle (default: the data's order)"),
        "restart_optimizer": Param(True, boolean, "fresh optimizer state at every phase start, as the code"),
    }

    def build_model(self, spec):
        return ReconBoostModel.build(spec, self.boost_rate)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        order = list(self.order or model.modalities)
        if sorted(order) != sorted(model.modalities):
            raise MieInputError(f"method.order {order} must list each modality once: {model.modalities}")
        super().setup(model, ctx)
        self.cycle = order
        self.plan = stage_plan(order, self.epochs_per_stage, self.rectify_epochs, ctx.epochs_per_modality)

    def num_epochs(self, epochs_per_modality):
        self.plan = stage_plan(self.cycle, self.epochs_per_stage, self.rectify_epochs, epochs_per_modality)
        return len(self.plan)

    def trained_modalities(self, epoch):
        _, m, phase = self.plan[epoch]
        return [m] if phase == BOOST else list(self.cycle)

    def schedule_epoch(self, epoch):
        return epoch * self.ctx.epochs_per_modality // len(self.plan)

    def notices(self):
        E, P, R, M = self.ctx.epochs_per_modality, self.epochs_per_stage, self.rectify_epochs, len(self.cycle)
        if E >= P + M * R:
            return []
        boost = sum(phase == BOOST for _, m, phase in self.plan if m == self.cycle[0])
        return [f"{E} epochs are fewer than one cycle ({P} + {M}×{R} = {P + M * R} epochs per modality): each "
                f"stage is shortened to {boost} boosting epoch(s), with {E - boost} rectification epoch(s) in all"]

    def start_epoch(self, epoch):
        if self.restart_optimizer and (epoch == 0 or self.plan[epoch - 1][::2] != self.plan[epoch][::2]):
            self.optimizer.state.clear()

    def training_step(self, batch, step):
        xs, y = batch
        stage, m, phase = self.plan[step.epoch]
        if phase == RECTIFY:
            loss = F.cross_entropy(self.model.ensemble(self.model(xs)), y)
            self.minimize(loss)
            return {"rectify_loss": loss.detach()}
        with torch.no_grad():
            others = {k: self.model.learner(k, xs[k]) for k in self.cycle if k != m}
            weights = reconcilement_weights(self.model.ensemble(others), y, self.w1, self.w2)
        z = self.model.learner(m, xs[m])
        boost = (weights * F.cross_entropy(z, y, reduction="none")).mean()
        logs = {f"boost_loss_{m}": boost.detach()}
        loss = boost
        if stage > 0:
            partner = self.cycle[self.cycle.index(m) - 1]
            consolidation = F.mse_loss(F.softmax(z.detach(), dim=-1), F.softmax(others[partner], dim=-1))
            loss = boost + self.alpha * consolidation
            logs["consolidation"] = consolidation
        self.minimize(loss)
        return {**logs, "loss": loss.detach()}

    def end_epoch(self, epoch):
        return {"stage": self.plan[epoch][0], "beta": float(self.model.boost_rate.detach())}

    def fuse_logits(self, per_logits):
        """F = β Σ_m f_m."""
        return self.model.ensemble(per_logits)

    def logits(self, xs):
        per = self.model(xs)
        return per, self.fuse_logits(per)
