"""MSES — Modality-Specific Early Stopping.

Fujimori et al.: "Modality-Specific Learning Rate Control for Multimodal Classification", ACPR 2019
(Pattern Recognition, LNCS vol. 12047, part II; openreview.net/forum?id=On2HBy27Y5a).

Sources. Only the paper's ABSTRACT was reachable when this file was written, and no code from the
authors was found. The abstract fixes the model and the idea: "constructing a model within the
framework of multitask learning, which simultaneously learns modality-specific classifiers as well
as a multimodal classifier, to detect overfitting in each modality and carry out early stopping
separately". How overfitting is detected and when a modality stops is taken from the public code
that produced published MSES numbers: AGM's baseline (Li et al., ICCV 2023;
github.com/lihong2303/AGM_ICCV2023, ``run/CREMAD_main.py`` lines 211-226 and 685-745; the same rule
with other patiences in ``run/AVMNIST_main.py`` and ``run/URFunny_main.py``). Check these rules
against the paper before quoting our numbers as the paper's.

Model (``MultiHeadModel``, ``feature_fusion="concat"``; the abstract's multitask model): encoders φ_m,
a classifier h_m per modality and a multimodal classifier g on the concatenated features,

    f_m = φ_m(x_m),   z_m = h_m(f_m),   z = g([f_1; …; f_M]).

Multitask loss over the modalities still training, A(t) ⊆ {1..M} (λ = ``aux_weight``, 1: an unweighted
multitask sum, ours — the abstract gives no weight):

    L = CE(z, y) + λ Σ_{m ∈ A(t)} CE(z_m, y).

Modality-specific early stopping, after every epoch t (0-based; ``on_validation``), on the loop's
validation metrics of modality m's OWN classifier: v_m(t) = mean CE of softmax(z_m) (``monitor="loss"``,
AGM's ``validate_audio_batch_loss``) or the accuracy of argmax z_m (``monitor="accuracy"``, ours). With
β = ``smoothing`` (AGM: 0.6, lines 686-698), the score is

    s_m(0) = v_m(0),     s_m(t) = β · v_m(t−1) + (1 − β) · v_m(t)     (the previous RAW value, as AGM)

and with best_m the best score so far (+∞ for a loss, −∞ for an accuracy), e_m its epoch, δ = ``min_delta``
(ours, 0 = AGM's strict comparison), P = ``patience``:

    improved_m(t) = s_m(t) < best_m − δ   (loss)   or   s_m(t) > best_m + δ   (accuracy)
    improved:   best_m ← s_m(t),  e_m ← t,  keep a copy of θ_m = (φ_m, h_m)            (AGM lines 699-717)
    otherwise, if t − e_m > P:  stop m for good from epoch t+1 on, and (``restore="modality"``) put
                θ_m back to its copy from epoch e_m before epoch t+1 trains               (AGM lines 719-741)

A stopped modality's learning rate is 0 (``lr_scale(m)``; one param group per modality, named by it,
and one unnamed group for g; AGM multiplies θ_m's gradients by 0, lines 219-226): from then on θ_m
receives no gradient (its features are computed without autograd), the optimizer skips it (parameters
and optimizer state stay bit-identical) and φ_m, h_m run in eval mode (BatchNorm statistics frozen,
no dropout). The multimodal classifier g keeps training on the stopped modality's (now fixed)
features together with the modalities still learning. The rule is per modality, so it is the same for
any M ≥ 2; if every modality stops, g alone trains (AGM ends the run). ``trained_modalities(epoch)``
is the modalities not yet stopped in that epoch, and ``stops_early`` is True, so the run's results
show each modality's epochs of updates. The run's own checkpoint selection (on fused validation
accuracy) is unchanged.

Differences from AGM's code: AGM trains additive late fusion z = z_a + z_v on CE(z) alone (its
``AVClassifier_Sum``), not the abstract's multitask model with a multimodal classifier; it restores the
WHOLE model and optimizer to the stopping modality's best checkpoint (here only θ_m: the other
modalities and g keep what they learned); it saves no checkpoint when the best score is the first
epoch's (its UR-Funny run then skips the restore, ``run/URFunny_main.py`` line 733); its patience is
per dataset (80 CREMA-D, 10 AV-MNIST, 30 UR-Funny for 100-epoch runs), and it reads the losses on
its test loader (here: validation). ``patience=5`` is ours, for runs of tens of epochs.
``smoothing=0, restore="none", patience=P−1`` give this library's previous rule with patience P (raw
validation values, a stop at t − e_m ≥ P, a stopped modality keeping its last weights).

Inference (``fusion``): "model" (default) predicts softmax(z), the multimodal classifier; "average"
and "weight" fuse the modality classifiers' predictions (``mie.models.fusion``).

Logged by ``on_validation`` for each modality m: ``mses_val_<monitor>_<m>`` (v_m(t)), ``mses_score_<m>``
(s_m(t)), ``mses_wait_<m>`` (t − e_m), ``mses_stopped_<m>`` (0/1) and ``mses_lr_<m>`` (the learning rate
m trains with from the next epoch, at this epoch's schedule factor).
"""
import math

import torch
import torch.nn.functional as F

from ..models import FUSIONS, MultiHeadModel, eval_mode
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, Space, number, one_of

MONITORS = ("loss", "accuracy")
RESTORE = ("modality", "none")


def smoothed_score(value, previous, smoothing):
    """s(t) = β · v(t−1) + (1 − β) · v(t); s(0) = v(0) (``previous`` None)."""
    return value if previous is None else smoothing * previous + (1 - smoothing) * value


def improved(score, best, monitor="loss", min_delta=0.0):
    return score < best - min_delta if monitor == "loss" else score > best + min_delta


