"""Late fusion at inference: the one vocabulary of ``fusion`` rules, for every method.

model:    the method's own fused output — what it was trained to predict (softmax of the sum of
          the per-modality logits for joint training and OGM-GE, a fusion head's logits, …); only
          for methods that have one
average:  p = (1/m) Σ_m p_m
weight:   per sample, H_m = −Σ_c p_m,c log p_m,c,  w_m = softmax_m(−H_m),  p = Σ_m w_m p_m
          (MLA, Zhang et al. CVPR'24, eq. 9; computed per sample as the paper states)
log:      p = softmax((1/m) Σ_m log p_m), the normalised geometric mean: a product of experts, the
          way joint training's summed logits combine (at temperature m)
fitted:   p = softmax(Σ_m w_m log p_m), one weight per modality fitted on validation: the maximum a
          posteriori w under Σ_i −log p_{i,y_i} + ½ ‖w − 1/m‖² (a unit Gaussian prior centred on
          ``log``), found by Newton's method (the objective is convex in w). As Σ_m w_m log p_m =
          Σ_m w_m z_m − (a constant per sample), it is a weighted sum of the heads' logits: w_m is
          modality m's weight and inverse temperature at once. Its weights are buffers of the model
          (``FittedFusion``), so a checkpoint carries them.

log p_m is read from the probabilities floored at the smallest normal float (≈ e^−87), so a class
whose probability underflowed to 0 in one head is strongly outvoted, not vetoed.

How features are combined inside a model (concatenation, sum) is the architecture, named
``feature_fusion`` by the methods that offer a choice.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MieInputError

FUSIONS = ("model", "average", "weight", "log", "fitted")
LATE_FUSIONS = ("average", "weight", "log", "fitted")   # the rules that need per-modality predictions only


def entropy_weights(probs):
    """probs (m, B, K) → w (m, B): softmax over modalities of minus each prediction's entropy."""
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    return torch.softmax(-entropy, dim=0)


def log_probabilities(probs):
    """log p, with p floored at the smallest normal number of its dtype: (…) → (…)."""
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def weighted_log_fusion(probs, weights):
    """softmax(Σ_m w_m log p_m): ``probs`` (m, B, K), ``weights`` (m,) → (B, K)."""
    return torch.softmax(torch.einsum("m,mbk->bk", weights.to(probs.dtype), log_probabilities(probs)), dim=-1)


def fuse(probs, rule="average", weights=None):
    """Fuse per-modality probabilities ``probs`` (m, B, K) into (B, K) by a rule of ``LATE_FUSIONS``;
    ``weights`` (m,): the fitted weights, for "fitted"."""
    if rule == "average":
        return probs.mean(dim=0)
    if rule == "weight":
        return (entropy_weights(probs).unsqueeze(-1) * probs).sum(dim=0)
    if rule == "log":
        return torch.softmax(log_probabilities(probs).mean(dim=0), dim=-1)
    if rule == "fitted":
        if weights is None:
            raise MieInputError("fusion 'fitted' needs weights fitted on validation; this method does not fit them")
        return weighted_log_fusion(probs, weights)
    raise MieInputError(f"unknown fusion '{rule}'; expected one of {', '.join(LATE_FUSIONS)}")


def fused_prediction(rule, probs, fused_logits=None, weights=None):
    """(B, K) probabilities by ``rule``: ``probs`` {m: (B, K)}; ``fused_logits`` (B, K) for "model";
    ``weights`` {m: 0-d tensor} (at least the modalities of ``probs``) for "fitted"."""
    if rule == "model":
        if fused_logits is None:
            raise MieInputError("fusion 'model' needs a method with a fused output; use one of "
                                + ", ".join(LATE_FUSIONS))
        return F.softmax(fused_logits.float(), dim=-1)
    w = None if weights is None else torch.stack([weights[m] for m in probs])
    return fuse(torch.stack(list(probs.values())), rule, w)


def log_fusion_objective(weights, log_probs, labels):
    """Σ_i −log softmax(Σ_m w_m log p_m,i)_{y_i} + ½ ‖w − 1/m‖²: ``weights`` (m,), ``log_probs``
    (m, N, K), ``labels`` (N,) → a 0-d tensor (what ``fit_log_weights`` minimises)."""
    logits = torch.einsum("m,mnk->nk", weights, log_probs)
    prior = weights - 1.0 / len(weights)
    return F.cross_entropy(logits, labels, reduction="sum") + 0.5 * (prior * prior).sum()


def fit_log_weights(probs, labels, tol=1e-10, max_steps=100):
    """The weights of the "fitted" rule: ``probs`` (m, N, K), ``labels`` (N,) → w (m,), float64.

    Newton's method from w = 1/m with a backtracking (Armijo) line search, in float64 on the CPU:
    the objective is strictly convex (its Hessian is at least the identity), so this reaches its one
    minimum, deterministically; it stops when every gradient entry is below ``tol``.
    """
    log_probs = log_probabilities(probs.detach().double().cpu())
    labels = labels.detach().long().cpu()
    objective = lambda w: log_fusion_objective(w, log_probs, labels)     # noqa: E731
    w = torch.full((len(log_probs),), 1.0 / len(log_probs), dtype=torch.float64)
    for _ in range(max_steps):
        grad = torch.autograd.functional.jacobian(objective, w)
        if grad.abs().max() < tol:
            break
        step = torch.linalg.solve(torch.autograd.functional.hessian(objective, w), grad)
        value, t = objective(w), 1.0
        while objective(w - t * step) > value - 1e-4 * t * (grad @ step) and t > 1e-12:
            t /= 2
        w = w - t * step
    return w


class FittedFusion(nn.Module):
    """The "fitted" rule's weights w (m,), one per modality in ``modalities`` order, as a buffer of
    the model (1/m, the ``log`` rule, until fitted)."""

    def __init__(self, modalities):
        super().__init__()
        self.modalities = list(modalities)
        self.register_buffer("weight", torch.full((len(self.modalities),), 1.0 / len(self.modalities)))

    def weights(self):
        """{m: w_m (0-d tensor)}."""
        return dict(zip(self.modalities, self.weight))

    def fit(self, probs, labels):
        """Set w from per-modality probabilities {m: (N, K)} and labels (N,) (``fit_log_weights``)."""
        stacked = torch.stack([probs[m] for m in self.modalities])
        self.weight.copy_(fit_log_weights(stacked, labels).to(self.weight))
