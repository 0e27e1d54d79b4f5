"""Sharpness-Aware Minimization (Foret et al., ICLR 2021) wrapping any torch optimizer.

With g = ∇L(θ) on a mini-batch, one SAM step is

    ε  = ρ · g / ‖g‖₂                      (‖·‖ over all parameters at once)
    g' = ∇L(θ + ε)  on the same mini-batch
    θ ← base_step(θ, g')                   (θ restored bit-exactly before the step)

With ``adaptive=True`` (ASAM, Kwon et al. 2021): ε = ρ · w² ⊙ g / ‖w ⊙ g‖₂.

``SAM`` is a ``torch.optim.Optimizer`` that shares its base optimizer's ``param_groups``, so a
learning-rate scheduler built on it drives the base optimizer's rates. The base optimizer's step
pre-hooks run between the second backward and the base step: the place for gradient rewrites such
as MIE's flat modification (``mie.optim.flat.GradientModification``) or a gradient all-reduce.

Two options make ``step(closure)`` cheaper; with their defaults it is the SAM step above on every call.

* ``every=k``: the two passes on the optimizer's steps 0, k, 2k, … only, and a plain step
  θ ← base_step(θ, g) with one pass in between (MosaicML Composer's SAM ``interval``,
  ``composer/algorithms/sam/sam.py``, ``SAMOptimizer.step``, l. 92 at 6405188, which runs SAM when
  ``(global_step + 1) % interval == 0``, i.e. on the interval's last step rather than its first).
* ``reuse="looksam"`` (LookSAM, Liu, Mai, Chen, Hsieh, You, CVPR 2022, Algorithm 1): on a SAM step
  it keeps g_v = g' − (g'·g / ‖g‖²) g, the part of the SAM gradient orthogonal to g, and a plain
  step uses g + α (‖g‖ / ‖g_v‖) g_v from its one pass (default α = 0.7, with k = 5, as in the
  public reimplementation Leminhbinh0209/LookSAM); norms and products over all parameters at once.

The step count and g_v are in ``state_dict`` so that a resumed run continues the cycle exactly. The
base optimizer's pre-hooks see the gradient that is stepped on in plain steps too.
"""
from contextlib import contextmanager

import torch
from torch import nn

REUSE = (None, "looksam")


