"""What a method needs to know to build its model: modalities, their shapes and encoders, classes."""
from dataclasses import dataclass, field


@dataclass
class ModelSpec:
    modalities: list          # names, in the data's order
    input_shapes: dict        # modality → shape of one sample, e.g. (240,) or (6, 100)
    encoders: dict            # modality → encoder name, or {name: ..., weights: PATH, other options}
    num_classes: int
    dim: int = 256            # encoder output size d, the same for every modality
    head_hidden: tuple = field(default=(256, 64))
    pretrained: bool = False  # every encoder must load pretrained weights (model.pretrained)
    load_weights: bool = True # False when a checkpoint's state is loaded right after building


def model_spec(model_cfg, prepared, chosen_modalities=None):
    """The ``ModelSpec`` of a run from its config's ``model`` section and its ``PreparedData``
    (``chosen_modalities``: the data.modalities the user picked, if any)."""
    from ..errors import MieInputError
    from .encoders import default_encoder
    encoders = dict(model_cfg["encoders"])
    if chosen_modalities:   # a chosen subset: encoders of the other modalities are not needed
        encoders = {m: e for m, e in encoders.items() if m in prepared.modalities}
    unknown = sorted(set(encoders) - set(prepared.modalities))
    if unknown:
        raise MieInputError(f"model.encoders names unknown modality {', '.join(unknown)}; "
                            f"the data has {', '.join(prepared.modalities)}")
    for m in prepared.modalities:
        if m in prepared.token_modalities and m not in encoders:
            raise MieInputError(f"modality {m} holds token ids; name a text encoder, e.g. model.encoders.{m}=minilm "
                                f"(offline) or model.encoders.{m}={{name: bert, path: DIR}}")
        encoders.setdefault(m, default_encoder(prepared.input_shapes[m]))
    return ModelSpec(prepared.modalities, {m: tuple(s) for m, s in prepared.input_shapes.items()},
                     encoders, prepared.num_classes, model_cfg["dim"], tuple(model_cfg["head_hidden"]),
                     model_cfg["pretrained"])
