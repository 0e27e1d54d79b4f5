"""mie: balanced multimodal classification — MIE (Modal-aware Interactive Enhancement) and the
baselines it is measured against.

    import mie
    data = mie.load_dataset("mfeat", ["pix", "zer"])
    result = mie.fit(data, method="mie", seed=0, epochs=30)
    result["test"]["accuracy"], result["test"]["per_modality"]["pix"]["accuracy"]
"""
from .data import DATASETS, MultimodalArrays, load_dataset, load_npz
from .errors import MieError, MieInputError, TrainingDivergedError
from .methods import METHODS, Method, create_method
from .train import fit

__version__ = "0.1.0"
__all__ = ["fit", "load_dataset", "load_npz", "MultimodalArrays", "create_method", "Method",
           "METHODS", "DATASETS", "MieError", "MieInputError", "TrainingDivergedError"]
