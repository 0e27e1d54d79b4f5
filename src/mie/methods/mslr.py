"""MSLR — Modality-Specific Learning Rates.

Yao, Mihalcea: "Modality-specific Learning Rates for Effective Multimodal Additive Late-fusion",
Findings of ACL 2022, pp. 1824–1834 (aclanthology.org/2022.findings-acl.143).

Model: additive late fusion — one encoder φ_m and head h_m per modality (``LateFusionModel``), the
prediction is the SUM of the unimodal predictions, trained on one cross-entropy:

    z_m = h_m(φ_m(x_m)),    z = Σ_m z_m  (``aggregation="sum"``, the paper's; "mean": z = (1/M) Σ_m z_m),
    L = CE(z, y).

One optimizer with ONE PARAMETER GROUP PER MODALITY, named by the modality, θ_m = parameters of φ_m
and h_m (the additive fusion has no parameters of its own). With η the run's ``train.lr`` (× the
loop's step schedule), group m's learning rate is

    η_m(t) = η · r_m(t),        r_m(0) = ``initial_scale[m]``  (1 where not given),

r_m(t) being what ``lr_scale(m)`` returns to the loop at the start of epoch t.

Strategies for r_m (updated in ``on_validation`` after epoch t, so they act from epoch t+1 on). Let
a_m(t) be modality m's own validation accuracy (argmax of z_m alone: the loop's validation metrics,
``metrics["per_modality"][m]["accuracy"]``) and W_m(t) = the last min(t+1, H) values
a_m(t−H+1), …, a_m(t), H = ``history``:

    keep:     r_m(t+1) = r_m(t)                                     fixed multipliers
    dynamic:  r_m(t+1) = r_m(t) · a_m(t) / mean(W_m(t))    when (t+1) mod H = 0, else r_m(t)
    smooth:   r_m(t+1) = r_m(t) · a_m(t) / mean(W_m(t))    after every epoch

(a ratio with mean(W_m) = 0 is taken as 1). A modality whose validation accuracy is above its
recent average speeds up, one that falls below it slows down — each on its own evidence, so the
rule is the same for any number of modalities M ≥ 2.

Inference (``fusion``): "model" (default) predicts softmax(z), the training rule (sum or mean of the
logits, per ``aggregation``); "average" and "weight" fuse the per-modality predictions
(``mie.models.fusion``).

Sources and what is ours. The paper builds the late-fusion model from unimodal models fine-tuned
with their own best learning rates and compares three strategies for the per-modality rates; "keep"
keeps each modality's unimodal rate (here: ``initial_scale``, which a user sets from unimodal runs,
e.g. ``mie.fit(..., method="unimodal")`` with several ``train.lr``). The text of the paper's "smooth"
and "dynamic" rules was NOT available to us when this file was written (only the abstract); "dynamic"
follows the public re-implementation we could read (an MSLR trainer whose header says it was
written from the paper: per-encoder param groups, a 5-epoch buffer of validation accuracies, and
lr ← lr · acc_now / mean(buffer) every 5 epochs; default strategy "dynamic", history 5). "smooth" is
this library's per-epoch form of the same ratio (small steps every epoch instead of one step every H
epochs). Check both against the paper before quoting numbers as the paper's. Also different from the
paper: modalities start from scratch here (no unimodal pre-fine-tuning), as every ``mie`` method does.

Logged by ``on_validation``: ``mslr_lr_<m>`` (η_m for the next epoch, at this epoch's schedule factor)
and, for smooth/dynamic, ``mslr_val_acc_<m>`` (a_m(t)) and ``mslr_ratio_<m>`` (the factor applied, 1
when none was).
"""
import torch
import torch.nn.functional as F

from ..errors import MieInputError
from ..models import FUSIONS
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, number, one_of

STRATEGIES = ("keep", "smooth", "dynamic")
AGGREGATIONS = ("sum", "mean")


def scale_map(v):
    """Check of ``initial_scale``: None, or a mapping modality → number > 0."""
    ok = v is None or (isinstance(v, dict) and all(number(above=0)(s) is None for s in v.values()))
    return None if ok else "None or a mapping modality → number > 0, e.g. {pix: 1.0, zer: 10.0}"


