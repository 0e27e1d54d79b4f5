"""OGR-GB — Gradient-Blending by the overfitting-to-generalization ratio.

Wang, Tran, Feiszli: "What Makes Training Multi-Modal Classification Networks Hard?", CVPR 2020
(arXiv 1905.12681; §2.2–2.4, Eq. 3, Proposition 1, Algorithms 1–3). The authors released no code;
the public re-implementation is BalanceBenchmark's (github.com/GeWu-Lab/BalanceBenchmark,
``balancemm/trainer/GBlending_trainer.py``, ``balancemm/train.py``, ``configs/trainer_config.yaml``;
line numbers below are that snapshot's).

Model (``MultiHeadModel`` with ``feature_fusion="concat"``, the paper's Fig. 2c: a late-concat network
with a classifier on each modality's features and one on the fused features); outputs k ∈ {1..M, fused}:

    z_m = h_m(φ_m(x_m)),    z_fused = g([φ_1(x_1); …; φ_M(x_M)]),
    L = Σ_k w_k · CE(z_k, y)                                          (paper Eq. 7)

Overfitting and generalization (§2.2, Eq. 3; the true loss L* approximated by the validation loss
L^V). For output k between checkpoints N and N + n, with L^T_k, L^V_k its mean cross-entropy over the
training and the validation set (eval mode, no gradient):

    O_k(N)     = L^V_k(N) − L^T_k(N)
    ΔO_k       = O_k(N + n) − O_k(N),      ΔG_k = L^V_k(N) − L^V_k(N + n),      OGR_k = |ΔO_k / ΔG_k|

Blend weights (Proposition 1 and Algorithm 1: w_k ∝ G_k / O_k²):

    ŵ_k = |ΔG_k| / ΔO_k²        w_k = ŵ_k / Σ_j ŵ_j          (Σ_k w_k = 1)

Estimate ``estimate="copies"`` (default; Algorithm 1 "GB_Estimate"): for each output k, a copy of the
network's part that produces it — the uni-modal network (φ_m, h_m) for k = m, the naive multi-modal
network (every φ_m and g) for k = fused — is initialised from the current weights and trained for n
epochs on CE(z_k, y) alone; ΔO_k and ΔG_k are measured between the copy at its start (the current
model's own output k) and at its end. Schedule (Algorithm 3, online G-Blend): before the first step
of loop epochs 0, n, 2n, … (n = ``blend_every``) the weights are estimated from the current model and
then used for the next n epochs — also for the first n (BalanceBenchmark line 92: ``current_epoch %
super_epoch == 0``, epoch 0 included). The copies are one extra copy of the model kept by the method,
reloaded from the model before each output's training, with one optimizer per output built by the
loop's factory (``ctx.make_optimizer``, so the run's optimizer settings, scheduled learning rate and
step count) and reset to a fresh state before each training (BalanceBenchmark resets its copy's
optimizer to its initial state, line 314). They train on the loop's unshuffled training batches
(``ctx.train_batches``) and are measured on the training and validation splits by the loop's own
evaluation (``ctx.evaluate(split, model=copy, ...)``; never on test). Cost: (M + 1)·n extra epochs of
training every n epochs — about M + 1 times the run's own training.

Estimate ``estimate="heads"`` (ours, opt-in; with ``negative_gain="zero"`` the previous default): no
copies; the losses of the jointly trained model's own outputs are measured at checkpoint 0 and after
every n epochs, and the window (in, n) just trained gives the weights for the NEXT n epochs; epochs
0 … n−1 train with uniform weights 1/(M+1). L^V comes from the loop's validation metrics
(per-modality loss; the fused prediction's loss, which is the fused head's because ``fusion`` is fixed
to "model"), L^T from ``ctx.evaluate("train")``.

If no output generalised (Σ ŵ = 0 or not finite), the previous weights are kept (ours).

Paper vs BalanceBenchmark, and what is ours:
- Normalisation. Proposition 1 is stated under the constraint Σ_k w_k = 1, which BalanceBenchmark
  follows (lines 368-373); its printed constant Z = Σ_k ⟨∇L*, v_k⟩/(2σ_k²) would make Σ_k w_k = 2. We
  follow the constraint (Σ = 1).
- Negative ΔG (an output whose validation loss rose). The paper's formula gives it a negative weight
  and says nothing more; BalanceBenchmark takes |ΔG/ΔO²| (line 366): ``negative_gain="abs"``, default.
  ``negative_gain="zero"`` (ours) gives it weight 0.
- ΔO = 0. Neither the paper nor BalanceBenchmark guards it (BalanceBenchmark's Python floats would
  raise ZeroDivisionError, line 366); ΔO² is floored at 1e-12 here only to avoid that division, so the
  formula is unchanged whenever ΔO ≠ 0 (an output that barely overfits takes almost all the weight,
  as the formula says).
- The uni-modal copy. Paper: the uni-modal network from the corresponding parameters (here φ_m, h_m on
  CE(z_m)). BalanceBenchmark: the whole model trained on the FUSED output with the other modalities'
  inputs zeroed (lines 321-338; its per-modality outputs are blocks of the fused classifier).
- Measurement points. Paper (Eq. 3, Algorithm 1): the checkpoints N and N + n, L^T "the model's
  average loss over the fixed train set". BalanceBenchmark: sums of batch losses after the copy's
  first and last epoch, L^T the running training loss of that epoch (lines 326-360). We follow the
  paper: eval-mode sample means at N and N + n.
- Copies' data. The paper and BalanceBenchmark train the copies on shuffled training batches and the
  paper measures L^T on a subset T′; here the copies train on the unshuffled training batches the loop
  offers, and L^T is the whole training set. The copies train at the run's scheduled learning rate
  (BalanceBenchmark's at the initial one).
- Default n = 10: BalanceBenchmark's ``super_epoch: 10`` (``configs/trainer_config.yaml``); the paper's
  experiments use a first super-epoch of 10 and 5 after (§3.3). With n ≥ the run's epochs the weights
  are estimated once, at epoch 0: the paper's offline G-Blend (Algorithm 2, with copies trained n
  epochs rather than the run's length) — ``notices()`` says so.
- M ≥ 3: the rule is per output, so it is the same for any number of modalities.

Logged by ``on_validation``: ``gb_w_<k>`` (the weights the next epoch trains with) every epoch, and on
estimation epochs ``gb_dG_<k>``, ``gb_dO_<k>`` and ``gb_ogr_<k>`` for every output k.
"""
import copy
import math

