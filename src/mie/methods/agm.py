"""AGM — Adaptive Gradient Modulation.

Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023 (arXiv 2308.07686); code: github.com/lihong2303/AGM_ICCV2023 (indexed
as lihong2303/AGM; line numbers below are that snapshot's: ``model/CREMAD_net.py``,
``run/CREMAD_main.py``, ``model/URFunny_net.py``, ``run/URFunny_main.py``, ``utils/config.py``).

Model. Encoders φ_m (output size d) feed ONE fusion head g on their concatenation; the fused
prediction is f(x) = g([φ_1(x_1); …; φ_M(x_M)]) (logits, B × K) — ``joint``'s "concat" model
(``mie.models.SharedHeadModel``), as the authors' late-fusion AGM uses a concat fusion. "Removing" modality m means
feeding it an all-zero input (the authors' ``pad_*``): for a coalition S ⊆ N = {1..M} of present
modalities,

    f(S) = g([u_1; …; u_M]),   u_m = φ_m(x_m) if m ∈ S,   u_m = φ_m(0) otherwise.

Mono-modal responses (Shapley contributions). With the Shapley value of modality i,

    φ_i = Σ_{S ⊆ N∖{i}}  |S|! (M − |S| − 1)! / M!  · ( f(S ∪ {i}) − f(S) ),

the response of modality i is its Shapley value plus an equal share of the empty coalition,

    o_i = φ_i + f(∅)/M,        so that  Σ_i o_i = f(N)  (efficiency).

For M = 2 this is the authors' ``0.5·(f(N) − f(N∖{i}) + f({i}))`` (``CREMAD_net.py`` lines 7-17);
for M = 3 it is their UR-Funny ``(f(N) − f(N∖{i}) + f({i}))/3 + (f({i,j}) − f({j}) + f({i,k}) −
f({k}))/6`` (``URFunny_net.py`` lines 6-31). Modality i's own prediction (and its reported
accuracy) is softmax(o_i).

How the coalitions are evaluated (``CREMAD_net.py`` ``GradMod.forward``, lines 57-72): f(N) is the
model as it is (in a training step: train mode, so BatchNorm uses and updates batch statistics);
then the WHOLE network, every encoder and the head, is put in eval mode and every other coalition
S ≠ N is evaluated with it: present modalities' features φ_m(x_m) AND the zero-input features
φ_m(0) in eval mode (running statistics, no dropout), the head in eval mode; the modules' own
modes are restored afterwards. No pass is under ``no_grad``: gradients flow through every
coalition output into every parameter. Here each modality's eval-mode features φ_m(x_m) and φ_m(0)
are computed once per step and reused in every coalition that needs them (in eval mode they are
the same as the authors' separate passes), so the encoders run three times per step (train, eval,
zero input) and the head 2^M times; f(∅) is computed but, as in the authors' code, cancels out
of every o_i's gradient.

Adaptive modulation. On each mini-batch, with the mono-modal scores

    s_i = (1/B) Σ_b −log max(softmax(o_i)_b[y_b], 1e-8)     (detached; CREMAD_main.py lines 130-143;
                                                              UR-Funny has no 1e-8 floor),

their running mean over every training iteration so far s̃_i (s̃_i = 0 before the first, updated
AFTER the coefficients are computed: s̃_i ← s̃_i (t−1)/t + s_i/t at iteration t), and
s̄ = mean_i s_i, s̃̄ = mean_i s̃_i:

    r_i  = exp( M/(M−1) · (s̄ − s_i) )           the modality's current relative strength
    r̃_i  = exp( M/(M−1) · (s̃̄ − s̃_i) )          its "optimal" (running-average) strength
    c_i  = exp( α · min(r̃_i − r_i, cap) )

(M/(M−1)·(s̄ − s_i) is the mean of the other modalities' scores minus s_i. M = 2 gives the authors'
r_a = exp(s_v − s_a), ``CREMAD_main.py`` lines 145-152; M = 3 their UR-Funny rule,
``URFunny_main.py`` lines 117-134. The running scores use the global 1-based iteration t,
``CREMAD_main.py`` line 48, and are updated after the coefficients, lines 154-155.) The loss is
the cross-entropy of Σ_i o_i = f(N), but the gradient that flows back through o_i is multiplied by
c_i (the authors' backward hooks on each ``Modality_out``, ``CREMAD_net.py`` lines 42-55):

    L = CE(Σ_i o_i, y),     ∂L/∂θ = Σ_i c_i · (∂L/∂o_i)(∂o_i/∂θ).

A modality stronger than its running average (r_i > r̃_i) gets c_i < 1, a weaker one c_i > 1.
Afterwards, as in the released code (``CREMAD_main.py`` lines 233-238, in every step, inside the
modulation window or not), if any entry of the last head Linear's weight gradient (their fusion
``fc_out``) lies outside [−grad_clip, grad_clip], the gradient norm of all parameters is clipped
to grad_clip.

Outside the modulation window the step is the same with every c_i = 1 (the scores and their
running means are still tracked, as the released code does). Not reproduced: the released hooks
keep the LAST coefficients set inside the window when the window ends (``update_scale`` is only
called inside it, ``CREMAD_main.py`` line 159), a stale scaling we take for a bug.

Defaults, from the released CREMA-D code (the benchmark ``mie`` shares with the paper): α = 1.0
(``--alpha``, ``config.py`` line 76; the README's example command uses 2.5 on AV-MNIST), cap = 10
(``CREMAD_main.py`` line 151; UR-Funny uses 7, ``URFunny_main.py`` line 128; AVE, AV-MNIST and
MOSEI have no cap: ``cap=None``), grad_clip = 1.0 (``CREMAD_main.py`` line 237; UR-Funny 5.0,
``URFunny_main.py`` line 206; AVE none: ``grad_clip=None``), modulation from the first epoch on,
to the end (``--modulation_starts 0``, ``--modulation_ends 20`` with the default 10 epochs,
``config.py`` lines 70-75: every epoch modulates; here ``modulation_ends=None``). The released
window is ``modulation_starts <= epoch <= modulation_ends`` over 1-based epochs
(``CREMAD_main.py`` line 159): their ``modulation_ends`` is ours, their ``modulation_starts`` s ≥ 1
is our s − 1.

Inference (``fusion``): "model" (default) predicts softmax(f(N)), the fused output the model is
trained on; "average" and "weight" fuse the per-modality predictions softmax(o_i)
(``mie.models.fusion``).

Three or more modalities: the authors' own UR-Funny code (text, audio, video) uses the Shapley
responses over all 2^M coalitions and the M/(M−1)-scaled ratios above; ``mie`` applies that rule to
any 2 ≤ M ≤ 8 (2^M head evaluations per step make larger M impractical).
"""
from itertools import combinations
from math import factorial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MieInputError
from ..models import FUSIONS, SharedHeadModel, eval_mode
from .base import SingleOptimizerMethod, fusion_param
from .params import Param, Space, number
from .window import WINDOW_PARAMS, check_window, in_window

