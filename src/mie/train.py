"""The training loop, the same for every method: epochs, validation, checkpoints, logs, resume.

    data  → three Datasets (train / val / test) of ({modality: tensor}, label)
    model = method.build_model(spec); method.setup(model, ctx)
    for each epoch: method.train_step(batch) …; method.end_epoch(); evaluate on validation;
                    keep the best checkpoint by validation; write history.csv and last.pt
    test is evaluated once, at the end, with the checkpoint validation chose.
"""
import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import config as config_mod
from . import distributed
from .data import DISK_DATASETS, call_with_options
from .data.prepare import load_arrays, prepare_arrays, prepare_datasets
from .errors import MieInputError
from .io import atomic_path, csv_text, save_torch, write_json, write_text
from .methods import create_method
from .metrics import classification_metrics
from .models import ModelSpec, default_encoder


@dataclass
class TrainContext:
    """What the loop offers a method during ``setup``."""
    modalities: list
    device: torch.device
    make_optimizer: callable     # params → torch.optim.Optimizer configured from train.*
    train_batches: callable      # () → iterator over unshuffled training batches (xs, y) on device
    val_batches: callable        # () → the same over validation (for methods that monitor it)
    epochs_per_modality: int
    steps_per_epoch: int


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MieInputError(f"train.device '{name}' is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MieInputError(f"train.device is '{name}' but CUDA is not available here; use cpu or auto")
    return device


def optimizer_factory(train):
    def make(params):
        params = list(params)
        if train["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"],
                                   weight_decay=train["weight_decay"])
        cls = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
        return cls(params, lr=train["lr"], betas=tuple(train["betas"]), weight_decay=train["weight_decay"])
    return make


def recording(make):
    """``make`` that also keeps every optimizer it builds in ``.optimizers`` (for the schedule)
    and, under torchrun, makes it average gradients over the ranks before each step."""
    def make_and_keep(params):
        optimizer = make(params)
        make_and_keep.optimizers.append(optimizer)
        if distributed.world_size() > 1:
            distributed.average_gradients_before_step(optimizer)
        return optimizer
    make_and_keep.optimizers = []
    return make_and_keep


def apply_lr_factor(optimizers, factor):
    """Scale every group's lr to ``factor`` × its unscheduled value; what a method set itself
    (MSLR's rates, MSES's stops) is kept, as groups remember the factor they carry."""
    for optimizer in optimizers:
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * factor / g.get("lr_factor", 1.0)
            g["lr_factor"] = factor


def to_device(batch, device, modalities):
    xs, y = batch
    return {m: xs[m].to(device, non_blocking=True) for m in modalities}, y.to(device, non_blocking=True)


def loader(dataset, batch_size, shuffle=False, generator=None, num_workers=0, seed=0):
    """Evaluation loaders keep every sample; the training loader drops a last batch of one
    sample (BatchNorm cannot train on it) and nothing else. Under torchrun the training loader
    gives each rank its shard of every epoch's permutation (``sampler.set_epoch``)."""
    sampler = None
    if shuffle and distributed.world_size() > 1:
        sampler = DistributedSampler(dataset, distributed.world_size(), distributed.rank(), shuffle=True, seed=seed)
    drop_last = shuffle and len(sampler or dataset) % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator, num_workers=num_workers, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available())


