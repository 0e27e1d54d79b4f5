"""Flat gradient modification (GM) of MIE (Jiang, Chi, Yang, arXiv 2407.04587, §3).

For a layer of modality k, over one pass of modality k's training data, with z̄_t the mean over
mini-batch t of the layer's input (shape d_in):

    Ȳ = Σ_t z̄_t z̄_tᵀ                              (d_in × d_in, float64)
    V Λ Vᵀ = eigh(Ȳ),  λ clamped to ≥ 0
    Σ = exp(−τ · (Λ − λ_min I) / (λ_max − λ_min))    (T = I when λ_max = λ_min)
    T^(k) = V Σ Vᵀ

When modality l is trained, the weight gradient of its layer at the same position, as a matrix
(out × d_in), becomes ∇W · T^(k). Biases are untouched.

A Linear's input is its input vector (d_in = in_features). A convolution's (1-, 2- or 3-D) is
the unfolded patch (d_in = in_channels · k₁ · …, the order of ``weight.reshape(out, -1)``), and
its Ȳ is the unfolded-input covariance of Adam-NSCL (Wang et al., CVPR 2021) that the paper names
for GM beyond the head, as the authors' code computes it (njustkmg/IJCAI25-IGM
``models/AudioVideo.py``, ``compute_cov``): the batch-mean input x̄_t is unfolded into its patches
u_{t,p}, one per output position p, and

    Ȳ = Σ_t Σ_p u_{t,p} u_{t,p}ᵀ.

Both are kept as a factor Z with Ȳ = Z Zᵀ (the columns z̄_t, or u_{t,p}); once Z has more than
2·d_in columns it is replaced by the d_in × d_in factor Rᵀ of the QR decomposition Zᵀ = Q R, which
keeps Z Zᵀ = Rᵀ R and bounds the memory.

Diagnostics: ``covariance_eigenvalues(Z)`` is Ȳ's spectrum and ``flat_eigenvalues(λ, τ)`` T's (the σ
above); ``GradientModification(..., track=True)`` sums, per step, the cosine between each gradient
before and after its rewrite.
"""
import torch
import torch.nn.functional as F
from torch import nn

# Relative eigenvalue spread below which Ȳ is treated as a multiple of I (so T = I).
_EQUAL_EIGENVALUES_RTOL = 1e-12


def _eigh(cov):
    """eigh, falling back to LAPACK's MRRR driver (scipy) where torch's divide-and-conquer fails
    to converge: a conv layer's Ȳ is d_in × d_in with d_in in the thousands and rank ≤ the number
    of batches, so nearly all its eigenvalues coincide at 0."""
    try:
        return torch.linalg.eigh(cov)
    except torch.linalg.LinAlgError:
        from scipy.linalg import eigh
        lam, V = eigh(cov.cpu().numpy(), driver="evr")
        return (torch.as_tensor(lam, device=cov.device), torch.as_tensor(V, device=cov.device))


def flat_modification_matrix(cov, tau=0.4):
    """T = V Σ Vᵀ from a symmetric PSD matrix ``cov`` (d × d); returns float64 (d × d)."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(cov.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    cov = (cov + cov.T) / 2
    lam, V = _eigh(cov)
    lam = lam.clamp_min(0.0)
    lo, hi = lam.min(), lam.max()
    if hi - lo <= _EQUAL_EIGENVALUES_RTOL * hi.abs():
        return torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device)
    sigma = torch.exp(-tau * (lam - lo) / (hi - lo))
    return (V * sigma) @ V.T


GM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def input_dim(layer):
    """d_in of a GM layer: the length of the vector its weight matrix multiplies."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if (isinstance(layer, GM_LAYERS[1:]) and layer.groups == 1 and not isinstance(layer.padding, str)
            and layer.padding_mode == "zeros"):
        return layer.weight[0].numel()
    raise TypeError(f"GM takes nn.Linear and ungrouped, zero-padded nn.Conv1d/2d/3d layers with numeric "
                    f"padding, got {type(layer).__name__}")


