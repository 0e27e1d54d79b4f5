"""The method interface: everything that is special about a training method, and nothing else.

The training loop (``mie.train``) owns epochs, evaluation, checkpoints, logging, devices, mixed
precision and learning-rate schedules, and calls a method through these hooks only:

    model = method.build_model(spec)                   # which modules exist
    method.setup(model, ctx)                           # optimizers (ctx.make_optimizer), state
    for epoch in range(method.num_epochs(E)):          # E = epoch budget per modality
        method.start_epoch(epoch)
        data = method.training_data(epoch, train_set)  # the set this epoch draws from (SMV rebuilds it)
        inputs = method.training_inputs(epoch)         # the modalities its steps read: only these are loaded
        for each batch: logs = method.training_step(batch, step)   # passes, gradient edits, steps
        logs = method.end_epoch(epoch)                 # state between epochs (MIE's T, prototypes)
        method.fit_on_validation(logits, labels)       # if method.fits_on_validation ("fitted" fusion)
        metrics = validation of method.predict         # the loop's own pass, in eval mode
        logs = method.on_validation(epoch, metrics)    # decisions taken on validation (MSLR, MSES)
        method.write_files(out, final)                 # its own files in the run folder (MIE's GM diagnostics)
        method.keep_model(epoch) → checkpoints/epoch_<n>.pt   # models worth keeping (MIE's stage ends)

What a method gets from the loop, it gets here: the step's position (``Step``), the loop's
validation metrics (``on_validation``), any other split's metrics (``ctx.evaluate(split)``, cached
until the model changes), and a learning rate per parameter group: a group created with a
``"name"`` trains at the scheduled rate × ``lr_scale(name)``, applied by the loop at every epoch
start. A method never runs its own validation pass, keeps an epoch counter or writes into
optimizer param groups.

Mixed precision (``train.amp``) runs the model's forward passes in autocast and nothing else: the
gradient arithmetic a method does between backward and step is in full precision by construction.

The checkpoint chosen on validation restores the model's weights and buffers only, so anything
``predict`` needs (e.g. running means used at inference) belongs in the model as buffers;
``state_dict`` is for what training needs to resume (optimizers, projection matrices, counters).

What inference fits on validation, it fits through one seam: when ``method.fits_on_validation``
(the ``fusion`` rule is "fitted"), each validation pass of a changed model first hands
``method.fit_on_validation`` every modality's logits over the whole validation split {m: (N, K)}
and the labels (N,) (from the per-modality cache under ``separate_modalities``), then computes the
validation metrics with what was fitted. What is fitted lives in the model as buffers — a method
given a model (``method.model = model``: the loop's ``setup``, ``mie eval``) adds them
(``model.fitted_fusion``) — so the checkpoint chosen on validation carries it and test reads it
unchanged. The test split never reaches the seam.
"""
import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import MieInputError
from ..models import LATE_FUSIONS, LateFusionModel, fused_prediction
from ..models.fusion import FittedFusion
from .params import Param, check_params, one_of


class Step(NamedTuple):
    """Where a training step stands in the run."""
    epoch: int              # loop epoch, 0-based
    index: int              # mini-batch within the epoch, 0-based
    steps_per_epoch: int
    global_step: int        # steps since the start of the run, 0-based


class Batch(tuple):
    """A mini-batch that unpacks as ``xs, y = batch``: ``inputs`` {modality: (B, ...)} and ``labels``
    (B,) on the run's device, and ``extras`` {name: (B, ...)}: per-sample tensors carried by the
    items of a method's ``training_data`` set (empty otherwise)."""

    def __new__(cls, inputs, labels, extras=None):
        batch = super().__new__(cls, (inputs, labels))
        batch.extras = extras or {}
        return batch

    @property
    def inputs(self):
        return self[0]

    @property
    def labels(self):
        return self[1]


def fusion_param(default="average", rules=LATE_FUSIONS):
    """The ``fusion`` parameter: how predictions are fused at inference (``mie.models.fusion``)."""
    return Param(default, one_of(*rules), "inference fusion rule: " + " | ".join(rules))


