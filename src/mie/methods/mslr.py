"""MSLR — Modality-Specific Learning Rates.

Yao, Mihalcea: "Modality-specific Learning Rates for Effective Multimodal Additive Late-fusion",
Findings of ACL 2022, pp. 1824–1834 (aclanthology.org/2022.findings-acl.143).

Sources. Only the paper's ABSTRACT was reachable when this file was written, and no code from the
authors was found. The abstract fixes the model (additive late fusion: "the final prediction can be
formulated as the sum of unimodal predictions"), that MSLR builds the late-fusion model "from
fine-tuned unimodal models" with a learning rate per modality, and that the paper compares "three
different strategies to assign learning rates". The rule below is therefore the one of the public
code that produced published MSLR numbers: AGM's baseline (Li et al., ICCV 2023;
github.com/lihong2303/AGM_ICCV2023, ``run/CREMAD_main.py`` lines 194-209 and 671-684; the same
rule in ``run/AVMNIST_main.py`` and ``run/URFunny_main.py``). Check it against the paper before
quoting our numbers as the paper's.

Model: additive late fusion — one encoder φ_m and head h_m per modality (``LateFusionModel``), the
prediction is the SUM of the unimodal logits, trained on one cross-entropy (AGM's ``AVClassifier_Sum``,
``model/CREMAD_net.py`` lines 123-163: ``out = out_a + out_v``):

    z_m = h_m(φ_m(x_m)),    z = Σ_m z_m  (``aggregation="sum"``; "mean": z = (1/M) Σ_m z_m, ours),
    L = CE(z, y).

One optimizer with ONE PARAMETER GROUP PER MODALITY, named by the modality, θ_m = parameters of φ_m
and h_m. With η the run's ``train.lr`` (× the loop's step schedule), group m's learning rate is

    η_m(t) = η · r_m(t),        s_m = ``initial_scale[m]`` (1 where not given),   r_m(0) = s_m,

r_m(t) being what ``lr_scale(m)`` returns to the loop at the start of epoch t (0-based). s_m is the
paper's per-modality starting rate (the rate modality m's unimodal model was fine-tuned with,
relative to η; AGM hard-codes it per dataset, e.g. audio 0.9 / visual 1.1 on CREMA-D, line 195-196).

Strategies, updated in ``on_validation`` after epoch t (they act from epoch t+1 on), from a_m(t),
modality m's own validation accuracy (argmax of z_m alone, ``metrics["per_modality"][m]["accuracy"]``)
and a memory Q_m of past accuracies, H = ``history``:

    dynamic (default; AGM lines 671-684, then 197-198):
        if |Q_m| < H:  Q_m ← Q_m + [a_m(t)],   r_m(t+1) = r_m(t)                    (filling)
        else:          r_m(t+1) = s_m · a_m(t) / mean(Q_m),   Q_m ← Q_m[1:] + [a_m(t)]
      i.e. from epoch H+1 on, every epoch, the rate is the starting rate times the latest accuracy
      over the mean of the H accuracies BEFORE it (not cumulative).
    keep:       r_m(t) = s_m                                    (the paper's unimodal rates, fixed)
    cumulative: r_m(t+1) = r_m(t) · a_m(t) / mean(a_m(t−H+1..t))  when (t+1) mod H = 0, else r_m(t)
      — the previous default of this library, after a second public re-implementation (an
      ``MSLRTrainer`` whose header says it was written from the paper; its repository could not
      be identified): the window includes a_m(t) and the ratios compound.

A ratio with a zero mean is taken as 1 (ours; AGM would divide by zero). The rule is per modality,
so it is the same for any M ≥ 2 (AGM's UR-Funny run has three).

Differences from AGM's code: AGM multiplies the GRADIENTS of φ_m, h_m by s_m·ratio before an SGD
step with momentum 0.9 and weight decay 1e-4 (lines 203-209); here the learning rate of the group is
scaled (the paper's "learning rates"), which is the same update for plain SGD and differs only in how
momentum and weight decay mix with a changing factor. AGM applies the factors only inside its
``modulation_starts..modulation_ends`` window and reads the accuracies on its test loader; here
they act for the whole run and are read on validation. AGM's CREMA-D evaluation counts a visual hit
as an audio hit too (``run/CREMAD_main.py`` lines 400-404), so its audio accuracy there is the visual
one; not reproduced. The paper's modalities start from fine-tuned unimodal models; here they start
from scratch, as in every ``mie`` method.

Inference (``fusion``): "model" (default) predicts softmax(z), the training rule (sum or mean of the
logits, per ``aggregation``); "average" and "weight" fuse the per-modality predictions
(``mie.models.fusion``).

Logged by ``on_validation``: ``mslr_lr_<m>`` (η_m for the next epoch, at this epoch's schedule factor)
and, for dynamic/cumulative, ``mslr_val_acc_<m>`` (a_m(t)) and ``mslr_ratio_<m>`` (r_m(t+1)/r_m(t)).
"""
import torch
import torch.nn.functional as F