def layer_input_columns(layer, x):
    """A batch's columns of the factor Z (Ȳ = Z Zᵀ) of a GM layer, float64 (d_in × c): for a Linear
    the mean input vector z̄ (c = 1); for a convolution the patches u_p of the batch-mean input, one
    per output position (C × k₁ × … in the order of ``weight[o]``), taken as strided views of the
    zero-padded input."""
    x = x.detach()
    if isinstance(layer, nn.Linear):     # the float64 mean of the float32 rows, without a float64 copy
        return x.reshape(-1, layer.in_features).mean(dim=0, dtype=torch.float64)[:, None]
    x = x.to(torch.float64)
    n = x.ndim - 2
    x = F.pad(x.mean(dim=0, keepdim=True), [p for p in reversed(layer.padding) for _ in range(2)])
    for i in range(n):   # dim 2 + i → output positions; a new last dim → the kernel's reach
        x = x.unfold(2 + i, layer.dilation[i] * (layer.kernel_size[i] - 1) + 1, layer.stride[i])
    x = x[(...,) + tuple(slice(None, None, d) for d in layer.dilation)]     # (1, C, O₁…Oₙ, k₁…kₙ)
    x = x[0].permute(*range(1, 1 + n), 0, *range(1 + n, 1 + 2 * n))        # (O₁…Oₙ, C, k₁…kₙ)
    return x.reshape(-1, input_dim(layer)).T


def covariance_eigenvalues(Z):
    """The d eigenvalues of Ȳ = Z Zᵀ from its factor Z (d × n), ascending, float64, clamped to ≥ 0
    as T's construction clamps them; with n < d, the n of the Gram matrix ZᵀZ and d − n zeros."""
    Z = torch.as_tensor(Z, dtype=torch.float64)
    d, n = Z.shape
    if n >= d:
        lam = _eigh((Z @ Z.T + (Z @ Z.T).T) / 2)[0]
    else:
        lam = torch.cat([torch.zeros(d - n, dtype=torch.float64, device=Z.device), _eigh(Z.T @ Z)[0]])
    return lam.clamp_min(0.0).sort().values