MAX_MODALITIES = 8


def coalition_outputs(model, xs):
    """{frozenset(S): f(S) (B, K)} for every subset S of the modalities of a feature-fusion
    ``SharedHeadModel``: present modalities with their features, the others with φ_m(0).

    f(N) runs the model in its current mode; every other coalition runs with the whole model in eval
    mode (each module's own mode restored afterwards), as the authors' ``GradMod.forward`` does.
    Nothing is detached: gradients reach the parameters through every coalition."""
    mods = model.modalities
    training = any(module.training for module in model.modules())
    present = model.features(xs)
    outputs = {frozenset(mods): model.head(model.combine(present))}
    with eval_mode(*model.modules()):
        if training:                         # the present modalities again, now in eval mode
            present = model.features(xs)
        absent = {m: model.encoders[m](torch.zeros_like(xs[m][:1])) for m in mods}
        batch = next(iter(present.values())).shape[0]
        for size in range(len(mods)):
            for S in combinations(mods, size):
                u = {m: present[m] if m in S else absent[m].expand(batch, -1) for m in mods}
                outputs[frozenset(S)] = model.head(model.combine(u))
    return outputs


def shapley_responses(outputs, modalities):
    """o_i = φ_i + f(∅)/M for each modality from coalition outputs {frozenset(S): f(S)}."""
    M = len(modalities)
    empty = outputs[frozenset()]
    resp = {}
    for i in modalities:
        others = [m for m in modalities if m != i]
        total = empty / M
        for size in range(M):
            w = factorial(size) * factorial(M - size - 1) / factorial(M)
            for S in combinations(others, size):
                S = frozenset(S)
                total = total + w * (outputs[S | {i}] - outputs[S])
        resp[i] = total
    return resp


def agm_score(logits, y, floor=1e-8):
    """s = mean_b −log max(softmax(logits)_b[y_b], floor)  (a float)."""
    p = F.softmax(logits.detach().float(), dim=-1).gather(1, y.view(-1, 1)).squeeze(1)
    return float((-p.clamp_min(floor).log()).mean())