from ..errors import MieInputError
from ..models import FUSIONS
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, Space, number, one_of

STRATEGIES = ("dynamic", "keep", "cumulative")
AGGREGATIONS = ("sum", "mean")


def scale_map(v):
    """Check of ``initial_scale``: None, or a mapping modality → number > 0."""
    ok = v is None or (isinstance(v, dict) and all(number(above=0)(s) is None for s in v.values()))
    return None if ok else "None or a mapping modality → number > 0, e.g. {pix: 1.0, zer: 10.0}"


def accuracy_ratio(current, window):
    """``current`` / mean(``window``) (1 if the mean is 0)."""
    if not window:
        raise MieInputError("an accuracy window needs at least one value")
    mean = sum(window) / len(window)
    return current / mean if mean > 0 else 1.0


def mslr_update(strategy, scale, initial, memory, accuracy, epoch, history):
    """One modality's rule after epoch ``epoch`` (0-based): (r_m(t+1), new memory Q_m).

    ``scale`` r_m(t), ``initial`` s_m, ``memory`` Q_m (the accuracies the rule keeps), ``accuracy``
    a_m(t)."""
    if strategy == "keep":
        return scale, memory
    if strategy == "dynamic":
        if len(memory) < history:
            return scale, memory + [accuracy]
        return initial * accuracy_ratio(accuracy, memory), memory[1:] + [accuracy]
    memory = (memory + [accuracy])[-history:]               # cumulative
    if (epoch + 1) % history != 0:
        return scale, memory
    return scale * accuracy_ratio(accuracy, memory), memory


def first_change(strategy, history):
    """The first loop epoch (0-based) whose rate a strategy can have changed (None: never)."""
    return {"dynamic": history + 1, "cumulative": history}.get(strategy)


class MSLR(SingleOptimizerMethod):
    name = "mslr"
    params = {
        "strategy": Param("dynamic", one_of(*STRATEGIES),
                          "rule for r_m: dynamic (AGM's code) | keep | cumulative (ours: every H epochs, compounding)"),
        "initial_scale": Param(None, scale_map, "s_m = r_m(0) per modality, e.g. {pix: 1.0, zer: 10.0} (default 1)"),
        "history": Param(5, number(at_least=1, integer=True), "H: validation accuracies the rule remembers",
                         Space("int", 2, 10)),  # ours
        "aggregation": Param("sum", one_of(*AGGREGATIONS), "training logits z = Σ_m z_m (sum) or their mean (ours)"),
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
        self.initial = {m: initial.get(m, 1.0) for m in model.modalities}
        self.scales = dict(self.initial)
        self.memory = {m: [] for m in model.modalities}

    def parameter_groups(self, model):
        return [{"params": model.modality_parameters(m), "name": m} for m in model.modalities]

    def lr_scale(self, group):
        return self.scales.get(group, 1.0)

    def notices(self):
        start = first_change(self.strategy, self.history)
        epochs = self.ctx.epochs_per_modality
        if start is None or start < epochs:
            return []
        return [f"strategy '{self.strategy}' with history {self.history} changes a learning rate from epoch "
                f"{start + 1} on; this run has {epochs} epochs, so every modality keeps its starting rate "
                f"(η · initial_scale) throughout: additive late fusion with fixed per-modality rates"]

    # ---- training ---------------------------------------------------------------------
    def fuse_logits(self, logits):
        """z = Σ_m z_m, or (1/M) Σ_m z_m (``aggregation``)."""
        z = torch.stack(list(logits.values())).sum(dim=0)
        return z / len(logits) if self.aggregation == "mean" else z

    def training_step(self, batch, step):
        xs, y = batch
        loss = F.cross_entropy(self.fuse_logits(self.model(xs)), y)
        self.minimize(loss)
        return {"loss": loss.detach()}

    def on_validation(self, epoch, metrics):
        logs, old = {}, dict(self.scales)
        if self.strategy != "keep":
            for m in self.model.modalities:
                accuracy = metrics["per_modality"][m]["accuracy"]
                self.scales[m], self.memory[m] = mslr_update(self.strategy, self.scales[m], self.initial[m],
                                                             self.memory[m], accuracy, epoch, self.history)
                logs[f"mslr_val_acc_{m}"] = accuracy
                logs[f"mslr_ratio_{m}"] = self.scales[m] / old[m] if old[m] > 0 else 1.0
        # η · schedule factor (the same for every group) × r_m(t+1)
        scheduled = next((float(g["lr"]) / old[g["name"]] for g in self.optimizer.param_groups
                          if old[g["name"]] > 0), None)
        if scheduled is not None:
            logs.update({f"mslr_lr_{m}": scheduled * self.scales[m] for m in self.model.modalities})
        return logs

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        per = {m: z.float() for m, z in self.model(xs).items()}
        return per, self.fuse_logits(per)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "scales": dict(self.scales),
                "memory": {m: list(w) for m, w in self.memory.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.scales = dict(state["scales"])
        self.memory = {m: list(w) for m, w in state["memory"].items()}