def flat_eigenvalues(lam, tau):
    """T's eigenvalues σ = exp(−τ (λ − λ_min)/(λ_max − λ_min)) for Ȳ's eigenvalues ``lam`` (all of
    them, d), in their order; all 1 when λ_max = λ_min, as T = I then."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    lo, hi = lam.min(), lam.max()
    if hi - lo <= _EQUAL_EIGENVALUES_RTOL * hi.abs():
        return torch.ones_like(lam)
    return torch.exp(-tau * (lam - lo) / (hi - lo))


def flat_modification_from_means(Z, tau=0.4):
    """T of Ȳ = Z Zᵀ from a factor Z (d × n): the batch means [z̄_1 … z̄_n], or any other, float64 (d × d).

    With fewer columns than dimensions (n < d, e.g. a wide layer and few batches) Ȳ has rank ≤ n and
    λ_min = 0, so T = I + Σ_i (σ_i − 1) u_i u_iᵀ over its n eigenpairs (``LowRankModification``), taken
    from the n × n Gram matrix ZᵀZ = W Λ Wᵀ (u_i = Z w_i / √λ_i): exactly V Σ Vᵀ, without a d × d
    eigendecomposition.
    """
    Z = torch.as_tensor(Z, dtype=torch.float64)
    d, n = Z.shape
    if n >= d:
        return flat_modification_matrix(Z @ Z.T, tau)
    return LowRankModification.from_means(Z, tau).dense()


class LowRankModification:
    """T = I + U diag(c) Uᵀ with U (d × r) orthonormal and c = σ − 1 over the r directions T damps:
    ∇W · T is ∇W + ((∇W U) ⊙ c) Uᵀ, 2·out·d·r multiply-adds instead of out·d²; equal to ∇W · V Σ Vᵀ up
    to float rounding.

    With a tolerance ``tol`` > 0 (ours), the directions that T damps by at most tol (1 − σ ≤ tol) are
    left undamped. The T so truncated differs from V Σ Vᵀ by at most tol in spectral norm, so each
    rewritten gradient moves by at most tol·‖∇W‖_F. A Ȳ of batch means usually has one eigenvalue far
    above the rest (every z̄_t is near the data's mean), so σ is within 1e-3 of 1 for all but a few
    directions: r drops from n to a handful.
    """

    def __init__(self, U, c):
        self.U, self.c = U, c
        self.shape = (U.shape[0], U.shape[0])
        self._scaled, self._U_t = U * c, U.T.contiguous()      # U diag(c) and Uᵀ, for the product

    @property
    def rank(self):
        return self.U.shape[1]

    @property
    def dtype(self):
        return self.U.dtype

    @property
    def device(self):
        return self.U.device

    @classmethod
    def from_means(cls, Z, tau=0.4, tol=0.0):
        """T of Ȳ = Z Zᵀ for a factor Z (d × n), float64: from the n × n Gram matrix ZᵀZ when n < d
        (λ_min = 0), else from Ȳ itself; directions with 1 − σ ≤ ``tol`` left out."""
        Z = torch.as_tensor(Z, dtype=torch.float64)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0 <= tol < 1:
            raise ValueError(f"tol must be in [0, 1), got {tol}")
        d, n = Z.shape
        none = cls(Z.new_zeros(d, 0), Z.new_zeros(0))
        if n == 0:
            return none
        if n < d:
            lam, W = _eigh(Z.T @ Z)
            lam = lam.clamp_min(0.0)
            hi = lam.max()
            if hi <= 0:
                return none
            sigma = torch.exp(-tau * lam / hi)
            keep = (lam > _EQUAL_EIGENVALUES_RTOL * hi) & (1 - sigma > tol)
            U = (Z @ W[:, keep]) / lam[keep].sqrt()
        else:
            cov = Z @ Z.T
            lam, U = _eigh((cov + cov.T) / 2)
            lam = lam.clamp_min(0.0)
            lo, hi = lam.min(), lam.max()
            if hi - lo <= _EQUAL_EIGENVALUES_RTOL * hi.abs():
                return none
            sigma = torch.exp(-tau * (lam - lo) / (hi - lo))
            keep = (sigma < 1) & (1 - sigma > tol)
            U = U[:, keep]
        return cls(U, sigma[keep] - 1)

    def dense(self):
        """T as a d × d matrix."""
        eye = torch.eye(self.shape[0], dtype=self.U.dtype, device=self.U.device)
        return eye + (self.U * self.c) @ self.U.T

    def to(self, dtype=None, device=None):
        return LowRankModification(self.U.to(dtype=dtype, device=device), self.c.to(dtype=dtype, device=device))

    @classmethod
    def identity(cls, d, dtype=torch.float64, device=None):
        """T = I (d × d), of rank 0: the product leaves ∇W untouched."""
        return cls(torch.zeros(d, 0, dtype=dtype, device=device), torch.zeros(0, dtype=dtype, device=device))

    def right_multiply_(self, G):
        """G ← G · T in place (G out × d); returns ‖G · (T − I)‖_F (= ‖G U diag(c)‖_F, U orthonormal)."""
        if self.rank == 0:
            return G.new_zeros(())
        coefficients = G @ self._scaled
        G.addmm_(coefficients, self._U_t)
        return coefficients.norm()


class InputCovariance:
    """Collects, via forward hooks, the factor Z of Ȳ = Z Zᵀ of the inputs of some GM layers (see the
    module docstring: batch means for a Linear, patches of the batch-mean input for a convolution).

    Use as a context manager around forward passes; the columns stay on the layers' device until read
    (no host sync per pass). ``factor(i)`` is Z (d_in × n, float64, on the CPU) of layer i,
    ``covariances`` the matrices Ȳ = Z Zᵀ, and ``flat_matrices(τ)`` each layer's T, in the order the
    layers were given.
    """

    def __init__(self, layers):
        self.layers = list(layers)
        self.dims = [input_dim(l) for l in self.layers]
        self.blocks = [[] for _ in self.layers]
        self.columns = [0 for _ in self.layers]
        self._handles = []

    def _hook(self, index):
        def hook(module, inputs, output):
            blocks = self.blocks[index]
            blocks.append(layer_input_columns(module, inputs[0]))    # float64 on the layer's device: no sync
            self.columns[index] += blocks[-1].shape[1]
            if self.columns[index] > 2 * self.dims[index]:
                self.blocks[index] = [torch.linalg.qr(torch.cat(blocks, dim=1).T, mode="r").R.T]
                self.columns[index] = self.blocks[index][0].shape[1]
        return hook

    def __enter__(self):
        self._handles = [l.register_forward_hook(self._hook(i)) for i, l in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def factor(self, index):
        if not self.blocks[index]:
            return torch.zeros(self.dims[index], 0, dtype=torch.float64)
        return torch.cat(self.blocks[index], dim=1).cpu()

    @property
    def covariances(self):
        return [Z @ Z.T for Z in map(self.factor, range(len(self.layers)))]

    def flat_matrices(self, tau):
        return [flat_modification_from_means(self.factor(i), tau) for i in range(len(self.layers))]

    def all_reduce(self):
        """Join every rank's factors (Ȳ sums over the ranks), if a torch.distributed process group is
        running (for a loop in which each rank passes over its own shard of the data)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, [[b.cpu() for b in blocks] for blocks in self.blocks])
            self.blocks = [[b for rank_blocks in gathered for b in rank_blocks[i]] for i in range(len(self.layers))]
            self.columns = [sum(b.shape[1] for b in blocks) for blocks in self.blocks]