def accuracy_ratio(window):
    """a(t) / mean(W): the last accuracy of ``window`` over the window's mean (1 if the mean is 0)."""
    if not window:
        raise MieInputError("an accuracy window needs at least one value")
    mean = sum(window) / len(window)
    return window[-1] / mean if mean > 0 else 1.0


def mslr_update(scales, windows, strategy, epoch, history):
    """New multipliers and the factor applied to each: ({m: r_m}, {m: ratio}).

    ``scales`` {m: r_m(t)}; ``windows`` {m: [a_m(·) …, a_m(t)]} (at most ``history`` values, last
    one of epoch ``epoch``, 0-based)."""
    if strategy == "keep" or (strategy == "dynamic" and (epoch + 1) % history != 0):
        return dict(scales), {m: 1.0 for m in scales}
    ratios = {m: accuracy_ratio(windows[m]) for m in scales}
    return {m: scales[m] * ratios[m] for m in scales}, ratios


class MSLR(SingleOptimizerMethod):
    name = "mslr"
    params = {
        "strategy": Param("dynamic", one_of(*STRATEGIES), "rule for r_m: keep | smooth | dynamic"),
        "initial_scale": Param(None, scale_map, "r_m(0) per modality, e.g. {pix: 1.0, zer: 10.0} (1 where not given)"),
        "history": Param(5, number(at_least=1, integer=True), "H: validation accuracies in the window"),
        "aggregation": Param("sum", one_of(*AGGREGATIONS), "training logits z = Σ_m z_m (sum) or their mean"),
        "fusion": fusion_param("model", FUSIONS),
    }

    # ---- set-up -----------------------------------------------------------------------
    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        initial = {str(m): float(s) for m, s in (self.initial_scale or {}).items()}
        unknown = sorted(set(initial) - set(model.modalities))
        if unknown:
            raise MieInputError(f"initial_scale names unknown modality {', '.join(unknown)}; the data has "
                                f"{', '.join(model.modalities)}")
        super().setup(model, ctx)
        self.scales = {m: initial.get(m, 1.0) for m in model.modalities}
        self.windows = {m: [] for m in model.modalities}

    def parameter_groups(self, model):
        return [{"params": model.modality_parameters(m), "name": m} for m in model.modalities]

    def lr_scale(self, group):
        return self.scales.get(group, 1.0)

    # ---- training ---------------------------------------------------------------------
    def aggregate(self, logits):
        """z = Σ_m z_m, or (1/M) Σ_m z_m (``aggregation``)."""
        z = torch.stack(list(logits.values())).sum(dim=0)
        return z / len(logits) if self.aggregation == "mean" else z

    def training_step(self, batch, step):
        xs, y = batch
        loss = F.cross_entropy(self.aggregate(self.model(xs)), y)
        self.minimize(loss)
        return {"loss": loss.detach()}

    def on_validation(self, epoch, metrics):
        logs, ratios = {}, {m: 1.0 for m in self.model.modalities}
        if self.strategy != "keep":
            for m in self.model.modalities:
                accuracy = metrics["per_modality"][m]["accuracy"]
                self.windows[m] = (self.windows[m] + [accuracy])[-self.history:]
                logs[f"mslr_val_acc_{m}"] = accuracy
            self.scales, ratios = mslr_update(self.scales, self.windows, self.strategy, epoch, self.history)
            logs.update({f"mslr_ratio_{m}": r for m, r in ratios.items()})
        # the rate this epoch trained with (η · schedule · r_m(t)) × the factor applied to r_m
        logs.update({f"mslr_lr_{g['name']}": float(g["lr"]) * ratios[g["name"]] for g in self.optimizer.param_groups})
        return logs

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        per = {m: z.float() for m, z in self.model(xs).items()}
        return per, self.aggregate(per)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "scales": dict(self.scales),
                "windows": {m: list(w) for m, w in self.windows.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.scales = dict(state["scales"])
        self.windows = {m: list(w) for m, w in state["windows"].items()}
