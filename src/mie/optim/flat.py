"""Flat gradient modification (GM) of MIE (Jiang, Chi, Yang, arXiv 2407.04587, §3).

For a Linear layer of modality k, over one pass of modality k's training data, with z̄_t the
mean over mini-batch t of the layer's input (shape d_in):

    Ȳ = Σ_t z̄_t z̄_tᵀ                              (d_in × d_in, float64)
    V Λ Vᵀ = eigh(Ȳ),  λ clamped to ≥ 0
    Σ = exp(−τ · (Λ − λ_min I) / (λ_max − λ_min))    (T = I when λ_max = λ_min)
    T^(k) = V Σ Vᵀ

When modality l is trained, the weight gradient of its Linear at the same position
(PyTorch shape out × in) becomes ∇W · T^(k). Biases are untouched.
"""
import torch
from torch import nn

from .precision import full_precision

# Relative eigenvalue spread below which Ȳ is treated as a multiple of I (so T = I).
_EQUAL_EIGENVALUES_RTOL = 1e-12


def flat_modification_matrix(cov, tau=0.4):
    """T = V Σ Vᵀ from a symmetric PSD matrix ``cov`` (d × d); returns float64 (d × d)."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(cov.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    cov = (cov + cov.T) / 2
    lam, V = torch.linalg.eigh(cov)
    lam = lam.clamp_min(0.0)
    lo, hi = lam.min(), lam.max()
    if hi - lo <= _EQUAL_EIGENVALUES_RTOL * hi.abs():
        return torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device)
    sigma = torch.exp(-tau * (lam - lo) / (hi - lo))
    return (V * sigma) @ V.T


class InputCovariance:
    """Accumulates Ȳ = Σ_t z̄_t z̄_tᵀ of the inputs of some Linear layers, via forward hooks.

    Use as a context manager around forward passes; ``covariances`` holds one float64
    (d_in × d_in) matrix per layer, in the order the layers were given.
    """

    def __init__(self, linears):
        self.linears = list(linears)
        for layer in self.linears:
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"InputCovariance takes nn.Linear layers, got {type(layer).__name__}")
        self.covariances = [torch.zeros(l.in_features, l.in_features, dtype=torch.float64)
                            for l in self.linears]
        self._handles = []

    def _hook(self, index):
        def hook(module, inputs, output):
            z = inputs[0].detach().reshape(-1, module.in_features)
            z_bar = z.to(torch.float64).mean(dim=0).cpu()    # float64 before the mean (bf16 inputs under AMP)
            self.covariances[index] += torch.outer(z_bar, z_bar)
        return hook

    def __enter__(self):
        self._handles = [l.register_forward_hook(self._hook(i)) for i, l in enumerate(self.linears)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def all_reduce(self):
        """Sum the covariances over a torch.distributed process group, if one is running (for a
        loop in which each rank passes over its own shard of the data)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"   # NCCL reduces GPU tensors only
            for cov in self.covariances:
                total = cov.to(device)
                dist.all_reduce(total)
                cov.copy_(total.cpu())


@full_precision()
def modify_linear_gradient(linear, T):
    """Replace ``linear.weight.grad`` (out × in) by ∇W · T; returns ‖∇W·T − ∇W‖ / ‖∇W‖."""
    grad = linear.weight.grad
    if grad is None:
        return 0.0
    if T.shape != (grad.shape[1], grad.shape[1]):
        raise ValueError(f"T of shape {tuple(T.shape)} does not fit a Linear with "
                         f"in_features={grad.shape[1]}")
    new = grad @ T.to(dtype=grad.dtype, device=grad.device)
    norm = grad.norm()
    change = ((new - grad).norm() / norm).item() if norm > 0 else 0.0
    linear.weight.grad = new
    return change


def matrix_stats(T):
    """How strongly T acts: its smallest eigenvalue and ‖T − I‖_F."""
    T = T.to(torch.float64)
    eye = torch.eye(T.shape[0], dtype=torch.float64, device=T.device)
    return {"min_eig": torch.linalg.eigvalsh(T).min().item(),
            "dist_identity": (T - eye).norm().item()}
