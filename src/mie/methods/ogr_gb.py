"""OGR-GB — Gradient-Blending by the overfitting-to-generalization ratio.

Wang, Tran, Feiszli: "What Makes Training Multi-Modal Classification Networks Hard?", CVPR 2020
(arXiv 1905.12681). Re-implemented in BalanceBenchmark (GeWu-Lab, ``GBlending_trainer.py``).

Model (``MultiHeadModel`` with ``feature_fusion="concat"``, the paper's late-concat network with
uni-modal auxiliary heads): encoders φ_m, one head per modality and a fused head on the concatenated
features; the outputs are indexed by k ∈ {1..M, fused}:

    z_m = h_m(φ_m(x_m)),    z_fused = g([φ_1(x_1); …; φ_M(x_M)]),
    L = Σ_k w_k · CE(z_k, y),        Σ_k w_k = 1,  w_k ≥ 0.

Overfitting and generalization (paper §3.2, with the true loss L* approximated by the validation
loss L^V, as the paper does). For output k at checkpoint N (after N epochs), with L^T_k(N) and
L^V_k(N) its mean cross-entropy over the training and the validation set:

    O_k(N)       = L^V_k(N) − L^T_k(N)                          overfitting (the train/val gap)
    ΔO_k(N, n)   = O_k(N + n) − O_k(N)                          change in overfitting over n epochs
    ΔG_k(N, n)   = L^V_k(N) − L^V_k(N + n)                      generalization gained over n epochs
    OGR_k        = |ΔO_k / ΔG_k|

Blend weights (paper §3.3, Proposition: w*_k ∝ ⟨∇L*, v_k⟩ / σ_k², estimated by ΔG_k / ΔO_k²):

    ŵ_k = max(ΔG_k, 0) / max(ΔO_k², ε)        w_k = ŵ_k / Σ_j ŵ_j        (ε = 1e-12)

Schedule ("online G-Blend", n = ``blend_every``): the losses of every output are measured at
checkpoint 0 (in ``setup``, before any training: ``ctx.evaluate("train")`` and ``ctx.evaluate("val")``)
and then after every n epochs (``on_validation`` of loop epochs n−1, 2n−1, …: L^V from the loop's
validation metrics, L^T from ``ctx.evaluate("train")``), in eval mode, without gradient. L_m is the
mean cross-entropy of modality m's own prediction softmax(z_m) (``metrics["per_modality"][m]["loss"]``)
and L_fused that of softmax(z_fused) (``metrics["loss"]``, the fused prediction's loss, which is the
fused head's only because inference is fixed to it: ``fusion = "model"`` is not a parameter here).
Epochs 0 … n−1 are the warm-up and train with uniform weights w_k = 1/(M+1); after epoch (i+1)n − 1
the weights for the next n epochs are re-estimated from the window (N, n) = (in, n). If no output
generalised in a window (every ΔG_k ≤ 0) the previous weights are kept.

Sources and differences. The definitions of O, ΔO, ΔG, OGR and w ∝ ΔG/ΔO² are the paper's. The paper
normalises with Z = Σ_k ΔG_k/(2ΔO_k²), which makes Σ_k w_k = 2 (a factor that only rescales the loss);
we normalise to Σ_k w_k = 1, as BalanceBenchmark does. A negative ΔG (an output whose validation loss
rose) would give a negative weight; we clip it to 0 (``negative_gain="zero"``, default) — BalanceBenchmark
takes |ΔG| instead (``negative_gain="abs"``). The paper (and BalanceBenchmark) estimate each window's
losses from SEPARATE copies of the model trained for n epochs on one output each, starting from the
current model; here they are the losses of the jointly trained model's own heads over the last n epochs
(no extra training, and validation never sees gradients either way). BalanceBenchmark measures L^T as
the running training loss during those epochs; here it is an eval-mode pass at the checkpoint, as the
paper's L^T_N (a loss of the model at epoch N) is defined. Default n = 10 (BalanceBenchmark's
``super_epoch: 10``). M ≥ 3: the rule is per output, so it is the same for any number of modalities.

Logged by ``on_validation``: ``gb_w_<k>`` (the weights the next epoch trains with) every epoch, and on
re-estimation epochs ``gb_dG_<k>``, ``gb_dO_<k>`` and ``gb_ogr_<k>`` for every output k.
"""
import math