def rewrite_gradient(layer, T):
    """Replace ``layer.weight.grad`` (which must exist), as a matrix (out × d_in), by ∇W · T (T a
    d_in × d_in tensor, or a ``LowRankModification``, applied in place); returns ‖∇W·T − ∇W‖_F as a
    0-d tensor (no host sync)."""
    grad = layer.weight.grad
    matrix = grad if grad.dim() == 2 else grad.reshape(grad.shape[0], -1)
    if T.shape != (matrix.shape[1], matrix.shape[1]):
        raise ValueError(f"T of shape {tuple(T.shape)} does not fit a {type(layer).__name__} with d_in={matrix.shape[1]}")
    if (T.dtype, T.device) != (grad.dtype, grad.device):
        T = T.to(dtype=grad.dtype, device=grad.device)
    if isinstance(T, LowRankModification):
        change = T.right_multiply_(matrix)
        new = matrix
    else:
        new = matrix @ T
        change = torch.dist(new, matrix)
    if new is not grad:
        layer.weight.grad = new.view(grad.shape)
    return change


def modify_gradient(layer, T):
    """``rewrite_gradient``; returns ‖∇W·T − ∇W‖ / ‖∇W‖ as a 0-d tensor (0 without a gradient)."""
    grad = layer.weight.grad
    if grad is None:
        return torch.zeros(())
    norm = grad.norm()
    return rewrite_gradient(layer, T).div_(norm).nan_to_num_(0.0)      # ∇W = 0 changes nothing: 0/0 → 0


