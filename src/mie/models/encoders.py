"""Encoder registry: ``create_encoder(name, input_shape, dim, **options)`` → a module mapping
(B, *input_shape) → (B, dim).

In a config, ``model.encoders`` maps a modality to a name (``resnet18``) or to a name with options
(``{name: resnet18, weights: /path/resnet18.pth}``). ``weights`` loads pretrained weights from a
local file; encoders in ``SELF_PRETRAINED`` load their own (a local model folder or package).
With ``model.pretrained: true`` (``--pretrained``) every encoder must be pretrained one way or the
other: a missing weights file is an error, never a silent random initialisation.
"""
from ..errors import MieInputError
from .clip import clip_image, clip_text
from .cnn1d import CNN1DEncoder
from .i3d import i3d
from .mlp import MLPEncoder
from .resnet import resnet18, resnet50, resnet_small
from .text import bert, minilm
from .weights import load_weights

ENCODERS = {
    "mlp": lambda shape, dim, **kw: MLPEncoder(_prod(shape), dim, **kw),
    "cnn1d": lambda shape, dim, **kw: CNN1DEncoder(shape[0], dim, **kw),
    "resnet_small": lambda shape, dim, **kw: resnet_small(shape[0], dim, **kw),
    "resnet18": lambda shape, dim, **kw: resnet18(shape[0], dim, **kw),
    "resnet50": lambda shape, dim, **kw: resnet50(shape[0], dim, **kw),
    "minilm": lambda shape, dim, **kw: minilm(shape, dim, **kw),
    "bert": lambda shape, dim, **kw: bert(shape, dim, **kw),
    "clip_text": lambda shape, dim, **kw: clip_text(shape, dim, **kw),
    "clip_image": lambda shape, dim, **kw: clip_image(shape, dim, **kw),
    "i3d": lambda shape, dim, **kw: i3d(shape[0], dim, **kw),
}

# Encoders whose construction loads pretrained weights (they take no ``weights`` option).
SELF_PRETRAINED = {"minilm", "bert", "clip_text", "clip_image"}

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


def create_encoder(name, input_shape, dim, weights=None, **options):
    """Build encoder ``name`` for samples of shape ``input_shape`` with output size ``dim``;
    ``weights``: a local state-dict file loaded into it (see ``weights.load_weights``)."""
    if name not in ENCODERS:
        raise MieInputError(f"unknown encoder '{name}'; expected one of {', '.join(sorted(ENCODERS))}")
    try:
        encoder = ENCODERS[name](tuple(input_shape), dim, **options)
    except TypeError as e:
        raise MieInputError(f"encoder {name}: {e}") from None
    if weights:
        if name in SELF_PRETRAINED:
            raise MieInputError(f"encoder {name} loads its own pretrained weights; it takes no 'weights' option")
        load_weights(encoder, weights, name)
    return encoder


def encoder_options(entry, modality):
    """A ``model.encoders`` entry → (name, options): 'resnet18' or {name: resnet18, weights: PATH}."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        return entry["name"], {k: v for k, v in entry.items() if k != "name"}
    raise MieInputError(f"model.encoders.{modality} must be an encoder name or a mapping with a 'name', "
                        f"e.g. {{name: resnet18, weights: PATH}}; got {entry!r}")


def build_encoders(spec):
    """{modality: encoder} for a ``ModelSpec``: each maps (B, *input_shape) → (B, spec.dim).

    With ``spec.load_weights`` false, ``weights`` files are skipped (a checkpoint's state follows)."""
    encoders = {}
    for m in spec.modalities:
        name, options = encoder_options(spec.encoders[m], m)
        if spec.pretrained and name not in SELF_PRETRAINED and not options.get("weights"):
            raise MieInputError(f"model.pretrained is set but modality {m}'s encoder {name} has no weights; "
                                f"give model.encoders.{m}={{name: {name}, weights: PATH}}, or drop --pretrained")
        if not spec.load_weights:
            options.pop("weights", None)
        encoders[m] = create_encoder(name, spec.input_shapes[m], spec.dim, **options)
    return encoders