class SAM(torch.optim.Optimizer):
    """SAM around an existing optimizer instance.

    Either ``sam.step(closure)``, where ``closure`` computes the loss, calls ``backward()`` and
    returns the loss (gradients are cleared before each of its two calls; pass ``model=`` so the
    second pass leaves BatchNorm statistics alone), or the two-call form::

        loss(model(x)).backward(); sam.first_step(zero_grad=True)
        with frozen_batchnorm_stats(model):
            loss(model(x)).backward()
        sam.second_step(zero_grad=True)

    ``every`` and ``reuse`` act in ``step(closure)``; the two-call form is always a SAM step.
    """

    def __init__(self, base_optimizer, rho=0.05, adaptive=False, model=None, every=1, reuse=None, alpha=0.7):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("SAM wraps a torch.optim.Optimizer instance, "
                            f"got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, SAM):
            raise TypeError("SAM wraps a base optimizer (SGD, Adam, …), not another SAM")
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if reuse not in REUSE:
            raise ValueError(f"reuse must be one of {REUSE}, got {reuse!r}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        super().__init__(base_optimizer.param_groups, dict(base_optimizer.defaults))
        self.param_groups = base_optimizer.param_groups     # one list, shared with the base
        self.state = base_optimizer.state
        self.base_optimizer = base_optimizer
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.model = model
        self._batchnorms = tracked_batchnorms(model)     # listed once: a model's layers do not change
        self.every, self.reuse, self.alpha = every, reuse, float(alpha)
        self.steps = 0              # calls of step(closure) so far
        self._gv = {}               # LookSAM: parameter → g_v of the last SAM step
        self._saved = None

    def _params_with_grad(self):
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def grad_norm(self):
        """‖g‖₂ (or ‖w ⊙ g‖₂ when adaptive) over all parameters with a gradient."""
        params = self._params_with_grad()
        if not params:
            return torch.tensor(0.0)
        if self.adaptive:
            norms = [(p.abs() * p.grad).norm(2) for p in params]
        else:
            norms = torch._foreach_norm([p.grad for p in params], 2)
        return torch.stack([n.to(norms[0].device) for n in norms]).norm(2)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """Save θ, then move to θ + ε."""
        params = self._params_with_grad()
        scale = self.rho / (self.grad_norm() + 1e-12)
        self._saved = (params, torch._foreach_mul(params, 1.0))       # copies of θ
        if self.adaptive:
            for p in params:
                p.add_(p * p * p.grad * scale.to(p.device))
        else:
            torch._foreach_add_(params, torch._foreach_mul([p.grad for p in params], scale.to(params[0].device)))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        """Restore θ exactly, then take the base optimizer's step (its pre-hooks first) with the
        current gradient."""
        if self._saved is None:
            raise RuntimeError("second_step() called before first_step()")
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self):
        """Put back the parameters saved by ``first_step`` (bit-exact copy)."""
        if self._saved is not None:
            torch._foreach_copy_(*self._saved)
        self._saved = None

    @torch.no_grad()
    def step(self, closure=None):
        """One step: SAM's two passes on steps 0, k, 2k, … (k = ``every``), else one pass and a plain
        (or LookSAM) step; returns the loss of the first pass (at θ)."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that computes the loss, calls backward and returns it")
        sam_step = self.steps % self.every == 0
        self.steps += 1
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        if not sam_step:
            if self.reuse == "looksam":
                self._add_reused_component()
            self.base_optimizer.step()
            return loss
        g = [(p, p.grad.clone()) for p in self._params_with_grad()] if self.reuse == "looksam" else None
        self.first_step(zero_grad=True)
        with frozen_batchnorm_stats(self.model, self._batchnorms), torch.enable_grad():
            closure()
        if g is not None:
            self._keep_orthogonal_component(g)
        self.second_step()
        return loss

    def _keep_orthogonal_component(self, g):
        """g_v = g' − (g'·g / ‖g‖²) g over all parameters, g' being the current (second-pass) gradient;
        ``g``: [(parameter, its first-pass gradient)]."""
        pairs = [(p, t) for p, t in g if p.grad is not None]
        dot = sum((p.grad * t).sum() for p, t in pairs)
        sq = sum((t * t).sum() for _, t in pairs)
        coef = dot / (sq + 1e-24)
        self._gv = {p: p.grad - coef * t for p, t in pairs}

    def _add_reused_component(self):
        """g ← g + α (‖g‖ / ‖g_v‖) g_v on the parameters that have both."""
        pairs = [(p, self._gv[p]) for p in self._params_with_grad() if p in self._gv]
        if not pairs:
            return
        g_norm = torch.stack([p.grad.norm(2) for p, _ in pairs]).norm(2)
        v_norm = torch.stack([v.norm(2) for _, v in pairs]).norm(2)
        scale = self.alpha * g_norm / (v_norm + 1e-12)
        for p, v in pairs:
            p.grad.add_(v * scale)

    def zero_grad(self, set_to_none=True):
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self):
        """The base optimizer's state plus ``sam_steps`` (and ``looksam_gv``, one tensor or None per
        parameter in ``param_groups`` order); ρ, ``adaptive``, ``every``, ``reuse``, α are the
        constructor's, not state."""
        state = self.base_optimizer.state_dict()
        state["sam_steps"] = self.steps
        if self.reuse == "looksam":
            state["looksam_gv"] = [None if p not in self._gv else self._gv[p].clone() for p in self._all_params()]
        return state

    def load_state_dict(self, state):
        state = dict(state)
        self.steps = state.pop("sam_steps", 0)
        gv = state.pop("looksam_gv", None) or []
        self.base_optimizer.load_state_dict(state)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._gv = {p: v.to(device=p.device, dtype=p.dtype) for p, v in zip(self._all_params(), gv) if v is not None}


def tracked_batchnorms(model):
    """The BatchNorm layers of ``model`` that keep running statistics (none for ``model=None``)."""
    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_batchnorm_stats(model, batchnorms=None):
    """Run a forward pass without changing any BatchNorm running statistics of ``model``.

    The buffers (running mean/var and the batch counter) are snapshot on entry and put back on
    exit, so SAM's second pass leaves them exactly as the first pass set them. ``batchnorms``: the
    layers to guard, when the caller has listed them already (``tracked_batchnorms``).
    """
    bns = tracked_batchnorms(model) if batchnorms is None else batchnorms
    if not bns:
        yield
        return
    buffers = [b for m in bns for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
    saved = torch._foreach_mul(buffers, 1)          # one copy of them all
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(buffers, saved)