import torch.nn.functional as F

from ..models import MultiHeadModel
from ..models.multi_head import FUSED
from ..optim import autocast_forwards
from .base import SingleOptimizerMethod, require_two_modalities
from .params import Param, Space, number, one_of

ESTIMATES = ("copies", "heads")
NEGATIVE_GAIN = ("abs", "zero")
EPS = 1e-12


def overfitting_generalization(start, end):
    """ΔO_k and ΔG_k between two checkpoints.

    ``start``, ``end``: {"train": {k: L^T_k}, "val": {k: L^V_k}} at checkpoints N and N + n.
    Returns ({k: ΔO_k}, {k: ΔG_k})."""
    d_o, d_g = {}, {}
    for k in start["val"]:
        o_start = start["val"][k] - start["train"][k]
        o_end = end["val"][k] - end["train"][k]
        d_o[k] = o_end - o_start
        d_g[k] = start["val"][k] - end["val"][k]
    return d_o, d_g


def blend_weights(d_o, d_g, negative_gain="abs"):
    """w_k = ŵ_k / Σ_j ŵ_j with ŵ_k = g(ΔG_k) / max(ΔO_k², ε), g = |·| or max(·, 0).
    Returns None when every ŵ_k is 0 or the sum is not finite."""
    gain = abs if negative_gain == "abs" else (lambda g: max(g, 0.0))
    raw = {k: gain(d_g[k]) / max(d_o[k] ** 2, EPS) for k in d_g}
    total = sum(raw.values())
    if not total > 0 or not math.isfinite(total):
        return None
    return {k: v / total for k, v in raw.items()}


def output_losses(metrics):
    """{k: L_k} from a metrics dict: each modality's own loss, and the fused prediction's as "fused"."""
    return {**{m: v["loss"] for m, v in metrics["per_modality"].items()}, FUSED: metrics["loss"]}


def output_logits(model, k, xs):
    """z_k: modality k's head on its encoder, or the fused head on every encoder (k = "fused")."""
    if k == FUSED:
        return model.fused_logits(model.features(xs))
    return model.heads[k](model.encoders[k](xs[k]))


def probabilities(model, xs):
    """(softmax(z_fused), {m: softmax(z_m)}) of a ``MultiHeadModel``: what the loop's evaluation reads."""
    per, fused = model.outputs(xs)
    return F.softmax(fused.float(), dim=-1), {m: F.softmax(z.float(), dim=-1) for m, z in per.items()}


def _copy_of(model, device):
    """A deep copy of ``model`` whose forwards are its own (the loop's bf16 autocast wrappers hold the
    original modules, so they are re-applied to the copy)."""
    twin = copy.deepcopy(model)
    wrapped = False
    for module in twin.modules():
        if "forward" in vars(module):
            del module.forward
            wrapped = True
    return autocast_forwards(twin, device) if wrapped else twin


