"""Mixed precision for forward passes only (``train.amp``).

``autocast_forwards(model, device)`` makes the forward of the model and of each of its parts (the
modules a method calls: its direct children, and the members of its ModuleDicts and ModuleLists)
run under bfloat16 autocast and return float32. Losses, backward, and whatever a method does with
gradients between backward and step (GM's ∇W·T, MLA's projection) run outside autocast, in full
precision, without the method doing anything. Parameters, gradients and optimizer states stay
float32, so no loss scaling is needed.
"""
import torch
from torch import nn


def _to_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float32(v) for v in out)
    return out


def _parts(model):
    yield model
    for child in model.children():
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
            yield from child.children()
        else:
            yield child


def autocast_forwards(model, device, dtype=torch.bfloat16):
    """Wrap the forwards of ``model``'s parts in autocast (see the module docstring); returns ``model``."""
    for part in _parts(model):
        forward = part.forward

        def autocast_forward(*args, _forward=forward, **kwargs):
            with torch.autocast(device.type, dtype=dtype):
                return _to_float32(_forward(*args, **kwargs))
        part.forward = autocast_forward
    return model