import torch.nn.functional as F

from ..models import MultiHeadModel
from ..models.multi_head import FUSED
from .base import SingleOptimizerMethod, require_two_modalities
from .params import Param, number, one_of

NEGATIVE_GAIN = ("zero", "abs")
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


def blend_weights(d_o, d_g, negative_gain="zero"):
    """w_k = ŵ_k / Σ_j ŵ_j with ŵ_k = g(ΔG_k) / max(ΔO_k², ε), g = max(·, 0) or |·|.
    Returns None when every ŵ_k is 0 (no output generalised)."""
    gain = (lambda g: max(g, 0.0)) if negative_gain == "zero" else abs
    raw = {k: gain(d_g[k]) / max(d_o[k] ** 2, EPS) for k in d_g}
    total = sum(raw.values())
    if not total > 0 or not math.isfinite(total):
        return None
    return {k: v / total for k, v in raw.items()}


def output_losses(metrics):
    """{k: L_k} from a metrics dict: each modality's own loss, and the fused prediction's as "fused"."""
    return {**{m: v["loss"] for m, v in metrics["per_modality"].items()}, FUSED: metrics["loss"]}


class GradientBlending(SingleOptimizerMethod):
    name = "ogr_gb"
    params = {
        "blend_every": Param(10, number(at_least=1, integer=True), "n: epochs per window between re-estimates"),
        "negative_gain": Param("zero", one_of(*NEGATIVE_GAIN),
                               "a negative ΔG_k: zero (clip) | abs (BalanceBenchmark)"),
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
        self.window_start = self.measure(ctx.evaluate("val"))       # checkpoint 0
        self.window_epoch = 0

    def measure(self, val_metrics):
        """{"train": {k: L^T_k}, "val": {k: L^V_k}} of the model as it is now (``val_metrics``: its
        validation metrics)."""
        return {"train": output_losses(self.ctx.evaluate("train")), "val": output_losses(val_metrics)}

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch, step):
        xs, y = batch
        per, fused = self.model.outputs(xs)
        out = {**per, FUSED: fused}
        losses = {k: F.cross_entropy(out[k], y) for k in self.outputs}
        loss = sum(self.weights[k] * losses[k] for k in self.outputs)
        self.minimize(loss)
        return {"loss": loss.detach(), **{f"loss_{k}": v.detach() for k, v in losses.items()}}

    def on_validation(self, epoch, metrics):
        logs = {}
        if (epoch + 1) % self.blend_every == 0:
            end = self.measure(metrics)
            d_o, d_g = overfitting_generalization(self.window_start, end)
            new = blend_weights(d_o, d_g, self.negative_gain)
            if new is not None:
                self.weights = new
            self.window_start, self.window_epoch = end, epoch + 1
            for k in self.outputs:
                logs[f"gb_dG_{k}"] = d_g[k]
                logs[f"gb_dO_{k}"] = d_o[k]
                logs[f"gb_ogr_{k}"] = abs(d_o[k] / d_g[k]) if d_g[k] != 0 else math.inf
        logs.update({f"gb_w_{k}": w for k, w in self.weights.items()})
        return logs

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        return self.model.outputs(xs)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "weights": dict(self.weights),
                "window_start": {s: dict(v) for s, v in self.window_start.items()},
                "window_epoch": self.window_epoch}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.weights = dict(state["weights"])
        self.window_start = {s: dict(v) for s, v in state["window_start"].items()}
        self.window_epoch = state["window_epoch"]
