"""AGM — Adaptive Gradient Modulation.

Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023 (arXiv 2308.07686); code: github.com/lihong2303/AGM_ICCV2023 (indexed
as lihong2303/AGM).

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

For M = 2 this is the authors' ``0.5·(f(N) − f(N∖{i}) + f({i}))``; for M = 3 it is their
UR-Funny ``(f(N) − f(N∖{i}) + f({i}))/3 + (f({i,j}) − f({j}) + f({i,k}) − f({k}))/6``. Modality i's
own prediction (and its reported accuracy) is softmax(o_i).

Adaptive modulation. On each mini-batch, with the mono-modal scores

    s_i = (1/B) Σ_b −log max(softmax(o_i)_b[y_b], 1e-8)          (detached),

their running mean over every training iteration so far s̃_i (s̃_i = 0 before the first, updated
AFTER the coefficients are computed: s̃_i ← s̃_i (t−1)/t + s_i/t at iteration t), and
s̄ = mean_i s_i, s̃̄ = mean_i s̃_i:

    r_i  = exp( M/(M−1) · (s̄ − s_i) )           the modality's current relative strength
    r̃_i  = exp( M/(M−1) · (s̃̄ − s̃_i) )          its "optimal" (running-average) strength
    c_i  = exp( α · min(r̃_i − r_i, cap) )       (cap = 10 in the authors' 2-modality code)

(M = 2 gives the authors' r_a = exp(s_v − s_a); M = 3 their UR-Funny rule.) The loss is the
cross-entropy of Σ_i o_i = f(N), but the gradient that flows back through o_i is multiplied by c_i
(the authors' backward hooks on each ``Modality_out``):

    L = CE(Σ_i o_i, y),     ∂L/∂θ = Σ_i c_i · (∂L/∂o_i)(∂o_i/∂θ).

A modality stronger than its running average (r_i > r̃_i) gets c_i < 1, a weaker one c_i > 1.
All coalition outputs carry gradients, as in the released code. Afterwards, as in the released
code, if any entry of the last fusion Linear's weight gradient lies outside [−grad_clip, grad_clip],
the gradient norm of all parameters is clipped to grad_clip (1.0 for CREMA-D, 5.0 for UR-Funny).

Details of this implementation: the present modalities' features are computed once per step (in
the loop's train mode) and reused in every coalition; the zero-input features φ_m(0) are computed
with modality m's encoder in eval mode (BatchNorm running statistics, no dropout), as the authors'
padded passes are. The fusion head runs 2^M times per step.

Defaults from the released code: α = 1.0 (``--alpha``), modulation from the first epoch on
(``--modulation_starts 0``; its ``--modulation_ends 20`` exceeds its default 10 epochs, so the
default run modulates every epoch — here ``modulation_ends=None``), cap = 10, grad_clip = 1.0.

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
from .params import Param, number
from .window import WINDOW_PARAMS, check_window, in_window

MAX_MODALITIES = 8


def absent_features(model, xs):
    """{m: φ_m(0) (1, d)}: each encoder on one all-zero sample, in eval mode."""
    out = {}
    for m in model.modalities:
        with eval_mode(model.encoders[m]):
            out[m] = model.encoders[m](torch.zeros_like(xs[m][:1]))
    return out


def coalition_outputs(model, xs):
    """{frozenset(S): f(S) (B, K)} for every subset S of the modalities of a feature-fusion
    ``SharedHeadModel``: present modalities with their features, the others with φ_m(0)."""
    present, absent = model.features(xs), absent_features(model, xs)
    mods, batch = model.modalities, next(iter(present.values())).shape[0]
    outputs = {}
    for size in range(len(mods) + 1):
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
    """c_i = exp(α·min(r̃_i − r_i, cap)) with r_i = exp(M/(M−1)(s̄ − s_i)) and r̃ from ``running``."""
    mods = list(scores)
    M = len(mods)
    k = M / (M - 1)
    s_bar = sum(scores.values()) / M
    t_bar = sum(running[m] for m in mods) / M
    coeffs = {}
    for m in mods:
        r = torch.tensor(k * (s_bar - scores[m]), dtype=torch.float64).exp()
        r_opt = torch.tensor(k * (t_bar - running[m]), dtype=torch.float64).exp()
        coeffs[m] = float(torch.exp(alpha * torch.clamp(r_opt - r, max=cap)))
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
    params = {"alpha": Param(1.0, number(at_least=0), "modulation strength α in c_i = exp(α·min(r̃_i − r_i, cap))"),
              "cap": Param(10.0, number(), "upper bound of r̃_i − r_i"),
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

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch, step):
        xs, y = batch
        mods = self.model.modalities
        outputs = coalition_outputs(self.model, xs)
        resp = shapley_responses(outputs, mods)
        scores = {m: agm_score(resp[m], y) for m in mods}
        coeffs = agm_coefficients(scores, self.running, self.alpha, self.cap)
        self.iteration += 1
        t = self.iteration
        for m in mods:
            self.running[m] = self.running[m] * (t - 1) / t + scores[m] / t
        modulating = in_window(step.epoch, self.modulation_starts, self.modulation_ends)
        used = coeffs if modulating else {m: 1.0 for m in mods}
        out = sum(scale_grad(resp[m], used[m]) for m in mods)
        loss = F.cross_entropy(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
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
