"""MSES — Modality-Specific Early Stopping.

Fujimori et al.: "Modality-Specific Learning Rate Control for Multimodal Classification", ACPR 2019
(Pattern Recognition, LNCS vol. 12047, part II; openreview.net/forum?id=On2HBy27Y5a). The paper
"construct[s] a model within the framework of multitask learning, which simultaneously learns
modality-specific classifiers as well as a multimodal classifier, to detect overfitting in each
modality and carry out early stopping separately" (abstract).

Model (``MultiHeadModel``, ``feature_fusion="concat"``): encoders φ_m, a classifier h_m per modality
and a multimodal classifier g on the concatenated features,

    f_m = φ_m(x_m),   z_m = h_m(f_m),   z = g([f_1; …; f_M]).

Multitask loss over the modalities still training, A(t) ⊆ {1..M} (λ = ``aux_weight``):

    L = CE(z, y) + λ Σ_{m ∈ A(t)} CE(z_m, y).

Modality-specific early stopping, after every epoch t (``on_validation``), on the loop's validation
metrics of modality m's OWN classifier: v_m(t) = mean CE of softmax(z_m) (``monitor="loss"``) or the
accuracy of argmax z_m (``monitor="accuracy"``), ``metrics["per_modality"][m][monitor]``. With best_m
the best value so far (initially +∞ for a loss, −∞ for an accuracy) and δ = ``min_delta``,

    improved_m(t) = v_m(t) < best_m − δ   (loss)      or      v_m(t) > best_m + δ   (accuracy)
    improved:      best_m ← v_m(t),  wait_m ← 0
    otherwise:     wait_m ← wait_m + 1;   if wait_m ≥ P  (P = ``patience``):  stop m for good.

A stopped modality's learning rate is 0 (``lr_scale(m)``; one param group per modality, named by it,
and one unnamed group for g): from the next epoch on, θ_m = (φ_m, h_m) receive no gradient (their
features are computed without autograd), the optimizer skips them (parameters and optimizer state
stay bit-identical) and φ_m, h_m run in eval mode (BatchNorm statistics frozen, no dropout). The
multimodal classifier g keeps training on the stopped modality's (now fixed) features together with
the modalities still learning — "the fused model keeps training the others". The rule is per
modality, so it is the same for any M ≥ 2; if every modality stops, g alone trains. The run's own
checkpoint selection (on fused validation accuracy) is unchanged.

Inference (``fusion``): "model" (default) predicts softmax(z), the multimodal classifier; "average"
and "weight" fuse the modality classifiers' predictions (``mie.models.fusion``).

Sources and choices. The paper's text beyond the abstract was not available to us; the overfitting
signal (each modality classifier's validation loss), λ = 1 (an unweighted multitask sum), P = 5 and
δ = 0 are this library's defaults, and the fused classifier on concatenated features follows the
abstract's "multimodal classifier". Stopping = learning rate 0 (the title's "learning rate control");
the stopped modality keeps its current weights (its best-epoch weights are not restored).

Logged by ``on_validation`` for each modality m: ``mses_val_<monitor>_<m>`` (v_m(t)), ``mses_wait_<m>``,
``mses_stopped_<m>`` (0/1) and ``mses_lr_<m>`` (the learning rate m trains with from the next epoch,
at this epoch's schedule factor).
"""
import math

import torch
import torch.nn.functional as F

from ..models import FUSIONS, MultiHeadModel, eval_mode
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, number, one_of

MONITORS = ("loss", "accuracy")


def early_stopping_update(value, best, wait, patience, monitor="loss", min_delta=0.0):
    """One epoch of the patience rule: (best, wait, stop) after observing ``value``."""
    improved = value < best - min_delta if monitor == "loss" else value > best + min_delta
    if improved:
        return value, 0, False
    wait += 1
    return best, wait, wait >= patience


class MSES(SingleOptimizerMethod):
    name = "mses"
    params = {
        "patience": Param(5, number(at_least=1, integer=True), "P: epochs without improvement before a modality stops"),
        "monitor": Param("loss", one_of(*MONITORS), "validation signal of each modality's classifier"),
        "min_delta": Param(0.0, number(at_least=0), "δ: the least change that counts as an improvement"),
        "aux_weight": Param(1.0, number(at_least=0), "λ: weight of each modality classifier's loss"),
        "fusion": fusion_param("model", FUSIONS),
    }

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        return MultiHeadModel.build(spec)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        super().setup(model, ctx)
        init = math.inf if self.monitor == "loss" else -math.inf
        self.best = {m: init for m in model.modalities}
        self.wait = {m: 0 for m in model.modalities}
        self.stopped = {m: False for m in model.modalities}

    def parameter_groups(self, model):
        groups = [{"params": model.modality_parameters(m), "name": m} for m in model.modalities]
        return groups + [{"params": list(model.fused_head.parameters())}]

    def lr_scale(self, group):
        return 0.0 if self.stopped.get(group, False) else 1.0

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch, step):
        xs, y = batch
        model = self.model
        feats = {}
        for m in model.modalities:
            if self.stopped[m]:
                with eval_mode(model.encoders[m], model.heads[m]), torch.no_grad():
                    feats[m] = model.encoders[m](xs[m])
            else:
                feats[m] = model.encoders[m](xs[m])
        fused_loss = F.cross_entropy(model.fused_logits(feats), y)
        loss = fused_loss
        logs = {}
        for m in model.modalities:
            if not self.stopped[m]:
                aux = F.cross_entropy(model.heads[m](feats[m]), y)
                loss = loss + self.aux_weight * aux
                logs[f"loss_{m}"] = aux.detach()
        self.minimize(loss)
        return {"loss": loss.detach(), "loss_fused": fused_loss.detach(), **logs}

    def on_validation(self, epoch, metrics):
        logs = {}
        for m in self.model.modalities:
            value = metrics["per_modality"][m][self.monitor]
            if not self.stopped[m]:
                self.best[m], self.wait[m], stop = early_stopping_update(
                    value, self.best[m], self.wait[m], self.patience, self.monitor, self.min_delta)
                self.stopped[m] = stop
            logs[f"mses_val_{self.monitor}_{m}"] = value
            logs[f"mses_wait_{m}"] = self.wait[m]
            logs[f"mses_stopped_{m}"] = int(self.stopped[m])
        # a group trains at η · schedule until its modality stops, then at 0
        logs.update({f"mses_lr_{g['name']}": float(g["lr"]) * self.lr_scale(g["name"])
                     for g in self.optimizer.param_groups if g.get("name") is not None})
        return logs

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        return self.model.outputs(xs)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "best": dict(self.best), "wait": dict(self.wait),
                "stopped": dict(self.stopped)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.best, self.wait, self.stopped = dict(state["best"]), dict(state["wait"]), dict(state["stopped"])
