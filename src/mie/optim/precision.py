"""Gradient arithmetic in full precision even inside a bfloat16 autocast region (``train.amp``).

The loop runs a method's whole step under autocast, so that every forward pass is mixed
precision; matrix products on gradients (GM's ∇W·T, MLA's projection) must not be, or they would
come out in bfloat16 and lose the small directions they exist to keep.
"""
import contextlib

import torch


class full_precision(contextlib.ContextDecorator):
    """``with full_precision():`` or ``@full_precision()``: autocast off on CPU and CUDA."""

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            self._stack.enter_context(torch.autocast("cuda", enabled=False))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)