class GradientBlending(SingleOptimizerMethod):
    name = "ogr_gb"
    params = {
        "blend_every": Param(10, number(at_least=1, integer=True), "n: epochs per super-epoch (BalanceBenchmark: 10)",
                             Space("int", 5, 20)),  # holds the paper's 10 and 5 (§3.3) and BalanceBenchmark's 10
        "estimate": Param("copies", one_of(*ESTIMATES),
                          "copies (the paper's: a copy per output, trained n epochs) | heads (ours: own heads)"),
        "negative_gain": Param("abs", one_of(*NEGATIVE_GAIN),
                               "a negative ΔG_k: abs (BalanceBenchmark) | zero (ours: weight 0)"),
    }
    fusion = "model"        # metrics["loss"] is the fused head's loss L_fused only under this rule

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        return MultiHeadModel.build(spec)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        super().setup(model, ctx)
        self.outputs = model.modalities + [FUSED]
        self.weights = {k: 1.0 / len(self.outputs) for k in self.outputs}
        self.last_estimate = None
        if self.estimate == "copies":
            self.twin = _copy_of(model, ctx.device)
            self.twin_optimizers = {k: ctx.make_optimizer(self.output_parameters(self.twin, k))
                                    for k in self.outputs}
        else:
            self.window_start = self.measure(ctx.evaluate("val"))       # checkpoint 0

    @staticmethod
    def output_parameters(model, k):
        """The parameters that produce output k: φ_k and h_k, or every φ_m and g (k = "fused")."""
        if k == FUSED:
            return list(model.encoders.parameters()) + list(model.fused_head.parameters())
        return model.modality_parameters(k)

    def measure(self, val_metrics):
        """{"train": {k: L^T_k}, "val": {k: L^V_k}} of the model as it is now (``val_metrics``: its
        validation metrics)."""
        return {"train": output_losses(self.ctx.evaluate("train")), "val": output_losses(val_metrics)}

    def notices(self):
        epochs, n, notes = self.ctx.epochs_per_modality, self.blend_every, []
        if self.estimate == "copies":
            notes.append(f"every {n} epochs the weights are estimated by training {len(self.outputs)} copies of the "
                         f"model for {n} epochs each: about {len(self.outputs)}× the run's own training")
            if n >= epochs:
                notes.append(f"blend_every {n} >= the run's {epochs} epochs: the weights are estimated once, at "
                             f"the start, and never re-estimated (the paper's offline G-Blend)")
        elif n >= epochs:
            notes.append(f"blend_every {n} >= the run's {epochs} epochs: the weights are never re-estimated, so "
                         f"every output keeps the uniform weight 1/{len(self.outputs)} (joint multitask training)")
        return notes

    # ---- the paper's estimate (Algorithm 1) -----------------------------------------------
    def estimate_with_copies(self):
        """ΔO_k, ΔG_k from copies trained n epochs on output k alone, from the current weights."""
        model, twin = self.model, self.twin
        start = self.measure(self.ctx.evaluate("val"))
        end = {"train": {}, "val": {}}
        for k in self.outputs:
            twin.load_state_dict(model.state_dict())
            optimizer = self.twin_optimizers[k]
            optimizer.state.clear()
            twin.train()
            for _ in range(self.blend_every):
                for xs, y in self.ctx.train_batches():
                    loss = F.cross_entropy(output_logits(twin, k, xs), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            optimizer.state.clear()
            for split in ("train", "val"):
                metrics = self.ctx.evaluate(split, model=twin, predict=lambda xs: probabilities(twin, xs))
                end[split][k] = output_losses(metrics)[k]
        return overfitting_generalization(start, end)

    def all_outputs(self, xs):
        per, fused = self.model.outputs(xs)
        return {**per, FUSED: fused}

    def update_weights(self, d_o, d_g):
        new = blend_weights(d_o, d_g, self.negative_gain)
        if new is not None:
            self.weights = new
        self.last_estimate = {"dG": d_g, "dO": d_o}

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch, step):
        if self.estimate == "copies" and step.index == 0 and step.epoch % self.blend_every == 0:
            self.update_weights(*self.estimate_with_copies())
        xs, y = batch
        out = self.all_outputs(xs)
        losses = {k: F.cross_entropy(out[k], y) for k in self.outputs}
        loss = sum(self.weights[k] * losses[k] for k in self.outputs)
        self.minimize(loss)
        return {"loss": loss.detach(), **{f"loss_{k}": v.detach() for k, v in losses.items()}}

    def on_validation(self, epoch, metrics):
        if self.estimate == "heads" and (epoch + 1) % self.blend_every == 0:
            end = self.measure(metrics)
            self.update_weights(*overfitting_generalization(self.window_start, end))
            self.window_start = end
        logs = {}
        if self.last_estimate is not None:
            d_g, d_o = self.last_estimate["dG"], self.last_estimate["dO"]
            for k in self.outputs:
                logs[f"gb_dG_{k}"] = d_g[k]
                logs[f"gb_dO_{k}"] = d_o[k]
                logs[f"gb_ogr_{k}"] = abs(d_o[k] / d_g[k]) if d_g[k] != 0 else math.inf
            self.last_estimate = None
        logs.update({f"gb_w_{k}": w for k, w in self.weights.items()})
        return logs

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        return self.model.outputs(xs)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        state = {**super().state_dict(), "weights": dict(self.weights)}
        if self.estimate == "heads":
            state["window_start"] = {s: dict(v) for s, v in self.window_start.items()}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.weights = dict(state["weights"])
        if self.estimate == "heads":
            self.window_start = {s: dict(v) for s, v in state["window_start"].items()}
