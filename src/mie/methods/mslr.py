"""MSLR — Modality-Specific Learning Rates.

Yao, Mihalcea: "Modality-specific Learning Rates for Effective Multimodal Additive Late-fusion",
Findings of ACL 2022, pp. 1824–1834 (aclanthology.org/2022.findings-acl.143).

Model: additive late fusion — one encoder φ_m and head h_m per modality (``LateFusionModel``), the
prediction is the SUM of the unimodal predictions, trained on one cross-entropy:

    z_m = h_m(φ_m(x_m)),    z = Σ_m z_m  (``fusion="sum"``, the paper's; "mean": z = (1/M) Σ_m z_m),
    L = CE(z, y).

One optimizer with ONE PARAMETER GROUP PER MODALITY, θ_m = parameters of φ_m and h_m (the additive
fusion has no parameters of its own). With η the run's ``train.lr``, group m's learning rate is

    η_m(t) = η · r_m(t),        r_m(0) = ``lr_scale[m]``  (1 where not given).

Strategies for r_m (updated in ``end_epoch`` after epoch t, so they act from epoch t+1 on). Let
a_m(t) be modality m's own validation accuracy (argmax of z_m alone, over ``ctx.val_batches()`` in
eval mode) and W_m(t) = the last min(t+1, H) values a_m(t−H+1), …, a_m(t), H = ``history``:

    keep:     r_m(t+1) = r_m(t)                                     fixed multipliers
    dynamic:  r_m(t+1) = r_m(t) · a_m(t) / mean(W_m(t))    when (t+1) mod H = 0, else r_m(t)
    smooth:   r_m(t+1) = r_m(t) · a_m(t) / mean(W_m(t))    after every epoch

(a ratio with mean(W_m) = 0 is taken as 1). A modality whose validation accuracy is above its
recent average speeds up, one that falls below it slows down — each on its own evidence, so the
rule is the same for any number of modalities M ≥ 2.

Sources and what is ours. The paper builds the late-fusion model from unimodal models fine-tuned
with their own best learning rates and compares three strategies for the per-modality rates; "keep"
keeps each modality's unimodal rate (here: ``lr_scale``, which a user sets from unimodal runs, e.g.
``mie.fit(..., method="unimodal")`` with several ``train.lr``). The text of the paper's "smooth" and
"dynamic" rules was NOT available to us when this file was written (only the abstract); "dynamic"
follows the public re-implementation we could read (an MSLR trainer whose header says it was
written from the paper: per-encoder param groups, a 5-epoch buffer of validation accuracies, and
lr ← lr · acc_now / mean(buffer) every 5 epochs; default strategy "dynamic", history 5). "smooth" is
this library's per-epoch form of the same ratio (small steps every epoch instead of one step every H
epochs). Check both against the paper before quoting numbers as the paper's. Also different from the
paper: modalities start from scratch here (no unimodal pre-fine-tuning), as every ``mie`` method does.

Logged by ``end_epoch``: ``mslr_lr_<m>`` (η_m for the next epoch) and, for smooth/dynamic,
``mslr_val_acc_<m>`` (a_m(t)) and ``mslr_ratio_<m>`` (the factor applied, 1 when none was).
"""
import torch
import torch.nn.functional as F

from ..errors import MieInputError
from .base import Method, require_two_modalities
from .multihead import output_metrics

STRATEGIES = ("keep", "smooth", "dynamic")
FUSIONS = ("sum", "mean")


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


class MSLR(Method):
    name = "mslr"

    def __init__(self, strategy="dynamic", lr_scale=None, history=5, fusion="sum"):
        if strategy not in STRATEGIES:
            raise MieInputError(f"unknown strategy '{strategy}' for MSLR; expected one of {STRATEGIES}")
        if fusion not in FUSIONS:
            raise MieInputError(f"unknown fusion '{fusion}' for MSLR; expected 'sum' (the paper's additive "
                                "late fusion) or 'mean'")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise MieInputError(f"history must be an integer >= 1, got {history!r}")
        if lr_scale is not None:
            if not isinstance(lr_scale, dict):
                raise MieInputError(f"lr_scale must map modality names to learning-rate multipliers, "
                                    f"e.g. {{pix: 1.0, zer: 10.0}}; got {lr_scale!r}")
            for m, s in lr_scale.items():
                if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
                    raise MieInputError(f"lr_scale[{m!r}] must be a number > 0, got {s!r}")
            lr_scale = {str(m): float(s) for m, s in lr_scale.items()}
        super().__init__(fusion=fusion)
        self.strategy, self.lr_scale, self.history = strategy, lr_scale, history

    # ---- set-up -----------------------------------------------------------------------
    def setup(self, model, ctx):
        super().setup(model, ctx)
        require_two_modalities(model, self.name)
        unknown = sorted(set(self.lr_scale or {}) - set(model.modalities))
        if unknown:
            raise MieInputError(f"lr_scale names unknown modality {', '.join(unknown)}; the data has "
                                f"{', '.join(model.modalities)}")
        self.optimizer = ctx.make_optimizer([{"params": model.modality_parameters(m)} for m in model.modalities])
        self.base_lr = {m: float(g["lr"]) for m, g in self.groups.items()}      # η (train.lr)
        self.scales = {m: (self.lr_scale or {}).get(m, 1.0) for m in model.modalities}
        self.windows = {m: [] for m in model.modalities}
        self._apply()

    @property
    def groups(self):
        """{m: modality m's param group} (looked up each time: ``load_state_dict`` replaces the dicts)."""
        return dict(zip(self.model.modalities, self.optimizer.param_groups))

    def _apply(self):
        for m, g in self.groups.items():
            g["lr"] = self.base_lr[m] * self.scales[m] * g.get("lr_factor", 1.0)   # × the loop's schedule

    # ---- training ---------------------------------------------------------------------
    def fused_logits(self, logits):
        z = torch.stack(list(logits.values())).sum(dim=0)
        return z / len(logits) if self.fusion == "mean" else z

    def train_step(self, xs, y):
        loss = F.cross_entropy(self.fused_logits(self.model(xs)), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def end_epoch(self, epoch):
        logs = {}
        if self.strategy != "keep":
            metrics = output_metrics(self.model, self.ctx.val_batches())
            for m in self.model.modalities:
                self.windows[m] = (self.windows[m] + [metrics[m]["accuracy"]])[-self.history:]
                logs[f"mslr_val_acc_{m}"] = metrics[m]["accuracy"]
            self.scales, ratios = mslr_update(self.scales, self.windows, self.strategy, epoch, self.history)
            self._apply()
            logs.update({f"mslr_ratio_{m}": r for m, r in ratios.items()})
        logs.update({f"mslr_lr_{m}": float(g["lr"]) for m, g in self.groups.items()})
        return logs

    # ---- inference --------------------------------------------------------------------
    def fuse(self, logits, probs):
        """The training rule: softmax of Σ_m z_m (or of their mean)."""
        return F.softmax(self.fused_logits({m: z.float() for m, z in logits.items()}), dim=-1)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scales": dict(self.scales),
                "windows": {m: list(w) for m, w in self.windows.items()}, "base_lr": dict(self.base_lr)}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scales = dict(state["scales"])
        self.windows = {m: list(w) for m, w in state["windows"].items()}
        self.base_lr = dict(state["base_lr"])
        self._apply()
