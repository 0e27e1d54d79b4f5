"""MSES — Modality-Specific Early Stopping.

Fujimori et al.: "Modality-Specific Learning Rate Control for Multimodal Classification", ACPR 2019
(Pattern Recognition, LNCS vol. 12047, part II; openreview.net/forum?id=On2HBy27Y5a). The paper
"construct[s] a model within the framework of multitask learning, which simultaneously learns
modality-specific classifiers as well as a multimodal classifier, to detect overfitting in each
modality and carry out early stopping separately" (abstract).

Model (``MultiHeadModel``): encoders φ_m, a classifier h_m per modality and a multimodal classifier g
on the concatenated features,

    f_m = φ_m(x_m),   z_m = h_m(f_m),   z = g([f_1; …; f_M]).

Multitask loss over the modalities still training, A(t) ⊆ {1..M} (λ = ``aux_weight``):

    L = CE(z, y) + λ Σ_{m ∈ A(t)} CE(z_m, y).

Modality-specific early stopping, after every epoch t (``end_epoch``), on validation data
(``ctx.val_batches()``, eval mode) with modality m's OWN classifier: v_m(t) = mean CE of z_m
(``monitor="loss"``) or the accuracy of argmax z_m (``monitor="accuracy"``). With best_m the best
value so far (initially +∞ for a loss, −∞ for an accuracy) and δ = ``min_delta``,

    improved_m(t) = v_m(t) < best_m − δ   (loss)      or      v_m(t) > best_m + δ   (accuracy)
    improved:      best_m ← v_m(t),  wait_m ← 0
    otherwise:     wait_m ← wait_m + 1;   if wait_m ≥ P  (P = ``patience``):  stop m for good.

A stopped modality's learning rate is 0: from the next epoch on, θ_m = (φ_m, h_m) receive no gradient
(their features are computed without autograd), the optimizer skips them (parameters and optimizer
state stay bit-identical) and φ_m, h_m run in eval mode (BatchNorm statistics frozen, no dropout). The
multimodal classifier g keeps training on the stopped modality's (now fixed) features together with
the modalities still learning — "the fused model keeps training the others". The rule is per
modality, so it is the same for any M ≥ 2; if every modality stops, g alone trains. The run's own
checkpoint selection (on fused validation accuracy) is unchanged.

Sources and choices. The paper's text beyond the abstract was not available to us; the overfitting
signal (each modality classifier's validation loss), λ = 1 (an unweighted multitask sum), P = 5 and
δ = 0 are this library's defaults, and the fused classifier on concatenated features follows the
abstract's "multimodal classifier". Stopping = learning rate 0 (the title's "learning rate control");
the stopped modality keeps its current weights (its best-epoch weights are not restored).

Logged by ``end_epoch`` for each modality m: ``mses_val_<monitor>_<m>`` (v_m(t)), ``mses_wait_<m>``,
``mses_stopped_<m>`` (0/1) and ``mses_lr_<m>`` (the learning rate m trains with from the next epoch).
"""
import math

import torch
import torch.nn.functional as F

from ..errors import MieInputError
from .base import Method, require_two_modalities
from .multihead import FUSED, MultiHeadModel, multihead_predict, output_metrics

MONITORS = ("loss", "accuracy")


def early_stopping_update(value, best, wait, patience, monitor="loss", min_delta=0.0):
    """One epoch of the patience rule: (best, wait, stop) after observing ``value``."""
    improved = value < best - min_delta if monitor == "loss" else value > best + min_delta
    if improved:
        return value, 0, False
    wait += 1
    return best, wait, wait >= patience


class MSES(Method):
    name = "mses"

    def __init__(self, patience=5, monitor="loss", min_delta=0.0, aux_weight=1.0):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise MieInputError(f"patience must be an integer >= 1, got {patience!r}")
        if monitor not in MONITORS:
            raise MieInputError(f"unknown monitor '{monitor}' for MSES; expected one of {MONITORS}")
        if not min_delta >= 0:
            raise MieInputError(f"min_delta must be >= 0, got {min_delta}")
        if not aux_weight >= 0:
            raise MieInputError(f"aux_weight must be >= 0, got {aux_weight}")
        super().__init__(fusion="concat")
        self.patience, self.monitor = patience, monitor
        self.min_delta, self.aux_weight = float(min_delta), float(aux_weight)

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        return MultiHeadModel.build(spec)

    def setup(self, model, ctx):
        super().setup(model, ctx)
        require_two_modalities(model, self.name)
        groups = [{"params": model.modality_parameters(m)} for m in model.modalities]
        groups.append({"params": list(model.fused_head.parameters())})
        self.optimizer = ctx.make_optimizer(groups)
        self.base_lr = {m: float(g["lr"]) for m, g in self.groups.items()}
        start = math.inf if self.monitor == "loss" else -math.inf
        self.best = {m: start for m in model.modalities}
        self.wait = {m: 0 for m in model.modalities}
        self.stopped = {m: False for m in model.modalities}

    @property
    def groups(self):
        """{m: modality m's param group} (looked up each time: ``load_state_dict`` replaces the dicts)."""
        return dict(zip(self.model.modalities, self.optimizer.param_groups))

    def _apply(self):
        for m, g in self.groups.items():
            g["lr"] = 0.0 if self.stopped[m] else self.base_lr[m] * g.get("lr_factor", 1.0)   # × the loop's schedule

    # ---- training ---------------------------------------------------------------------
    def train_step(self, xs, y):
        model = self.model
        feats = {}
        for m in model.modalities:
            if self.stopped[m]:
                model.encoders[m].eval()
                model.heads[m].eval()
                with torch.no_grad():
                    feats[m] = model.encoders[m](xs[m])
            else:
                feats[m] = model.encoders[m](xs[m])
        z = model.fused_head(torch.cat([feats[m] for m in model.modalities], dim=-1))
        fused_loss = F.cross_entropy(z, y)
        loss = fused_loss
        logs = {}
        for m in model.modalities:
            if not self.stopped[m]:
                aux = F.cross_entropy(model.heads[m](feats[m]), y)
                loss = loss + self.aux_weight * aux
                logs[f"loss_{m}"] = aux.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), f"loss_{FUSED}": fused_loss.item(), **logs}

    def end_epoch(self, epoch):
        metrics = output_metrics(self.model, self.ctx.val_batches())
        logs = {}
        for m in self.model.modalities:
            value = metrics[m][self.monitor]
            if not self.stopped[m]:
                self.best[m], self.wait[m], stop = early_stopping_update(
                    value, self.best[m], self.wait[m], self.patience, self.monitor, self.min_delta)
                self.stopped[m] = stop
            logs[f"mses_val_{self.monitor}_{m}"] = value
            logs[f"mses_wait_{m}"] = self.wait[m]
            logs[f"mses_stopped_{m}"] = int(self.stopped[m])
        self._apply()
        logs.update({f"mses_lr_{m}": float(g["lr"]) for m, g in self.groups.items()})
        return logs

    # ---- inference --------------------------------------------------------------------
    def predict(self, xs):
        return multihead_predict(self.model, xs)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "best": dict(self.best), "wait": dict(self.wait),
                "stopped": dict(self.stopped), "base_lr": dict(self.base_lr)}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.best, self.wait = dict(state["best"]), dict(state["wait"])
        self.stopped, self.base_lr = dict(state["stopped"]), dict(state["base_lr"])
        self._apply()