class GradientModification:
    """GM as an optimizer step pre-hook: before each step, the weight gradient of each layer in
    ``layers`` becomes ∇W · T for its matrix T (layers whose matrix is None are left alone).

        gm = GradientModification(layers_of_l)    # modality l's layers; no matrices yet
        gm.attach(optimizer)                       # under SAM: the base optimizer, so GM runs
        gm.matrices = T_of_k                       # between the second backward and the step

    ``changes`` collects, per step, the mean of ‖∇W·T − ∇W‖/‖∇W‖ over the modified layers (0-d
    tensors; read them when logging). With ``track``, ``cosines`` sums on the gradients' device, over
    the steps that rewrote something (``steps``), two cosines between the gradient g before and g'
    after the rewrite: (1) of the rewritten weights together, (2) of all the parameters the optimizer
    steps (the unmodified ones count in both); 1 where g = 0.
    """

    def __init__(self, layers, matrices=None, track=False):
        self.layers = list(layers)
        self.matrices = list(matrices) if matrices is not None else [None] * len(self.layers)
        self.changes = []
        self.track = track
        self.cosines, self.steps = None, 0

    def __call__(self, optimizer, args, kwargs):
        pairs = [(layer, T) for layer, T in zip(self.layers, self.matrices) if T is not None]
        if not pairs:
            return
        before = [layer.weight.grad for layer, _ in pairs]
        if self.track:                      # a low-rank T rewrites the gradients in place
            before = [None if b is None else b.clone() for b in before]
        self.changes.append(self._rewrite(pairs))
        if self.track and any(b is not None for b in before):
            rewritten = {id(layer.weight) for layer, _ in pairs}
            cos = gradient_cosines(before, [layer.weight.grad for layer, _ in pairs],
                                   [p.grad for g in optimizer.param_groups for p in g["params"]
                                    if p.grad is not None and id(p) not in rewritten])
            self.cosines = cos if self.cosines is None else self.cosines + cos
            self.steps += 1

    @staticmethod
    def _rewrite(pairs):
        """Rewrite the gradient of each (layer, T); returns the mean over ``pairs`` of ‖∇W·T − ∇W‖ / ‖∇W‖
        (0 for a layer without gradient), the norms ‖∇W‖ taken in one kernel for all layers."""
        present = [(layer, T) for layer, T in pairs if layer.weight.grad is not None]
        if not present:
            return torch.zeros(())
        norms = torch._foreach_norm([layer.weight.grad for layer, _ in present])
        changes = [rewrite_gradient(layer, T) for layer, T in present]
        ratios = torch.stack(changes).div_(torch.stack(norms)).nan_to_num_(0.0)    # ∇W = 0: 0/0 → 0
        return ratios.sum().div_(len(pairs))

    def attach(self, optimizer):
        """Run before every ``optimizer.step()``; returns the hook's removable handle."""
        return optimizer.register_step_pre_hook(self)


def gradient_cosines(before, after, others=()):
    """(2,) float64 tensor, no host sync: cos(g, g') over the tensors ``before`` / ``after`` (pairwise
    of one shape; None entries skipped, at least one not None), and over them together with
    ``others``, gradients that are the same in g and g'. A zero gradient counts as unchanged (1)."""
    pairs = [(b.double(), a.double()) for b, a in zip(before, after) if b is not None]
    zero = torch.zeros((), dtype=torch.float64, device=pairs[0][0].device)
    dot = sum(((b * a).sum() for b, a in pairs), zero)
    nb, na = sum((b.square().sum() for b, _ in pairs), zero), sum((a.square().sum() for _, a in pairs), zero)
    rest = sum((g.double().square().sum() for g in others), zero)

    def cos(dot, nb, na):
        den = (nb * na).sqrt()
        return torch.where(den > 0, dot / torch.where(den > 0, den, 1.0), 1.0)
    return torch.stack([cos(dot, nb, na), cos(dot + rest, nb + rest, na + rest)])


def matrix_stats(T):
    """How strongly T acts, in O(d²): its mean eigenvalue tr(T)/d (1 for T = I, towards e^{−τ}
    as more directions are damped) and ‖T − I‖_F. (Its smallest eigenvalue is e^{−τ} whenever
    T ≠ I, so it says nothing.)"""
    T = T.to(torch.float64)
    eye = torch.eye(T.shape[0], dtype=torch.float64, device=T.device)
    return {"mean_eig": (T.trace() / T.shape[0]).item(), "dist_identity": (T - eye).norm().item()}
