"""Re-compute a run's metrics from its saved checkpoint (``mie eval``)."""
from pathlib import Path

from .data import DISK_DATASETS
from .data.prepare import disk_datasets, load_arrays, prepare_arrays
from .errors import MieInputError
from .io import read_torch
from .methods import create_method
from .models import ModelSpec
from .optim import autocast_forwards
from .train import evaluate, loader, resolve_device


def load_checkpoint(path):
    path = Path(path)
    ckpt = read_torch(path, "cpu", "a mie checkpoint")
    if not isinstance(ckpt, dict) or "spec" not in ckpt:
        raise MieInputError(f"{path} is not a model checkpoint of mie; use checkpoints/best.pt of a run")
    return ckpt


def evaluate_checkpoint(checkpoint, data=None, split="test", device="auto", root=None):
    """Metrics of a saved model on ``split`` of ``data`` (default: the data it was trained on).

    The split is rebuilt from the run's config and seed, and features are standardised with the
    statistics saved at training time, so ``mie eval`` on the run's own data gives its test metrics.
    A benchmark read from disk is read again from its prepared folder (``root``, default the one
    it was trained from).
    """
    if split not in ("train", "val", "test"):
        raise MieInputError(f"split must be train, val or test, got '{split}'")
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["config"]
    spec = ModelSpec(**{**ckpt["spec"], "load_weights": False})
    if cfg["data"]["dataset"] in DISK_DATASETS and data is None:
        if root is not None:
            cfg = {**cfg, "data": {**cfg["data"], "root": str(root)}}
        dataset = disk_datasets(cfg)[split]
    else:
        if root is not None:
            raise MieInputError("--root is for benchmarks read from disk; this run trained on "
                                f"{cfg['data']['dataset'] or cfg['data']['path'] or 'arrays'}")
        dataset = _array_split(cfg, spec, ckpt, data, split)
    first, _ = dataset[0]
    for m in spec.modalities:
        if m not in first:
            raise MieInputError(f"the checkpoint needs modality {m}; the data has {', '.join(first)}")
        if tuple(first[m].shape) != tuple(spec.input_shapes[m]):
            raise MieInputError(f"{m} samples have shape {tuple(first[m].shape)}, the model expects "
                                f"{tuple(spec.input_shapes[m])}")
    params = dict(cfg["method"])
    method = create_method(params.pop("name"), **params)
    dev = resolve_device(device)
    method.model = method.build_model(spec).to(dev)
    method.model.load_state_dict(ckpt["model"])
    if cfg["train"]["amp"] == "bf16":
        autocast_forwards(method.model, dev)
    data_loader = loader(dataset, cfg["train"]["batch_size"], num_workers=cfg["train"]["num_workers"])
    metrics = evaluate(method, data_loader, dev, spec.modalities)
    return {"checkpoint": str(checkpoint), "epoch": ckpt["epoch"], "split": split, **metrics}


def _array_split(cfg, spec, ckpt, data, split):
    """``split`` of the run's arrays (or of ``data``), standardised with the saved statistics."""
    arrays = load_arrays(cfg, data)
    if arrays.modalities != spec.modalities:
        if not set(spec.modalities) <= set(arrays.modalities):
            raise MieInputError(f"the checkpoint needs modalities {', '.join(spec.modalities)}; "
                                f"the data has {', '.join(arrays.modalities)}")
        arrays = arrays.select(spec.modalities)
    for m in spec.modalities:
        if tuple(arrays.x[m].shape[1:]) != tuple(spec.input_shapes[m]):
            raise MieInputError(f"x_{m} samples have shape {arrays.x[m].shape[1:]}, the model expects "
                                f"{tuple(spec.input_shapes[m])}")
    return prepare_arrays(arrays, cfg, standardizer=ckpt["standardizer"]).datasets[split]
