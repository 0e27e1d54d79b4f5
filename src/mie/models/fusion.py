"""Late fusion of per-modality predictions at inference.

average:  p = (1/m) Σ_m p_m
weight:   per sample, H_m = −Σ_c p_m,c log p_m,c,  w_m = softmax_m(−H_m),  p = Σ_m w_m p_m
          (MLA, Zhang et al. CVPR'24, eq. 9; computed per sample as the paper states)
"""
import torch

from ..errors import MieInputError


def entropy_weights(probs):
    """probs (m, B, K) → w (m, B): softmax over modalities of minus each prediction's entropy."""
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    return torch.softmax(-entropy, dim=0)


def fuse(probs, rule="average"):
    """Fuse per-modality probabilities ``probs`` (m, B, K) into (B, K)."""
    if rule == "average":
        return probs.mean(dim=0)
    if rule == "weight":
        return (entropy_weights(probs).unsqueeze(-1) * probs).sum(dim=0)
    raise MieInputError(f"unknown fusion '{rule}'; expected 'average' or 'weight'")


FUSIONS = ("average", "weight")