def agm_coefficients(scores, running, alpha=1.0, cap=10.0):
    """c_i = exp(α·min(r̃_i − r_i, cap)) with r_i = exp(M/(M−1)(s̄ − s_i)) and r̃ from ``running``
    (``cap=None``: no bound)."""
    mods = list(scores)
    M = len(mods)
    k = M / (M - 1)
    s_bar = sum(scores.values()) / M
    t_bar = sum(running[m] for m in mods) / M
    coeffs = {}
    for m in mods:
        r = torch.tensor(k * (s_bar - scores[m]), dtype=torch.float64).exp()
        r_opt = torch.tensor(k * (t_bar - running[m]), dtype=torch.float64).exp()
        gap = r_opt - r if cap is None else torch.clamp(r_opt - r, max=cap)
        coeffs[m] = float(torch.exp(alpha * gap))
    return coeffs


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x, scale):
    return _ScaleGrad.apply(x, float(scale))


class AGM(SingleOptimizerMethod):
    name = "agm"
    params = {"alpha": Param(1.0, number(at_least=0), "modulation strength α in c_i = exp(α·min(r̃_i − r_i, cap))",
                             Space("log", 0.1, 10.0)),  # ours: a decade each side; holds the README's 2.5 (AV-MNIST)
              "cap": Param(10.0, number(optional=True), "upper bound of r̃_i − r_i (None: no bound)"),
              "grad_clip": Param(1.0, number(at_least=0, optional=True),
                                 "clip the gradient norm to this when the fusion layer's gradient leaves "
                                 "[−grad_clip, grad_clip] (0 or None: off)"),
              **WINDOW_PARAMS,
              "fusion": fusion_param("model", FUSIONS)}

    @classmethod
    def check_params(cls, values):
        check_window(values)

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        """Joint's concatenation model: φ_m per modality, one head on [φ_1; …; φ_M]."""
        return SharedHeadModel.build(spec, "concat")

    def setup(self, model, ctx):
        if not isinstance(model, SharedHeadModel):
            raise MieInputError(f"AGM trains a feature-fusion SharedHeadModel; got {type(model).__name__}")
        M = len(model.modalities)
        if M < 2:
            raise MieInputError(f"AGM balances modalities and needs at least 2, got {model.modalities}")
        if M > MAX_MODALITIES:
            raise MieInputError(f"AGM evaluates all 2^M coalitions of modalities per step; M={M} would need "
                                f"{2 ** M} fusion-head passes. Use at most {MAX_MODALITIES} modalities.")
        super().setup(model, ctx)
        self.running = {m: 0.0 for m in model.modalities}
        self.iteration = 0

    def notices(self):
        epochs = self.ctx.epochs_per_modality
        if self.modulation_starts >= epochs:
            return [f"modulation_starts={self.modulation_starts} >= the run's {epochs} epochs: no step is modulated; "
                    f"this run is joint training with AGM's gradient clipping"]
        return []

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch, step):
        xs, y = batch
        mods = self.model.modalities
        outputs = coalition_outputs(self.model, xs)              # CREMAD_net.py GradMod.forward
        resp = shapley_responses(outputs, mods)
        scores = {m: agm_score(resp[m], y) for m in mods}         # CREMAD_main.py lines 130-143
        coeffs = agm_coefficients(scores, self.running, self.alpha, self.cap)   # lines 145-152
        self.iteration += 1                                      # running scores after: lines 154-155
        t = self.iteration
        for m in mods:
            self.running[m] = self.running[m] * (t - 1) / t + scores[m] / t
        modulating = in_window(step.epoch, self.modulation_starts, self.modulation_ends)
        used = coeffs if modulating else {m: 1.0 for m in mods}   # c = 1 outside (no stale hooks)
        out = sum(scale_grad(resp[m], used[m]) for m in mods)
        loss = F.cross_entropy(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:                                       # CREMAD_main.py lines 233-238
            g = self.model.head.linears[-1].weight.grad
            if g is not None and (g.max() > self.grad_clip or g.min() < -self.grad_clip):
                nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.grad_clip)
        self.optimizer.step()
        logs = {"loss": loss.detach()}
        logs.update({f"agm_coeff_{m}": used[m] for m in mods})
        logs.update({f"agm_score_{m}": scores[m] for m in mods})
        return logs

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        """({m: the Shapley response o_m}, f(N))."""
        outputs = coalition_outputs(self.model, xs)
        return shapley_responses(outputs, self.model.modalities), outputs[frozenset(self.model.modalities)]

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "running": dict(self.running), "iteration": self.iteration}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.running = dict(state["running"])
        self.iteration = int(state["iteration"])