def require_two_modalities(model, name):
    """Refuse a model with a single modality for a method that balances several."""
    if len(model.modalities) < 2:
        raise MieInputError(f"method '{name}' balances two or more modalities, but the data has only "
                            f"{', '.join(model.modalities)}; use method 'unimodal' for one modality")


class Method:
    """Base class. Subclasses set ``name``, declare ``params`` and override the hooks they need.

    ``params`` maps each hyper-parameter to its ``Param`` (default, accepted values, help); they are
    what a config's ``method:`` section and ``create_method(name, **params)`` accept, checked there
    once, and become attributes of the method.
    """

    name = "base"
    params = {"fusion": fusion_param()}
    stops_early = False     # True when the method may end a modality's training before the budget (MSES)
    # True when ``logits(xs)`` is made of ``modality_logits(m, x_m)`` alone, each depending on m's parameters
    # alone, so the loop reuses a modality's validation outputs while it is not trained (MIE)
    separate_modalities = False

    def __init__(self, **values):
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            raise MieInputError(f"unknown parameter(s) {', '.join(unknown)} for method '{self.name}'")
        check_params(self.name, self.params, values)
        self.check_params({**{k: p.default for k, p in self.params.items()}, **values})
        for key, param in self.params.items():
            setattr(self, key, copy.deepcopy(values.get(key, param.default)))
        self.model = None
        self.ctx = None

    @property
    def model(self):
        """The nn.Module this method trains and predicts with."""
        return self._model

    @model.setter
    def model(self, model):
        # a model given to the method gets the buffers its inference rule fits: under "fitted", the weights
        if model is not None and self.fusion == "fitted" and not hasattr(model, "fitted_fusion"):
            model.fitted_fusion = FittedFusion(model.modalities).to(next(model.parameters()).device)
        self._model = model

    @classmethod
    def check_params(cls, values):
        """Checks that involve several parameters (``values``: every parameter's value)."""

    @classmethod
    def unused_params(cls, fixed):
        """Parameters that have no effect once ``fixed`` settings are applied (hidden from users)."""
        return set()

    def hparams(self):
        return {k: getattr(self, k) for k in self.params}

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        """Return the nn.Module this method trains (default: encoder + head per modality)."""
        return LateFusionModel.build(spec)

    def setup(self, model, ctx):
        """Create optimizers and state. ``ctx`` is a ``TrainContext`` (see ``mie.train``)."""
        self.model, self.ctx = model, ctx

    def num_epochs(self, epochs_per_modality):
        """Loop epochs that give every modality ``epochs_per_modality`` epochs of updates."""
        return epochs_per_modality

    def trained_modalities(self, epoch):
        """The modalities that receive updates in loop epoch ``epoch`` (the loop counts each
        modality's epochs of updates: the budget a comparison must hold equal)."""
        return list(self.model.modalities)

    def notices(self):
        """One-line remarks about how this run will train that a reader of its results must know
        (e.g. a rule that never acts within the budget); shown at the start and kept in metrics.json."""
        return []

    def schedule_epoch(self, epoch):
        """The epoch count the learning-rate schedule (train.lr_step) reads at loop epoch ``epoch``."""
        return epoch

    def lr_scale(self, group):
        """Multiplier of the scheduled learning rate for the param group named ``group``."""
        return 1.0

    # ---- training ---------------------------------------------------------------------
    def start_epoch(self, epoch):
        """Called before each epoch's first step."""

    def training_data(self, epoch, dataset):
        """The Dataset epoch ``epoch``'s shuffled batches are drawn from (default: the training split
        ``dataset`` itself). Items are (inputs, label) or (inputs, label, extras) with extras a dict
        of per-sample tensors, which reach ``training_step`` as ``batch.extras``."""
        return dataset

    def training_inputs(self, epoch):
        """The modalities whose inputs epoch ``epoch``'s ``training_step`` reads (None: all of them); the
        loop loads only these (a stage of MIE reads one modality's: the others' files are not read)."""
        return None

    def training_step(self, batch, step):
        """One optimisation step on ``batch`` (a ``Batch``) at ``step`` (a ``Step``). Returns scalars
        to log (floats or 0-d tensors; the loop averages them over the epoch)."""
        raise NotImplementedError

    def end_epoch(self, epoch):
        """Called after each epoch's last step, before validation. Returns scalars to log."""
        return {}

    def on_validation(self, epoch, metrics):
        """The loop's validation ``metrics`` of this epoch (fused and per-modality accuracy and loss:
        ``metrics["accuracy"]``, ``metrics["loss"]``, ``metrics["per_modality"][m]["accuracy"|"loss"]``).
        Returns scalars to log."""
        return {}

    # ---- the run folder -----------------------------------------------------------------
    def write_files(self, out_dir, final):
        """Write the method's own data files (and figures) into the run folder ``out_dir``; called on
        the writing rank after each epoch's history row, ``final`` after the last epoch."""

    def keep_model(self, epoch):
        """Whether the loop keeps the model after loop epoch ``epoch`` (0-based) as the checkpoint
        ``checkpoints/epoch_<epoch + 1>.pt`` (read like best.pt by ``mie.evaluate``)."""
        return False

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        """({m: modality m's own logits (B, K)}, the method's fused logits (B, K) or None)."""
        return self.model(xs), None

    def modality_logits(self, m, x):
        """(modality m's own logits (B, K), its additive share of the fused logits (B, K) or None): under
        ``separate_modalities``, ``logits(xs)`` is ({m: own_m}, Σ_m share_m, or None when shares are None)."""
        return self.model.forward_modality(m, x), None

    def fuse_logits(self, per_logits):
        """The method's fused logits (B, K) as a function of per-modality logits {m: (B, K)} of any
        subset of its modalities, or None when its "model" fusion is not such a function (a fusion
        head on joint features). Late-fusion methods override it (``joint``: the sum)."""
        return None

    @torch.no_grad()
    def predict(self, xs):
        """Return (fused probabilities (B, K), {m: modality m's own probabilities (B, K)})."""
        return self.predict_from_logits(*self.logits(xs))

    def predict_from_logits(self, per_logits, fused_logits):
        """``predict`` from the outputs of ``logits``."""
        probs = {m: F.softmax(z.float(), dim=-1) for m, z in per_logits.items()}
        return fused_prediction(self.fusion, probs, fused_logits, self.fitted_weights()), probs

    @property
    def fits_on_validation(self):
        """Whether the loop calls ``fit_on_validation`` before each validation's metrics."""
        return self.fusion == "fitted"

    def fit_on_validation(self, per_logits, labels):
        """Fit inference on validation: ``per_logits`` {m: (N, K)} each modality's logits over the whole
        validation split, ``labels`` (N,). Default: the "fitted" fusion's weights (``mie.models.fusion``)."""
        self.model.fitted_fusion.fit({m: F.softmax(z.float(), dim=-1) for m, z in per_logits.items()}, labels)

    def fitted_weights(self):
        """{m: w_m} of the "fitted" fusion (None under any other rule)."""
        return self.model.fitted_fusion.weights() if self.fusion == "fitted" else None

    @torch.no_grad()
    def predict_present(self, xs, present):
        """Fused probabilities (B, K) from the modalities in ``present`` alone, as a deployed system
        told which modalities are missing would fuse them; None when this method's prediction is not
        a fusion of per-modality predictions (its ``fusion`` is "model" and ``fuse_logits`` is None)."""
        per_logits, _ = self.logits(xs)
        kept = {m: per_logits[m].float() for m in present}
        if self.fusion in LATE_FUSIONS:
            return fused_prediction(self.fusion, {m: F.softmax(z, dim=-1) for m, z in kept.items()},
                                    weights=self.fitted_weights())
        if self.fusion != "model":
            return None
        fused = self.fuse_logits(kept)
        return None if fused is None else F.softmax(fused.float(), dim=-1)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        """Everything besides the model's weights needed to resume (optimizers, matrices)."""
        return {}

    def load_state_dict(self, state):
        pass


class SingleOptimizerMethod(Method):
    """A method with one optimizer over all the model's parameters (``self.optimizer``), saved with
    the run."""

    def setup(self, model, ctx):
        super().setup(model, ctx)
        self.optimizer = ctx.make_optimizer(self.parameter_groups(model))

    def parameter_groups(self, model):
        """What ``self.optimizer`` trains: parameters, or param groups (dicts with a ``"name"``)."""
        return model.parameters()

    def minimize(self, loss):
        """zero_grad, backward, step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
