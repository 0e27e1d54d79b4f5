"""Encoder registry: ``create_encoder(name, input_shape, dim)`` → module mapping (B, *input_shape) → (B, dim)."""
from ..errors import MieInputError
from .cnn1d import CNN1DEncoder
from .mlp import MLPEncoder
from .resnet import resnet18, resnet_small

ENCODERS = {
    "mlp": lambda shape, dim, **kw: MLPEncoder(_prod(shape), dim, **kw),
    "cnn1d": lambda shape, dim, **kw: CNN1DEncoder(shape[0], dim, **kw),
    "resnet_small": lambda shape, dim, **kw: resnet_small(shape[0], dim, **kw),
    "resnet18": lambda shape, dim, **kw: resnet18(shape[0], dim, **kw),
}

# Encoder picked from the rank of one sample: vector, sequence (C, L), image (C, H, W), clip (C, T, H, W).
DEFAULT_BY_RANK = {1: "mlp", 2: "cnn1d", 3: "resnet_small", 4: "resnet_small"}


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def default_encoder(input_shape):
    """The encoder name used for samples of shape ``input_shape`` when the config names none."""
    try:
        return DEFAULT_BY_RANK[len(input_shape)]
    except KeyError:
        raise MieInputError(f"no default encoder for samples of shape {tuple(input_shape)}; "
                            "expected (D,), (C, L), (C, H, W) or (C, T, H, W)") from None


def create_encoder(name, input_shape, dim, **kwargs):
    """Build encoder ``name`` for samples of shape ``input_shape`` with output size ``dim``."""
    if name not in ENCODERS:
        raise MieInputError(f"unknown encoder '{name}'; expected one of {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name](tuple(input_shape), dim, **kwargs)


def build_encoders(spec):
    """{modality: encoder} for a ``ModelSpec``: each maps (B, *input_shape) → (B, spec.dim)."""
    return {m: create_encoder(spec.encoders[m], spec.input_shapes[m], spec.dim) for m in spec.modalities}
