"""Greedy — balanced multi-modal learning guided by the conditional learning speed.

Wu, Jastrzębski, Cho, Geras, "Characterizing and Overcoming the Greedy Nature of Learning in
Multi-modal Deep Neural Networks", ICML 2022 (PMLR 162, arXiv 2202.05306); code:
github.com/nyukat/greedy_multimodal_learning (``src/model.py``, ``src/balanced_mmtm.py``,
``src/callbacks.py: Bias_Mitigation_Strong``, ``configs/training_guided.gin``). Re-implemented in
GeWu-Lab/BalanceBenchmark (``balancemm/trainer/Greedy_trainer.py``).

Model (``GreedyModel``). One branch per modality k: encoder φ_k (output size d) and head h_k. The
branches are connected by a cross-modal fusion layer in the style of MMTM (Joze et al., CVPR 2020),
as the paper's multi-branch DNN is. With the branch features u_k = φ_k(x_k) (B × d):

    S    = [u_1; …; u_M]                              squeeze: concatenation (B × M·d)
    Z    = ReLU(W_s S + b_s)                          W_s: (2·M·d/ratio) × M·d, shared
    E_k  = σ(W_k Z + b_k)                             excitation of branch k (B × d)
    ŷ_k  = h_k(u_k ⊙ E_k)                             branch k's logits
    ŷ    = (1/M) Σ_k ŷ_k                              the model's prediction (fused logits)
    L    = Σ_k CE(ŷ_k, y)                             the released code's ``blend_loss``

Uni-modal DNN derived from the model (``GreedyModel.cut_logits``): f'_k, the branch k with every
other modality's squeeze input replaced by its mean over the training set, ū_j = mean_i φ_j(x_j,i)
(eval mode; the released ``eval.py`` with ``mmtm_off``/``average_squeezemaps``):

    ŷ'_k = h_k(u_k ⊙ σ(W_k ReLU(W_s [ū_1; …; u_k; …; ū_M] + b_s) + b_k))

Conditional utilization rate (the paper's diagnostic, measured here after every epoch; A =
accuracy): the gain in accuracy when the model has access to the other modalities in addition to
modality k,

    u(others | k) = (A(ŷ) − A(ŷ'_k)) / A(ŷ),        d_util = u(m_1|m_0) − u(m_0|m_1)  (M = 2).

It is read from the loop's own metrics, no extra pass: with ``utilization="val"`` (default) the
validation metrics of the epoch, with "train" ``ctx.evaluate("train")``; A(ŷ) is their fused
accuracy and A(ŷ'_k) modality k's accuracy (the per-modality prediction is ŷ'_k, see Inference).
Under ``fusion="average"`` or "weight" A(ŷ) is the accuracy of that fused prediction instead.

Conditional learning speed (the paper's proxy for u, computed from the gradients of every normal
step, as ``Bias_Mitigation_Strong.compute_BDR``). For a group of parameter tensors θ,
μ(θ; t) = Σ‖∇θ L_t‖² / Σ‖θ_t‖² (sums over the group's tensors, before the step). For branch k,
the "main" group is θ_k = φ_k ∪ h_k and the "bypass" group is θ_{→k} = {W_s, b_s, W_k, b_k}, the
fusion-layer parameters that carry the other modalities into branch k; with the accumulations
over all normal steps so far, M_main_k = Σ_{i≤t} μ(θ_k; i), M_bypass_k = Σ_{i≤t} μ(θ_{→k}; i),

    s(others | k; t) = log10( M_bypass_k / M_main_k )
    d_speed = s(m_1 | m_0) − s(m_0 | m_1)                     (M = 2; the code's BDR_0 − BDR_1)

A large s(m_1|m_0) means branch 0 learns from m_1 faster than from its own modality m_0: m_0 is the
slower-to-learn modality.

Balanced multi-modal learning (the paper's Algorithm 1, as the released callback
``Bias_Mitigation_Strong`` and model ``MMTM_mitigate`` run it). Steps alternate between normal
steps and re-balancing steps; every training forward first folds the batch-mean excitations into
their running means (``balanced_mmtm.py`` lines 113-116, before line 141/150 uses them):

    every step:   Ē_k ← (Ē_k·n + mean_batch E_k)/(n + 1) for every k,  n ← n + 1
    normal step:  L.backward(); update M_main, M_bypass; d = d_speed;
                  if epoch ≥ warmup_epochs and |d| > α:
                      k ← m_0 if d > 0 else m_1     (the slower modality)
                      the next Q (``window``) steps are re-balancing steps for k
                  optimizer step on every parameter
    re-balancing step for k (``rebalance="mean_excitation"``, the default):
                  ŷ_k = h_k(u_k ⊙ Ē_k)  (Ē_k detached: branch k no longer hears the others),
                  ŷ_j = h_j(u_j ⊙ E_j) for j ≠ k, L = Σ_j CE(ŷ_j, y) as in a normal step, and the
                  optimizer steps every parameter (W_k gets no gradient this step, so the optimizer
                  skips it; the released ``zero_grad`` leaves it a zero gradient, the same with
                  its SGD without momentum or weight decay, ``configs/training_guided.gin`` lines 8-9).

M_main and M_bypass are updated in normal steps only, warm-up steps included; a re-balancing step
only counts down its window (``callbacks.py`` lines 240-263): the trigger is checked after the
backward of a normal step, so the Q steps after it re-balance and the step after those is normal.

``rebalance="branch_only"`` (ours, opt-in): a re-balancing step for k computes only
ŷ''_k = h_k(φ_k(x_k) ⊙ Ē_k), L'' = CE(ŷ''_k, y), and updates θ_k = φ_k ∪ h_k alone; Ē is then
fed by normal steps only. This was ``mie``'s default before it was checked against the released
code. M_main and M_bypass are cumulative and move only in normal steps, so |d| > α usually still
holds when a window ends and the trigger fires again at once; this form then updates the other
branches and the fusion layer in only one step of every Q + 1.

Paper versus code: the text of the paper's Algorithm 1 was not at hand when this file was checked
against the released code, so whether its prose describes the branch-only step is unverified; the
default follows the released code, whose re-balancing step keeps the summed loss and steps every
parameter (as GeWu-Lab/BalanceBenchmark's ``Greedy_trainer.py`` also does).

What is kept and what is adapted:
  * kept: the branch-per-modality model with averaged branch logits and the summed branch
    losses; the MMTM squeeze–excitation fusion (sigmoid excitation, shared squeeze layer, width
    2·(Σ dims)/ratio, ratio = 4); μ as ratio of summed squared norms per group; the cumulative
    sums and log10; the trigger |d| > α after the backward of a normal step, Q following
    re-balancing steps; the slower modality's excitation replaced by its running mean, the
    running mean updated in every training forward before it is used.
  * adapted: the paper inserts MMTM after ResNet stages 2, 3 and 4; ``mie``'s encoders are black
    boxes, so ONE fusion layer acts on the encoder outputs (where the paper's last MMTM sits,
    before the heads; for vector features the squeeze's spatial mean is the identity). The
    bypass group is that one layer.
  * released-code bugs not reproduced: (1) the running mean of the second modality's excitation
    is fed with the FIRST modality's excitation (``balanced_mmtm.py`` line 114:
    ``running_avg_weight_skeleton`` ← ``vis_out``; it is also sized ``dim_visual``, line 31), so a
    re-balancing step for m_1 scaled m_1's features by m_0's mean excitation; here Ē_k is the mean
    of E_k. (2) The running means there also absorb every validation and TEST forward (the
    module updates them in any forward, ``framework.py`` lines 330-332 run val and test after
    each epoch), which would let test data steer training; here only training forwards count.
  * u is measured on validation every epoch (the paper measures it once, on test, after training).
  * the per-modality prediction reported by ``mie`` (``val_acc_<m>``) is ŷ'_k, the uni-modal DNN.

Inference (``fusion``): "model" (default) predicts softmax(ŷ), the model's own prediction;
"average" and "weight" fuse the BRANCH predictions softmax(ŷ_k) (``mie.models.fusion``). Modality
k's own prediction is softmax(ŷ'_k) under every rule.

Defaults and their sources (nyukat/greedy_multimodal_learning): α = 0.01
(``Bias_Mitigation_Strong.epsilon``, ``configs/training_guided.gin`` line 14; BalanceBenchmark
uses 0.001), Q = 5 (``curation_windowsize``, line 15; BalanceBenchmark ``window_size: 5``),
warmup_epochs = 1 (``starting_epoch=2``, line 16, compared with the released loop's 1-based
epochs, ``framework.py`` line 293 and ``callbacks.py`` line 266: re-balancing may start in the
second epoch; BalanceBenchmark starts at once), ratio = 4 (``MMTM(128, 128, 4)``, ``model.py``
line 58), rebalance = "mean_excitation" (``balanced_mmtm.py`` lines 128-152 with
``callbacks.py`` lines 240-263).

Three or more modalities. Every quantity above is per branch: u(others|k) compares f with the
branch k cut from all the others, s(others|k) the bypass of branch k with its main path. ``mie``
uses, for any M ≥ 2, the rule: re-balance the modality k = argmax_k s(others|k) when the spread
max_k s − min_k s exceeds α. For M = 2 the spread is |d_speed| and the argmax is m_0 exactly when
d_speed > 0, so this is the paper's rule. The logged ``greedy_d_speed`` is the signed d_speed for
M = 2 and the spread for M ≥ 3; ``greedy_d_util`` likewise.

Logged per step (averaged per epoch): ``loss`` (normal steps), ``greedy_rebalance_loss``,
``greedy_rebalancing`` (fraction of re-balancing steps), ``greedy_rebalance_<m>`` (fraction of
steps re-balancing m), ``greedy_d_speed`` (normal steps). After each epoch: ``greedy_speed_<o>_given_<m>``
(s(o|m), o = the other modality, or "others" for M ≥ 3), ``greedy_util_<o>_given_<m>``,
``greedy_d_util``; the accuracies behind u are the run's ``val_accuracy`` (A(ŷ)) and
``val_acc_<m>`` (A(ŷ'_m)).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models import FUSIONS, LateFusionModel, eval_mode, fused_prediction
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, Space, number, one_of


class GreedyModel(LateFusionModel):
    """Branches φ_k → (MMTM excitation) → h_k; ``forward(xs)`` → {k: ŷ_k (B, K)};
    ``forward_modality(k, x_k)`` → ŷ'_k, the uni-modal DNN.

    Buffers (saved with the model, so checkpoints and ``mie eval`` carry them): ``excite_mean``
    (M, d): Ē_k, ``excite_count``: training steps averaged into it, ``squeeze_mean`` (M, d): ū_k.
    """

    def __init__(self, encoders, heads, dim, ratio=4):
        super().__init__(encoders, heads)
        M = len(encoders)
        hidden = max(1, int(2 * M * dim / ratio))
        self.squeeze = nn.Linear(M * dim, hidden)
        self.excite = nn.ModuleDict({m: nn.Linear(hidden, dim) for m in encoders})
        self.register_buffer("excite_mean", torch.zeros(M, dim))
        self.register_buffer("excite_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("squeeze_mean", torch.zeros(M, dim))

    def index(self, m):
        return self.modalities.index(m)

    def bypass_parameters(self, m):
        """θ_{→m}: the shared squeeze layer and branch m's excitation layer (θ_m, the branch's
        "main" path, is ``modality_parameters(m)``: φ_m and h_m)."""
        return list(self.squeeze.parameters()) + list(self.excite[m].parameters())

    # ---- forward pieces -------------------------------------------------------------------
    def excitations(self, feats):
        """{m: E_m = σ(W_m ReLU(W_s [u_1; …; u_M] + b_s) + b_m)} (B, d)."""
        z = F.relu(self.squeeze(torch.cat([feats[m] for m in self.modalities], dim=-1)))
        return {m: torch.sigmoid(self.excite[m](z)) for m in self.modalities}

    def branch_logits(self, feats, excitations):
        return {m: self.heads[m](feats[m] * excitations[m]) for m in self.modalities}

    def forward(self, xs):
        feats = self.features(xs)
        return self.branch_logits(feats, self.excitations(feats))

    def cut_logits(self, feats, m):
        """ŷ'_m: branch m with every other modality's squeeze input replaced by ū (its mean);
        needs ``feats[m]`` only."""
        u = feats[m]
        squeezed = {v: u if v == m else self.squeeze_mean[self.index(v)].to(u.dtype).expand(u.shape[0], -1)
                    for v in self.modalities}
        return self.heads[m](u * self.excitations(squeezed)[m])

    def forward_modality(self, m, x):
        return self.cut_logits({m: self.encoders[m](x)}, m)

    def with_mean_excitation(self, excitations, m):
        """``excitations`` with E_m replaced by Ē_m (detached, broadcast over the batch)."""
        e = excitations[m]
        return {**excitations, m: self.excite_mean[self.index(m)].to(e.dtype).expand_as(e)}

    def rebalance_logits(self, x, m):
        """ŷ''_m = h_m(φ_m(x_m) ⊙ Ē_m): branch m on its own modality with the running-mean excitation
        (the ``branch_only`` re-balancing step)."""
        u = self.encoders[m](x)
        return self.heads[m](u * self.excite_mean[self.index(m)].to(u.dtype))

    @torch.no_grad()
    def update_excite_mean(self, excitations):
        """Ē ← (Ē·n + mean_batch E)/(n + 1), n ← n + 1."""
        n = self.excite_count.item()
        batch_mean = torch.stack([excitations[m].detach().to(self.excite_mean.dtype).mean(dim=0)
                                  for m in self.modalities])
        self.excite_mean.copy_((self.excite_mean * n + batch_mean) / (n + 1))
        self.excite_count += 1

    @classmethod
    def build(cls, spec, ratio=4):
        return super().build(spec, spec.dim, ratio)


# ---- the paper's quantities, as plain functions ------------------------------------------------
def grad_param_ratio(params):
    """μ(θ) = Σ‖∇θ‖² / Σ‖θ‖² over a group of tensors (float64, summed in order on the device and read
    once; a missing gradient counts as 0)."""
    params = list(params)
    g = w = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
    for p in params:
        w = w + p.detach().double().pow(2).sum()
        if p.grad is not None:
            g = g + p.grad.detach().double().pow(2).sum()
    g, w = torch.stack([g, w]).tolist()
    return g / w if w > 0 else math.nan


def conditional_speeds(m_bypass, m_main):
    """s(others|k) = log10(M_bypass_k / M_main_k) for each modality k ({k: float} → {k: float})."""
    out = {}
    for k in m_main:
        b, a = m_bypass[k], m_main[k]
        out[k] = math.log10(b / a) if a > 0 and b > 0 else math.nan
    return out


def speed_imbalance(speeds):
    """d_speed = s(m_1|m_0) − s(m_0|m_1) for two modalities; max − min for more."""
    vals = list(speeds.values())
    return vals[0] - vals[1] if len(vals) == 2 else max(vals) - min(vals)


def rebalance_target(speeds, alpha):
    """The modality to re-balance, or None: argmax_k s_k if max s − min s > α (M = 2: |d_speed| > α,
    the first modality when d_speed > 0, the second when d_speed < 0)."""
    if any(math.isnan(v) for v in speeds.values()):
        return None
    hi = max(speeds, key=speeds.get)
    lo = min(speeds, key=speeds.get)
    return hi if speeds[hi] - speeds[lo] > alpha else None


def utilization_rates(acc_fused, acc_uni):
    """u(others|k) = (A(ŷ) − A(ŷ'_k)) / A(ŷ) ({k: A(ŷ'_k)} → {k: u}); NaN when A(ŷ) = 0."""
    return {k: (acc_fused - a) / acc_fused if acc_fused > 0 else math.nan for k, a in acc_uni.items()}


class Greedy(SingleOptimizerMethod):
    name = "greedy"
    params = {
        "alpha": Param(0.01, number(at_least=0), "speed-imbalance threshold α",
                       Space("log", 0.001, 0.1)),   # a decade each side; holds BalanceBenchmark's 0.001
        "window": Param(5, number(at_least=0, integer=True), "re-balancing steps Q per trigger",
                        Space("int", 1, 10)),       # ours
        "warmup_epochs": Param(1, number(at_least=0, integer=True), "loop epochs before re-balancing may start"),
        "ratio": Param(4, number(above=0), "MMTM squeeze reduction ratio"),
        "rebalance": Param("mean_excitation", one_of("mean_excitation", "branch_only"),
                           "re-balancing step: mean_excitation (released code: the slower branch's excitation "
                           "replaced by its running mean, summed loss, every parameter steps) | branch_only "
                           "(ours: only the slower branch, on its own loss)"),
        "utilization": Param("val", one_of("val", "train", None),
                             "split the utilization rate u is measured on (None: not measured)"),
        "fusion": fusion_param("model", tuple(r for r in FUSIONS if r != "fitted")),   # branch predictions: no fit
    }

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        return GreedyModel.build(spec, self.ratio)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        super().setup(model, ctx)
        self.m_main = {m: 0.0 for m in model.modalities}
        self.m_bypass = {m: 0.0 for m in model.modalities}
        self.rebalance_left = 0
        self.rebalance_modality = None

    def notices(self):
        epochs = self.ctx.epochs_per_modality
        if self.window == 0:
            return ["window=0: no re-balancing step ever runs; this run is the MMTM model trained jointly"]
        if self.warmup_epochs >= epochs:
            return [f"warmup_epochs={self.warmup_epochs} >= the run's {epochs} epochs: re-balancing never starts; "
                    f"this run is the MMTM model trained jointly"]
        return []

    def _other(self, m):
        mods = self.model.modalities
        return [v for v in mods if v != m][0] if len(mods) == 2 else "others"

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch, step):
        xs, y = batch
        mods = self.model.modalities
        if self.rebalance_left > 0:
            if self.rebalance == "branch_only":
                return self._branch_only_step(self.rebalance_modality, xs, y)
            return self._rebalance_step(self.rebalance_modality, xs, y)
        feats = self.model.features(xs)
        excitations = self.model.excitations(feats)
        self.model.update_excite_mean(excitations)
        logits = self.model.branch_logits(feats, excitations)
        loss = sum(F.cross_entropy(logits[m], y) for m in mods)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        speeds = self.accumulate_speeds()
        active = step.epoch >= self.warmup_epochs and self.window > 0
        target = rebalance_target(speeds, self.alpha) if active else None
        if target is not None:
            self.rebalance_modality, self.rebalance_left = target, self.window
        self.optimizer.step()
        logs = {"loss": loss.detach(), "greedy_rebalancing": 0.0, "greedy_d_speed": speed_imbalance(speeds)}
        logs.update({f"greedy_rebalance_{m}": 0.0 for m in mods})
        return logs

    def _rebalance_step(self, k, xs, y):
        """The released re-balancing step: Ē updated with this batch, then E_k ← Ē_k, L = Σ_j CE(ŷ_j, y),
        every parameter steps; M_main, M_bypass untouched."""
        model = self.model
        feats = model.features(xs)
        excitations = model.excitations(feats)
        model.update_excite_mean(excitations)
        logits = model.branch_logits(feats, model.with_mean_excitation(excitations, k))
        loss = sum(F.cross_entropy(logits[m], y) for m in model.modalities)
        self.minimize(loss)
        self.rebalance_left -= 1
        logs = {"greedy_rebalance_loss": loss.detach(), "greedy_rebalancing": 1.0}
        logs.update({f"greedy_rebalance_{m}": float(m == k) for m in model.modalities})
        return logs

    def _branch_only_step(self, k, xs, y):
        """Ours (opt-in): only branch k, on its own modality with Ē_k, updates θ_k = φ_k ∪ h_k."""
        loss = F.cross_entropy(self.model.rebalance_logits(xs[k], k), y)
        self.minimize(loss)                  # reaches φ_k and h_k only
        self.rebalance_left -= 1
        logs = {"greedy_rebalance_loss": loss.detach(), "greedy_rebalancing": 1.0}
        logs.update({f"greedy_rebalance_{m}": float(m == k) for m in self.model.modalities})
        return logs

    def accumulate_speeds(self):
        """Add μ(θ_k) and μ(θ_{→k}) of the gradients now in the model to M_main, M_bypass; return s."""
        for m in self.model.modalities:
            self.m_main[m] += grad_param_ratio(self.model.modality_parameters(m))
            self.m_bypass[m] += grad_param_ratio(self.model.bypass_parameters(m))
        return self.speeds()

    def speeds(self):
        """{k: s(others|k)} from the accumulations so far."""
        return conditional_speeds(self.m_bypass, self.m_main)

    # ---- between epochs -----------------------------------------------------------------
    def end_epoch(self, epoch):
        self.update_squeeze_mean()
        return {f"greedy_speed_{self._other(m)}_given_{m}": s for m, s in self.speeds().items()}

    @torch.no_grad()
    def update_squeeze_mean(self):
        """ū_k = mean over the training set of φ_k(x_k), the encoders in eval mode."""
        model = self.model
        sums, n = None, 0
        with eval_mode(model):
            for xs, _ in self.ctx.train_batches():
                feats = model.features(xs)
                batch = torch.stack([feats[m].double().sum(dim=0) for m in model.modalities])
                sums = batch if sums is None else sums + batch
                n += next(iter(feats.values())).shape[0]
        if n:
            model.squeeze_mean.copy_((sums / n).to(model.squeeze_mean.dtype))

    def on_validation(self, epoch, metrics):
        """u(others|k) from the fused and per-modality (ŷ'_k) accuracies of the chosen split."""
        if self.utilization is None:
            return {}
        if self.utilization == "train":
            metrics = self.ctx.evaluate("train")
        acc_u = {m: metrics["per_modality"][m]["accuracy"] for m in self.model.modalities}
        util = utilization_rates(metrics["accuracy"], acc_u)
        logs = {f"greedy_util_{self._other(m)}_given_{m}": u for m, u in util.items()}
        logs["greedy_d_util"] = speed_imbalance(util)
        return logs

    # ---- inference --------------------------------------------------------------------
    def _outputs(self, xs):
        """({k: ŷ'_k}, {k: ŷ_k})."""
        model = self.model
        feats = model.features(xs)
        branch = model.branch_logits(feats, model.excitations(feats))
        return {m: model.cut_logits(feats, m) for m in model.modalities}, branch

    @staticmethod
    def _mean(branch):
        """ŷ = (1/M) Σ_k ŷ_k, in float32."""
        return torch.stack(list(branch.values())).float().mean(dim=0)

    def logits(self, xs):
        cut, branch = self._outputs(xs)
        return cut, self._mean(branch)

    @torch.no_grad()
    def predict(self, xs):
        """Per modality softmax(ŷ'_k); fused: softmax(ŷ) ("model"), or the branch predictions
        softmax(ŷ_k) fused by "average" / "weight"."""
        cut, branch = self._outputs(xs)
        per_modality = {m: F.softmax(z.float(), dim=-1) for m, z in cut.items()}
        if self.fusion == "model":
            return fused_prediction("model", per_modality, self._mean(branch)), per_modality
        branch_probs = {m: F.softmax(z.float(), dim=-1) for m, z in branch.items()}
        return fused_prediction(self.fusion, branch_probs), per_modality

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "m_main": dict(self.m_main), "m_bypass": dict(self.m_bypass),
                "rebalance_left": self.rebalance_left, "rebalance_modality": self.rebalance_modality}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.m_main = dict(state["m_main"])
        self.m_bypass = dict(state["m_bypass"])
        self.rebalance_left = int(state["rebalance_left"])
        self.rebalance_modality = state["rebalance_modality"]
