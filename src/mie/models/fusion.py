"""Late fusion at inference: the one vocabulary of ``fusion`` rules, for every method.

model:    the method's own fused output — what it was trained to predict (softmax of the sum of
          the per-modality logits for joint training and OGM-GE, a fusion head's logits, …); only
          for methods that have one
average:  p = (1/m) Σ_m p_m
weight:   per sample, H_m = −Σ_c p_m,c log p_m,c,  w_m = softmax_m(−H_m),  p = Σ_m w_m p_m
          (MLA, Zhang et al. CVPR'24, eq. 9; computed per sample as the paper states)

How features are combined inside a model (concatenation, sum) is the architecture, named
``feature_fusion`` by the methods that offer a choice.
"""
import torch
import torch.nn.functional as F

from ..errors import MieInputError

FUSIONS = ("model", "average", "weight")
LATE_FUSIONS = ("average", "weight")        # the rules that need per-modality predictions only


def entropy_weights(probs):
    """probs (m, B, K) → w (m, B): softmax over modalities of minus each prediction's entropy."""
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    return torch.softmax(-entropy, dim=0)


def fuse(probs, rule="average"):
    """Fuse per-modality probabilities ``probs`` (m, B, K) into (B, K) by a rule of ``LATE_FUSIONS``."""
    if rule == "average":
        return probs.mean(dim=0)
    if rule == "weight":
        return (entropy_weights(probs).unsqueeze(-1) * probs).sum(dim=0)
    raise MieInputError(f"unknown fusion '{rule}'; expected 'average' or 'weight'")


def fused_prediction(rule, probs, fused_logits=None):
    """(B, K) probabilities by ``rule``: ``probs`` {m: (B, K)}; ``fused_logits`` (B, K) for "model"."""
    if rule == "model":
        if fused_logits is None:
            raise MieInputError("fusion 'model' needs a method with a fused output; use 'average' or 'weight'")
        return F.softmax(fused_logits.float(), dim=-1)
    return fuse(torch.stack(list(probs.values())), rule)
