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
