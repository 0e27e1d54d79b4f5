"""From a config and some data to the three torch Datasets a run trains and evaluates on:
``prepare_run(cfg, data)`` is the one call the training loop makes."""
import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import MieInputError
from .arrays import MultimodalArrays, load_npz
from .disk import call_with_options
from .splits import resolve_split
from .standardize import apply_standardizer, fit_standardizer
from .torch_dataset import ArrayDataset, with_modalities


@dataclass
class PreparedData:
    datasets: dict            # {"train", "val", "test"} → Dataset of ({m: tensor}, label)
    modalities: list
    input_shapes: dict        # modality → shape of one sample
    num_classes: int
    name: str
    split_how: str = ""
    indices: dict = None      # split → indices into the original arrays (array data only)
    standardizer: dict = field(default_factory=dict)   # modality → (mean, std)
    classes: list = None
    token_modalities: list = field(default_factory=list)   # modalities whose samples are integer ids


def load_arrays(cfg, data=None):
    """The run's arrays: ``data`` itself, an npz path, or cfg data.path / data.dataset."""
    from . import load_dataset  # the registry imports this module's siblings
    d = cfg["data"]
    if isinstance(data, MultimodalArrays):
        arrays = data
    elif isinstance(data, str) or d["path"]:
        arrays = load_npz(data if isinstance(data, str) else d["path"])
    elif d["dataset"]:
        return load_dataset(d["dataset"], d["modalities"])
    else:
        raise MieInputError("no data: give --data FILE.npz or --dataset NAME (see `mie datasets`)")
    return arrays.select(d["modalities"]) if d["modalities"] else arrays


def split_seed(cfg):
    """The seed the train/val/test split and the validation carve are drawn from: data.split_seed, or
    the run's train.seed when that is None (or absent, in configs written before it existed)."""
    seed = cfg["data"].get("split_seed")
    return cfg["train"]["seed"] if seed is None else seed


def prepare_arrays(arrays, cfg, standardizer=None):
    """Split (train/val/test), standardise with train statistics, wrap as Datasets."""
    d, seed = cfg["data"], split_seed(cfg)
    if d["num_classes"] is not None:
        if arrays.num_classes > d["num_classes"] or (arrays.classes and len(arrays.classes) != d["num_classes"]):
            raise MieInputError(f"data.num_classes={d['num_classes']} but the labels need {arrays.num_classes}")
        arrays.classes = arrays.classes or [str(c) for c in range(d["num_classes"])]
    indices, how = resolve_split(arrays, seed, d["val_fraction"], d["test_fraction"], d["carve_val"])
    if standardizer is None:
        standardizer = ({m: fit_standardizer(a[indices["train"]]) for m, a in arrays.x.items()}
                        if d["standardize"] else {})
    datasets = {}
    for split, idx in indices.items():
        x = {m: (apply_standardizer(a[idx], standardizer[m]) if m in standardizer else a[idx])
             for m, a in arrays.x.items()}
        datasets[split] = ArrayDataset(x, arrays.y[idx])
    return PreparedData(datasets, arrays.modalities, {m: a.shape[1:] for m, a in arrays.x.items()},
                        arrays.num_classes, arrays.name, how, indices, standardizer,
                        arrays.classes or [str(c) for c in range(arrays.num_classes)])


def prepare_datasets(datasets, cfg, name="datasets", how="the given train/val/test datasets"):
    """Use Datasets {"train", "val", "test"}, each yielding ({m: tensor}, label): a user's own, or
    a benchmark's read from disk."""
    missing = [s for s in ("train", "val", "test") if s not in datasets]
    if missing:
        raise MieInputError(f"datasets must have the keys train, val and test; missing {', '.join(missing)}")
    first, _ = datasets["train"][0]
    if not isinstance(first, dict) or not first:
        raise MieInputError("each sample must be ({modality: tensor}, label)")
    modalities = cfg["data"]["modalities"] or list(first)
    unknown = [m for m in modalities if m not in first]
    if unknown:
        raise MieInputError(f"unknown modality {', '.join(unknown)}; the samples have {', '.join(first)}")
    if set(modalities) != set(first):        # the others' inputs are not read (where the datasets can say so)
        datasets = {s: with_modalities(ds, modalities) for s, ds in datasets.items()}
    k = cfg["data"]["num_classes"] or getattr(datasets["train"], "num_classes", None)
    if k is None:
        k = 1 + max(int(torch.as_tensor(datasets["train"][i][1])) for i in range(len(datasets["train"])))
    tokens = [m for m in modalities if not torch.as_tensor(first[m]).is_floating_point()]
    return PreparedData(dict(datasets), modalities, {m: tuple(np.shape(first[m])) for m in modalities},
                        int(k), name, how, classes=getattr(datasets["train"], "classes", None),
                        token_modalities=tokens)


def disk_datasets(cfg):
    """{"train", "val", "test"} of the benchmark cfg data.dataset, read from cfg data.root."""
    from . import DISK_DATASETS  # the registry imports this module's siblings
    d = cfg["data"]
    if not d["root"]:
        raise MieInputError(f"dataset '{d['dataset']}' is read from disk: pass --root DIR "
                            "(the folder `mie prepare` wrote)")
    bench = DISK_DATASETS[d["dataset"]]
    generic = {"carve_val": d["carve_val"]}
    if "modalities" in inspect.signature(bench.datasets).parameters:
        generic["modalities"] = d["modalities"]
    return call_with_options(bench.datasets, f"dataset '{bench.name}'", d["options"], d["root"],
                             split_seed(cfg), **generic)


def prepare_run(cfg, data=None):
    """The ``PreparedData`` of a run: ``data`` (arrays, an npz path, or a dict of Datasets) or, when
    None, what the config's data section names (a built-in dataset, an npz, a benchmark on disk)."""
    from . import DISK_DATASETS
    d = cfg["data"]
    if data is None and d["dataset"] in DISK_DATASETS:
        return prepare_datasets(disk_datasets(cfg), cfg, d["dataset"],
                                f"{d['dataset']} prepared in {d['root']}, seed {split_seed(cfg)}, "
                                f"options {d['options'] or '(defaults)'}")
    if d["options"]:
        raise MieInputError("data.options are read by benchmarks on disk only (mie datasets lists them)")
    if isinstance(data, dict):
        return prepare_datasets(data, cfg)
    return prepare_arrays(load_arrays(cfg, data), cfg)