def autocast(device, amp):
    """Mixed precision for forward passes: ``amp`` "bf16" (bfloat16 autocast; parameters, gradients,
    optimizer states and GM covariances stay float32/float64, so no loss scaling is needed) or "off"."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def predict_all(method, data_loader, device, modalities, amp="off"):
    """Fused (N, K) and per-modality {m: (N, K)} probabilities, and labels (N,), over a loader."""
    method.model.eval()
    fused, per, ys = [], {m: [] for m in modalities}, []
    for batch in data_loader:
        xs, y = to_device(batch, device, modalities)
        with autocast(device, amp):
            f, p = method.predict(xs)
        fused.append(f.float().cpu())
        for m in modalities:
            per[m].append(p[m].float().cpu())
        ys.append(y.cpu())
    return (torch.cat(fused).numpy(), {m: torch.cat(v).numpy() for m, v in per.items()},
            torch.cat(ys).numpy())


def evaluate(method, data_loader, device, modalities, amp="off"):
    """The metrics dict (accuracy, macro_f1, map, per_modality) of ``method`` on a loader."""
    fused, per, y = predict_all(method, data_loader, device, modalities, amp)
    broken = [m for m, p in per.items() if not np.isfinite(p).all()] or ([] if np.isfinite(fused).all() else ["fused"])
    if broken:
        raise MieInputError(f"{method.name} predicts NaN/inf for {', '.join(broken)}: training diverged "
                            f"(a lower train.lr, or inputs of a sensible scale, usually help)")
    return classification_metrics(fused, per, y)


def _flat_val(metrics):
    row = {f"val_{k}": metrics[k] for k in ("accuracy", "macro_f1", "map")}
    row.update({f"val_acc_{m}": v["accuracy"] for m, v in metrics["per_modality"].items()})
    return row


def _tensorboard(out_dir, purge_step):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=purge_step)


def fit(data=None, method=None, *, config=None, out_dir=None, resume=False, seed=None, epochs=None,
        callbacks=(), progress=None, **method_params):
    """Train ``method`` on ``data`` with model selection on validation; return the run's metrics.

    data:    a ``MultimodalArrays``, a path to an .npz, a dict {"train", "val", "test"} of Datasets
             yielding ({modality: tensor}, label), or None to use the config's data section.
    method:  a registered name (``mie.METHODS``); ``method_params`` are its hyper-parameters.
    config:  a YAML path or a dict of sections (data, model, train, method); see ``mie.config``.
    out_dir: where metrics.json, history.csv, config.yaml, checkpoints/ and tensorboard/ go
             (None: nothing is written). ``resume=True`` continues from out_dir/checkpoints/last.pt.
    callbacks: functions ``f(epoch, row)`` called after each epoch's history row is written.

    Returns {"method", "method_params", "seed", "val", "test", "seconds", …} with "test" from
    the checkpoint chosen on validation; ``test["per_modality"][m]["accuracy"]`` per modality.
    """
    sections = {"train": {"seed": seed, "epochs": epochs}}
    if method is not None or method_params:
        sections["method"] = {"name": method, **method_params}
    cfg = config_mod.build_config(config, (), **sections)
    return run(cfg, data, out_dir=out_dir, resume=resume, callbacks=callbacks, progress=progress)


def disk_datasets(cfg):
    """{"train", "val", "test"} of the benchmark cfg data.dataset, read from cfg data.root."""
    d = cfg["data"]
    if not d["root"]:
        raise MieInputError(f"dataset '{d['dataset']}' is read from disk: pass --root DIR "
                            "(the folder `mie prepare` wrote)")
    bench = DISK_DATASETS[d["dataset"]]
    generic = {"carve_val": d["carve_val"]}
    if "modalities" in inspect.signature(bench.datasets).parameters:
        generic["modalities"] = d["modalities"]
    return call_with_options(bench.datasets, f"dataset '{bench.name}'", d["options"], d["root"],
                             cfg["train"]["seed"], **generic)


def prepare(cfg, data=None):
    if data is None and cfg["data"]["dataset"] in DISK_DATASETS:
        d = cfg["data"]
        return prepare_datasets(disk_datasets(cfg), cfg, d["dataset"],
                                f"{d['dataset']} prepared in {d['root']}, seed {cfg['train']['seed']}, "
                                f"options {d['options'] or '(defaults)'}")
    if cfg["data"]["options"]:
        raise MieInputError("data.options are read by benchmarks on disk only (mie datasets lists them)")
    if isinstance(data, dict):
        return prepare_datasets(data, cfg)
    return prepare_arrays(load_arrays(cfg, data), cfg)


def model_spec(cfg, prepared):
    encoders = dict(cfg["model"]["encoders"])
    if cfg["data"]["modalities"]:   # a chosen subset: encoders of the other modalities are not needed
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
                     encoders, prepared.num_classes, cfg["model"]["dim"], tuple(cfg["model"]["head_hidden"]),
                     cfg["model"]["pretrained"])


def run(cfg, data=None, *, out_dir=None, resume=False, callbacks=(), progress=None):
    """``fit`` with an already-validated config; the CLI and ``mie compare`` call this."""
    train_cfg, mcfg = cfg["train"], dict(cfg["method"])
    seed = train_cfg["seed"]
    if train_cfg["threads"] is not None:
        torch.set_num_threads(train_cfg["threads"])
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    device, amp = distributed.start(resolve_device(train_cfg["device"])), train_cfg["amp"]
    main = distributed.rank() == 0     # the rank that writes files and shows progress
    prepared = prepare(cfg, data)
    modalities = prepared.modalities
    spec = model_spec(cfg, prepared)
    method = create_method(mcfg.pop("name"), **mcfg)
    model = method.build_model(spec).to(device)

    generator = torch.Generator().manual_seed(seed)
    bs, workers = train_cfg["batch_size"], train_cfg["num_workers"]
    train_loader = loader(prepared.datasets["train"], bs, True, generator, workers, seed)
    eval_loaders = {s: loader(prepared.datasets[s], bs, num_workers=workers) for s in ("train", "val", "test")}

    def batches(split):
        return lambda: (to_device(batch, device, modalities) for batch in eval_loaders[split])

    make_optimizer = recording(optimizer_factory(train_cfg))
    ctx = TrainContext(modalities, device, make_optimizer, batches("train"), batches("val"),
                       train_cfg["epochs"], len(train_loader))
    method.setup(model, ctx)
    num_epochs = method.num_epochs(train_cfg["epochs"])

    out = Path(out_dir) if out_dir is not None else None
    state = {"epoch": 0, "best_score": -math.inf, "best_epoch": -1, "history": [], "seconds": 0.0,
             "best_val": None}
    best_state = None
    if out is not None:
        last = out / "checkpoints" / "last.pt"
        if last.exists() and not resume:
            raise MieInputError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        if resume and last.exists():
            ckpt = torch.load(last, map_location=device, weights_only=False)
            if ckpt["config"] != cfg:
                raise MieInputError(f"{last} was written with another config; resume with the same settings")
            model.load_state_dict(ckpt["model"])
            method.load_state_dict(ckpt["method"])
            generator.set_state(ckpt["generator"])
            torch.set_rng_state(ckpt["torch_rng"])
            state = ckpt["loop"]
            best_state = torch.load(out / "checkpoints" / "best.pt", map_location="cpu",
                                    weights_only=False)["model"]
        if main:
            write_text(out / "config.yaml", config_mod.dump(cfg))
            if prepared.indices is not None:
                _save_split(out, prepared)
    save = out is not None and main

    writer = _tensorboard(out, state["epoch"]) if save else None
    bar = tqdm(range(state["epoch"], num_epochs), initial=state["epoch"], total=num_epochs,
               desc=f"{method.name} seed {seed}", leave=False,
               disable=True if not main else (None if progress is None else not progress))
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        method.start_epoch(epoch)
        step, gamma = train_cfg["lr_step"], train_cfg["lr_gamma"]
        lr_factor = gamma ** (method.schedule_epoch(epoch) // step) if step else 1.0
        apply_lr_factor(make_optimizer.optimizers, lr_factor)
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        sums, counts = {}, {}
        for batch in train_loader:
            with autocast(device, amp):
                logs = method.train_step(*to_device(batch, device, modalities))
            for k, v in logs.items():
                sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
        row = {"epoch": epoch + 1, **{k: v / counts[k] for k, v in sums.items()}}
        if step:
            row["lr_factor"] = lr_factor
        if distributed.world_size() > 1:
            distributed.average_buffers(model)
        with autocast(device, amp):
            row.update(method.end_epoch(epoch))
        val = distributed.from_rank0(evaluate(method, eval_loaders["val"], device, modalities, amp))
        row.update(_flat_val(val))
        state["seconds"] += time.perf_counter() - t0
        row["seconds"] = state["seconds"]
        score = val[train_cfg["select_on"]]
        if score > state["best_score"]:
            state.update(best_score=score, best_epoch=epoch + 1, best_val=val)
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if save:
                save_torch(out / "checkpoints" / "best.pt", checkpoint_payload(cfg, spec, prepared, best_state,
                                                                                epoch + 1))
        state["history"].append(row)
        state["epoch"] = epoch + 1
        if save:
            write_text(out / "history.csv", csv_text(state["history"]))
            save_torch(out / "checkpoints" / "last.pt",
                       {"config": cfg, "model": model.state_dict(), "method": method.state_dict(),
                        "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                        "loop": state})
        if writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    writer.add_scalar(k, v, epoch + 1)
            writer.flush()
        bar.set_postfix(val_acc=f"{val['accuracy']:.3f}")
        for callback in callbacks:
            callback(epoch, row)
    bar.close()
    if writer is not None:
        writer.close()

    model.load_state_dict(best_state)
    test = distributed.from_rank0(evaluate(method, eval_loaders["test"], device, modalities, amp))
    result = {"method": method.name, "method_params": method.hparams(), "seed": seed,
              "data": prepared.name, "modalities": modalities, "num_classes": prepared.num_classes,
              "split": {"how": prepared.split_how,
                        "sizes": {s: len(d) for s, d in prepared.datasets.items()}},
              "epochs_per_modality": train_cfg["epochs"], "loop_epochs": num_epochs,
              "best_epoch": state["best_epoch"], "select_on": train_cfg["select_on"],
              "val": state["best_val"], "test": test, "seconds": round(state["seconds"], 3),
              "device": str(device), "processes": distributed.world_size()}
    if save:
        write_json(out / "metrics.json", result)
    return result


def _save_split(out, prepared):
    """split.npz: the train / val / test indices into the original arrays."""
    with atomic_path(out / "split.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **prepared.indices)


def checkpoint_payload(cfg, spec, prepared, model_state, epoch):
    """What ``mie eval`` needs to rebuild and re-run a model without the training state."""
    return {"config": cfg, "spec": vars(spec), "model": model_state, "epoch": epoch,
            "standardizer": prepared.standardizer, "classes": prepared.classes}
