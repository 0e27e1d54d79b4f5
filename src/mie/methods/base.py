"""The method interface: everything that is special about a training method, and nothing else.

The training loop (``mie.train``) owns epochs, evaluation, checkpoints, logging and devices, and
calls a method through these hooks only:

    model = method.build_model(spec)             # which modules exist
    method.setup(model, ctx)                     # optimizers, state
    for epoch in range(method.num_epochs(E)):    # E = epoch budget per modality
        method.start_epoch(epoch)
        for xs, y in train batches: logs = method.train_step(xs, y)   # passes, gradient edits, steps
        logs = method.end_epoch(epoch)           # state between epochs/stages (e.g. MIE's T)
        fused, per_modality = method.predict(xs) on validation batches

The checkpoint chosen on validation restores the model's weights and buffers only, so anything
``predict`` needs (e.g. running means used at inference) belongs in the model as buffers;
``state_dict`` is for what training needs to resume (optimizers, projection matrices, counters).
"""
import inspect

import torch
import torch.nn.functional as F

from ..errors import MieInputError
from ..models import LateFusionModel, fuse


def require_two_modalities(model, name):
    """Refuse a model with a single modality for a method that balances several."""
    if len(model.modalities) < 2:
        raise MieInputError(f"method '{name}' balances two or more modalities, but the data has only "
                            f"{', '.join(model.modalities)}; use method 'unimodal' for one modality")


class Method:
    """Base class. Subclasses set ``name`` and override the hooks they need.

    Hyper-parameters are the keyword arguments of ``__init__``; they are what a config's
    ``method:`` section and ``create_method(name, **params)`` accept.
    """

    name = "base"

    def __init__(self, fusion="average"):
        self.fusion = fusion
        self.model = None
        self.ctx = None

    @classmethod
    def params(cls):
        """Hyper-parameter names and defaults, read from ``__init__``'s signature."""
        sig = inspect.signature(cls.__init__)
        return {k: p.default for k, p in sig.parameters.items()
                if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    @classmethod
    def unused_params(cls, fixed):
        """Parameters that have no effect once ``fixed`` settings are applied (hidden from users)."""
        return set()

    def hparams(self):
        return {k: getattr(self, k) for k in self.params()}

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

    # ---- training ---------------------------------------------------------------------
    def schedule_epoch(self, epoch):
        """The epoch count the learning-rate schedule (train.lr_step) reads at loop epoch ``epoch``."""
        return epoch

    def start_epoch(self, epoch):
        """Called before each epoch's first step."""

    def train_step(self, xs, y):
        """One optimisation step on a batch ``xs`` ({m: (B, ...)}), ``y`` (B,). Returns scalars to log."""
        raise NotImplementedError

    def end_epoch(self, epoch):
        """Called after each epoch's last step. Returns scalars to log in history.csv."""
        return {}

    # ---- inference --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, xs):
        """Return (fused probabilities (B, K), {m: modality m's own probabilities (B, K)})."""
        logits = self.model(xs)
        per_modality = {m: F.softmax(z.float(), dim=-1) for m, z in logits.items()}
        return self.fuse(logits, per_modality), per_modality

    def fuse(self, logits, probs):
        """Fused probabilities (B, K) from per-modality ``logits`` and ``probs`` ({m: (B, K)})."""
        return fuse(torch.stack(list(probs.values())), self.fusion)

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        """Everything besides the model's weights needed to resume (optimizers, matrices)."""
        return {}

    def load_state_dict(self, state):
        pass
