"""Pretrained weights from a local file into an encoder, with a clear error when they do not fit.

Files: a torch state dict (``.pt``/``.pth``/``.bin``, possibly wrapped as {"state_dict": …} or
{"model": …}, keys possibly prefixed ``module.``) or ``.safetensors``. An encoder that names its
parameters differently from the weights' source offers ``map_pretrained_keys(state) → state``
(e.g. torchvision's ResNet names → ours).
"""
from pathlib import Path

import torch

from ..errors import MieInputError


def read_state_dict(path):
    """{name: tensor} from a weights file."""
    path = Path(path)
    if not path.is_file():
        raise MieInputError(f"no such weights file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise MieInputError("reading .safetensors needs the safetensors package: pip install safetensors") from None
    except Exception as e:
        raise MieInputError(f"cannot read {path} as weights ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise MieInputError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(module, path, what="encoder"):
    """Load ``path`` into ``module``: every parameter the file names must fit, and the file must
    cover the module's trunk (only layers the file cannot know, such as a projection to ``dim``,
    may stay initialised). Returns the names left at their initial values."""
    state = read_state_dict(path)
    if hasattr(module, "map_pretrained_keys"):
        state = module.map_pretrained_keys(state)
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise MieInputError(f"{path} has no parameter named like {what}'s (e.g. {next(iter(own))} vs "
                            f"{next(iter(state), '(empty)')}); is it the weights of this architecture?")
    wrong = [k for k, v in matched.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise MieInputError(f"{path}: {k} has shape {tuple(matched[k].shape)}, {what} expects "
                            f"{tuple(own[k].shape)} ({len(wrong)} mismatched)")
    missing = [k for k in own if k not in matched]
    allowed = tuple(getattr(module, "not_pretrained", ()))
    uncovered = [k for k in missing if not k.startswith(allowed) and not k.endswith("num_batches_tracked")]
    if uncovered:
        raise MieInputError(f"{path} does not cover {what}: {len(uncovered)} tensor(s) missing, first {uncovered[0]}")
    module.load_state_dict(matched, strict=False)
    return missing