def early_stopping_update(score, best, best_epoch, epoch, patience, monitor="loss", min_delta=0.0):
    """One epoch of the rule: (best, best_epoch, stop) after the score of epoch ``epoch``."""
    if improved(score, best, monitor, min_delta):
        return score, epoch, False
    return best, best_epoch, epoch - best_epoch > patience


def _snapshot(*modules):
    return [{k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} for m in modules]


class MSES(SingleOptimizerMethod):
    name = "mses"
    stops_early = True
    params = {
        "patience": Param(5, number(at_least=0, integer=True),
                          "P: a modality stops when its best epoch is more than P epochs back (ours: 5)",
                          Space("int", 1, 20)),         # ours (AGM's code: 10-80 for runs of 100 epochs)
        "monitor": Param("loss", one_of(*MONITORS), "validation signal of each modality's classifier"),
        "smoothing": Param(0.6, number(at_least=0, below=1),
                           "β: score = β·previous value + (1−β)·current (AGM's 0.6; 0: raw values)",
                           Space("float", 0.0, 0.9)),   # ours; holds raw values (0) and AGM's 0.6
        "restore": Param("modality", one_of(*RESTORE),
                         "a stopping modality returns to its best epoch's weights (modality) or keeps its last (none)"),
        "min_delta": Param(0.0, number(at_least=0), "δ: the least change that counts as an improvement (ours)"),
        "aux_weight": Param(1.0, number(at_least=0), "λ: weight of each modality classifier's loss (ours: 1)",
                            Space("log", 0.1, 10.0)),   # ours: a decade each side
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
        self.best_epoch = {m: -1 for m in model.modalities}
        self.previous = {m: None for m in model.modalities}     # v_m(t−1)
        self.stopped_at = {m: None for m in model.modalities}   # first loop epoch without updates
        self.snapshots = {}                                      # m → θ_m at e_m (restore="modality")
        self.pending = []                                        # stopped, not yet restored

    def parameter_groups(self, model):
        groups = [{"params": model.modality_parameters(m), "name": m} for m in model.modalities]
        return groups + [{"params": list(model.fused_head.parameters())}]

    @property
    def stopped(self):
        return {m: e is not None for m, e in self.stopped_at.items()}

    def lr_scale(self, group):
        return 0.0 if self.stopped.get(group, False) else 1.0

    def trained_modalities(self, epoch):
        return [m for m, e in self.stopped_at.items() if e is None or epoch < e]

    def notices(self):
        epochs = self.ctx.epochs_per_modality
        earliest = self.patience + 2        # best at epoch 0, stop decided after epoch P+1, acting from P+2
        if earliest < epochs:
            return []
        return [f"patience {self.patience}: no modality can stop within {epochs} epochs (the earliest stop "
                f"acts from epoch {earliest + 1}), so this run is multitask joint training throughout"]

    # ---- training ---------------------------------------------------------------------
    def start_epoch(self, epoch):
        for m in self.pending:              # the weights of the stopped modality's best epoch
            encoder, head = self.snapshots.pop(m)
            self.model.encoders[m].load_state_dict(encoder)
            self.model.heads[m].load_state_dict(head)
        self.pending = []

    def training_step(self, batch, step):
        xs, y = batch
        model, stopped = self.model, self.stopped
        feats = {}
        for m in model.modalities:
            if stopped[m]:
                with eval_mode(model.encoders[m], model.heads[m]), torch.no_grad():
                    feats[m] = model.encoders[m](xs[m])
            else:
                feats[m] = model.encoders[m](xs[m])
        fused_loss = F.cross_entropy(model.fused_logits(feats), y)
        loss = fused_loss
        logs = {}
        for m in model.modalities:
            if not stopped[m]:
                aux = F.cross_entropy(model.heads[m](feats[m]), y)
                loss = loss + self.aux_weight * aux
                logs[f"loss_{m}"] = aux.detach()
        self.minimize(loss)
        return {"loss": loss.detach(), "loss_fused": fused_loss.detach(), **logs}

    def on_validation(self, epoch, metrics):
        logs = {}
        for m in self.model.modalities:
            value = metrics["per_modality"][m][self.monitor]
            if self.stopped_at[m] is None:
                score = smoothed_score(value, self.previous[m], self.smoothing)
                self.previous[m] = value
                self.best[m], self.best_epoch[m], stop = early_stopping_update(
                    score, self.best[m], self.best_epoch[m], epoch, self.patience, self.monitor, self.min_delta)
                if self.best_epoch[m] == epoch and self.restore == "modality":
                    self.snapshots[m] = _snapshot(self.model.encoders[m], self.model.heads[m])
                if stop:
                    self.stopped_at[m] = epoch + 1
                    if self.restore == "modality":
                        self.pending.append(m)
                logs[f"mses_score_{m}"] = score
            logs[f"mses_val_{self.monitor}_{m}"] = value
            logs[f"mses_wait_{m}"] = epoch - self.best_epoch[m]
            logs[f"mses_stopped_{m}"] = int(self.stopped_at[m] is not None)
        # a group trains at η · schedule until its modality stops, then at 0
        logs.update({f"mses_lr_{g['name']}": float(g["lr"]) * self.lr_scale(g["name"])
                     for g in self.optimizer.param_groups if g.get("name") is not None})
        return logs

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        return self.model.outputs(xs)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "best": dict(self.best), "best_epoch": dict(self.best_epoch),
                "previous": dict(self.previous), "stopped_at": dict(self.stopped_at),
                "snapshots": dict(self.snapshots), "pending": list(self.pending)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.best, self.best_epoch = dict(state["best"]), dict(state["best_epoch"])
        self.previous, self.stopped_at = dict(state["previous"]), dict(state["stopped_at"])
        self.snapshots, self.pending = dict(state["snapshots"]), list(state["pending"])
