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


def load_for_evaluation(checkpoint, data=None, split="test", device="auto", root=None):
    """(the checkpoint's method with its model loaded, in eval-ready state; ``split`` of ``data``
    (default: the data it was trained on); a loader over it; the checkpoint dict).

    The split is rebuilt from the run's config and seed, and features are standardised with the
    statistics saved at training time, so evaluating on the run's own data gives its test metrics.
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
    return method, data_loader, dev, ckpt


def evaluate_checkpoint(checkpoint, data=None, split="test", device="auto", root=None):
    """Metrics of a saved model on ``split`` of ``data`` (default: the data it was trained on);
    see ``load_for_evaluation``."""
    method, data_loader, dev, ckpt = load_for_evaluation(checkpoint, data, split, device, root)
    metrics = evaluate(method, data_loader, dev, method.model.modalities)
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


def evaluate_robustness(checkpoint, data=None, split="test", device="auto", root=None, rates=(), drops=(),
                        noises=(), mask_seed=0, out_dir=None):
    """The robustness report of a saved model (``mie.robustness``): rows for every missing rate,
    dropped modality set and noise level on ``split``, written to ``out_dir`` (default: the run's
    ``robustness`` folder). Returns (rows, Markdown, a note or None)."""
    from .robustness import robustness_rows, unknown_token_ids, write_report
    if not (rates or drops or noises):
        raise MieInputError("give at least one of --missing, --drop, --noise")
    method, data_loader, dev, ckpt = load_for_evaluation(checkpoint, data, split, device, root)
    spec = ModelSpec(**ckpt["spec"])
    rows = robustness_rows(method, data_loader, dev, rates, drops, noises, mask_seed, unknown_token_ids(spec))
    if out_dir is None:
        path = Path(checkpoint)
        out_dir = (path.parent.parent if path.parent.name == "checkpoints" else path.parent) / "robustness"
    cfg = ckpt["config"]
    name, seed, data_name = cfg["method"]["name"], cfg["train"]["seed"], cfg["data"]["dataset"] or "your data"
    title = (f"Robustness of {name} (seed {seed}, checkpoint of epoch {ckpt['epoch']} chosen on clean validation) "
             f"on the {split} split of {data_name}; masks and noise seeded with {mask_seed}.")
    text, note = write_report(rows, spec.modalities, out_dir, title, f"{name} (seed {seed}) on {data_name}, {split}")
    return rows, text, note
