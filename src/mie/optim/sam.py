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
"""
from contextlib import contextmanager

import torch
from torch import nn


class SAM(torch.optim.Optimizer):
    """SAM around an existing optimizer instance.

    Either ``sam.step(closure)``, where ``closure`` computes the loss, calls ``backward()`` and
    returns the loss (gradients are cleared before each of its two calls; pass ``model=`` so the
    second pass leaves BatchNorm statistics alone), or the two-call form::

        loss(model(x)).backward(); sam.first_step(zero_grad=True)
        with frozen_batchnorm_stats(model):
            loss(model(x)).backward()
        sam.second_step(zero_grad=True)
    """

    def __init__(self, base_optimizer, rho=0.05, adaptive=False, model=None):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("SAM wraps a torch.optim.Optimizer instance, "
                            f"got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, SAM):
            raise TypeError("SAM wraps a base optimizer (SGD, Adam, …), not another SAM")
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        super().__init__(base_optimizer.param_groups, dict(base_optimizer.defaults))
        self.param_groups = base_optimizer.param_groups     # one list, shared with the base
        self.state = base_optimizer.state
        self.base_optimizer = base_optimizer
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.model = model
        self._saved = None

    def _params_with_grad(self):
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def grad_norm(self):
        """‖g‖₂ (or ‖w ⊙ g‖₂ when adaptive) over all parameters with a gradient."""
        params = self._params_with_grad()
        if not params:
            return torch.tensor(0.0)
        norms = [((p.abs() if self.adaptive else 1.0) * p.grad).norm(2) for p in params]
        return torch.stack([n.to(norms[0].device) for n in norms]).norm(2)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """Save θ, then move to θ + ε."""
        params = self._params_with_grad()
        scale = self.rho / (self.grad_norm() + 1e-12)
        self._saved = [(p, p.detach().clone()) for p in params]
        for p in params:
            e = (p * p if self.adaptive else 1.0) * p.grad * scale.to(p.device)
            p.add_(e)
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
        for p, saved in self._saved or []:
            p.copy_(saved)
        self._saved = None

    @torch.no_grad()
    def step(self, closure=None):
        """One full SAM step; returns the loss of the first pass (at θ)."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that computes the loss, calls backward and returns it")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        self.first_step(zero_grad=True)
        with frozen_batchnorm_stats(self.model):
            closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none=True):
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        """The base optimizer's state (ρ and ``adaptive`` are the constructor's, not state)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state):
        self.base_optimizer.load_state_dict(state)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state


@contextmanager
def frozen_batchnorm_stats(model):
    """Run a forward pass without changing any BatchNorm running statistics of ``model``.

    The buffers (running mean/var and the batch counter) are snapshot on entry and put back on
    exit, so SAM's second pass leaves them exactly as the first pass set them.
    """
    if model is None:
        yield
        return
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    saved = [[b.detach().clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
             for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
