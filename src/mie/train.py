"""The training loop, the same for every method: epochs, validation, checkpoints, logs, resume.

    prepared = mie.data.prepare_run(cfg, data)           train / val / test Datasets
    run      = Run(cfg, prepared, device, out_dir)       model, method, loaders, optimizers
    run.restore(resume)
    for each epoch:
        row = run.train_epoch(epoch)                     method.training_step per batch, end_epoch
        run.validate(epoch, row)                         the loop's own pass; method.on_validation
        run.keep_best(epoch, ...); run.save_epoch(row)   best checkpoint by validation; last.pt
    run.test()                                           the checkpoint validation chose, read once
"""
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from . import config as config_mod
from . import distributed
from .data import prepare_run
from .data.torch_dataset import collate, with_modalities
from .errors import MieInputError, TrainingDivergedError
from .io import atomic_path, csv_text, read_torch, save_torch, write_json, write_text
from .methods import Batch, Step, create_method
from .metrics import classification_metrics
from .models import eval_mode
from .models.spec import model_spec
from .optim import autocast_forwards


@dataclass
class TrainContext:
    """What the loop offers a method during ``setup``."""
    modalities: list
    device: torch.device
    make_optimizer: callable     # (params or param groups, lr=None) → torch.optim.Optimizer from train.*
    train_batches: callable      # (shuffle=None) → iterator over the training ``Batch``es on device, in the
                                 # data's order, or, for an integer key, shuffled by (seed, key) (``Run``)
    evaluate: callable           # ("train" | "val", model=None, predict=None) → metrics of the model as it is
                                 # now (cached), or of another model the method trains
    epochs_per_modality: int


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


class Optimizers:
    """Every optimizer a method builds (``make``): configured from ``train.*``, averaging gradients over
    the ranks before each step under torchrun, and given its learning rates by the loop:
    group lr = initial lr × schedule factor × ``method.lr_scale(group name)`` (``apply``). Their updates
    are the multi-tensor (``foreach``) implementations on every device: a few kernel launches per step
    instead of a few per parameter tensor, with the same numbers as the per-tensor loop."""

    def __init__(self, train):
        self.train = train
        self.built = []          # (optimizer, initial lr of each group)
        self.steps = 0           # optimizer steps taken, all optimizers together

    def make(self, params, lr=None):
        t = self.train
        params, lr = list(params), t["lr"] if lr is None else lr
        if t["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(params, lr=lr, momentum=t["momentum"], weight_decay=t["weight_decay"],
                                        foreach=True)
        else:
            cls = torch.optim.AdamW if t["optimizer"] == "adamw" else torch.optim.Adam
            optimizer = cls(params, lr=lr, betas=tuple(t["betas"]), weight_decay=t["weight_decay"], foreach=True)
        if distributed.world_size() > 1:
            distributed.average_gradients_before_step(optimizer)
        optimizer.register_step_post_hook(self._count)
        self.built.append((optimizer, [g["lr"] for g in optimizer.param_groups]))
        return optimizer

    def _count(self, optimizer, args, kwargs):
        self.steps += 1

    def apply(self, factor, method):
        for optimizer, initial in self.built:
            for group, lr in zip(optimizer.param_groups, initial):
                group["lr"] = lr * factor * method.lr_scale(group.get("name"))


def schedule_factor(train, schedule_epoch):
    """lr_gamma^⌊e / lr_step⌋ for the method's schedule epoch e (1 without a step schedule)."""
    return train["lr_gamma"] ** (schedule_epoch // train["lr_step"]) if train["lr_step"] else 1.0


def loader(dataset, batch_size, shuffle=False, generator=None, num_workers=0, seed=0):
    """Evaluation loaders keep every sample and draw nothing from torch's global random state (their
    own ``generator``), so evaluating never changes a run's random numbers; the training loader drops
    a last batch of one sample (BatchNorm cannot train on it) and nothing else. Under torchrun the
    training loader gives each rank its shard of every epoch's permutation (``sampler.set_epoch``)."""
    sampler = None
    if shuffle and distributed.world_size() > 1:
        sampler = DistributedSampler(dataset, distributed.world_size(), distributed.rank(), shuffle=True, seed=seed)
    drop_last = shuffle and len(sampler or dataset) % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator if shuffle else torch.Generator(), num_workers=num_workers,
                      drop_last=drop_last, pin_memory=torch.cuda.is_available(), collate_fn=collate)


def usable_workers(requested):
    """``requested`` data-loading processes, at most as many as the cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(requested, cores)


def to_device(batch, device, modalities):
    """The ``Batch`` of ``batch``'s inputs of ``modalities`` (those it holds), labels and extras on ``device``."""
    xs, y, *extras = batch
    extras = {k: v.to(device, non_blocking=True) for k, v in extras[0].items()} if extras else {}
    return Batch({m: xs[m].to(device, non_blocking=True) for m in modalities if m in xs},
                 y.to(device, non_blocking=True), extras)


@torch.no_grad()
def predict_all(predict, model, data_loader, device, modalities):
    """Fused (N, K) and per-modality {m: (N, K)} probabilities of ``predict(xs)`` → (fused, {m: probs}),
    with ``model`` in eval mode, and labels (N,), over a loader."""
    fused, per, ys = [], {m: [] for m in modalities}, []
    with eval_mode(model):
        for batch in data_loader:
            xs, y = to_device(batch, device, modalities)
            f, p = predict(xs)
            fused.append(f.float().cpu())
            for m in modalities:
                per[m].append(p[m].float().cpu())
            ys.append(y.cpu())
    return (torch.cat(fused).numpy(), {m: torch.cat(v).numpy() for m, v in per.items()},
            torch.cat(ys).numpy())


def evaluate(method, data_loader, device, modalities, model=None, predict=None):
    """The metrics dict (accuracy, macro_f1, map, loss, per_modality) of ``method`` on a loader, or of
    ``predict`` with ``model`` (e.g. a copy a method trains) when given."""
    model, predict = (method.model, method.predict) if model is None else (model, predict)
    fused, per, y = predict_all(predict, model, data_loader, device, modalities)
    broken = [m for m, p in per.items() if not np.isfinite(p).all()] or ([] if np.isfinite(fused).all() else ["fused"])
    if broken:
        raise TrainingDivergedError(f"{method.name} predicts NaN/inf for {', '.join(broken)}: training diverged "
                                    f"(a lower train.lr, or inputs of a sensible scale, usually help)")
    return classification_metrics(fused, per, y)


def new_timing():
    """A run's wall-time breakdown: seconds in training steps, validation, the method's ``end_epoch``
    and waiting for the next training batch (they sum to the run's seconds), and training samples."""
    return {"train_steps": 0.0, "validation": 0.0, "end_epoch": 0.0, "data_loading": 0.0, "train_samples": 0}


class EpochLogs:
    """Per-step scalars summed on their device (float64) and read to the host once, at the epoch end."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, logs):
        for k, v in logs.items():
            v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self):
        return {k: float(v) / self.counts[k] for k, v in self.sums.items()}


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


def run(cfg, data=None, *, out_dir=None, resume=False, callbacks=(), progress=None, read_test=True):
    """``fit`` with an already-validated config; the CLI and ``mie compare`` call this. ``read_test=False``
    (a tuning trial, scored on validation): the test split is not evaluated and "test" is None."""
    out = output_folder(out_dir)
    device = start_process(cfg["train"])
    prepared = prepare_run(cfg, data)
    r = Run(cfg, prepared, device, out)
    r.restore(resume)
    for epoch in r.epochs(progress):
        row = r.train_epoch(epoch)
        r.validate(epoch, row)
        r.save_epoch(row)
        for callback in callbacks:
            callback(epoch, row)
    return r.finish(read_test)


def output_folder(out_dir):
    """``out_dir`` as a Path (None: nothing is written); refuses a path that is a file."""
    if out_dir is None:
        return None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MieInputError(f"--out {out} is a file; expected a folder for the run's outputs")
    return out


def start_process(train):
    """Threads, seeds, and the device of this process (joining torchrun's group when there is one)."""
    if train["threads"] is not None:
        torch.set_num_threads(train["threads"])
    torch.manual_seed(train["seed"])
    np.random.seed(train["seed"] % 2**32)
    return distributed.start(resolve_device(train["device"]))


class Run:
    """One training run: its model, method, loaders and optimizers, and the loop's state."""

    def __init__(self, cfg, prepared, device, out):
        self.cfg, self.prepared, self.device, self.out = cfg, prepared, device, out
        self.train_cfg = t = cfg["train"]
        self.main = distributed.rank() == 0       # the rank that writes files and shows progress
        self.modalities = prepared.modalities
        self.spec = model_spec(cfg["model"], prepared, cfg["data"]["modalities"])
        params = dict(cfg["method"])
        self.method = create_method(params.pop("name"), **params)
        self.model = self.method.build_model(self.spec).to(device)
        if t["amp"] == "bf16":
            autocast_forwards(self.model, device)

        self.generator = torch.Generator().manual_seed(t["seed"])
        bs, workers = t["batch_size"], usable_workers(t["num_workers"])
        self.train_loader = loader(prepared.datasets["train"], bs, True, self.generator, workers, t["seed"])
        self.epoch_loader = lambda data: loader(data, bs, True, self.generator, workers, t["seed"])
        self.eval_loaders = {s: loader(prepared.datasets[s], bs, num_workers=workers) for s in ("train", "val", "test")}
        self.optimizers = Optimizers(t)
        self.model_version, self._evaluated, self._val_logits = 0, {}, {}
        ctx = TrainContext(self.modalities, device, self.optimizers.make, self.train_batches, self.evaluate_for_method,
                           t["epochs"])
        self.method.setup(self.model, ctx)
        self.num_epochs = self.method.num_epochs(t["epochs"])
        self.state = {"epoch": 0, "steps": 0, "best_score": -math.inf, "best_epoch": -1, "history": [],
                      "seconds": 0.0, "best_val": None, "optimizer_steps": 0,
                      "modality_epochs": {m: 0 for m in self.modalities}, "timing": new_timing()}
        self.notices = [f"{self.method.name}: {n}" for n in self.method.notices()]
        if workers < t["num_workers"]:
            self.notices.append(f"train.num_workers={t['num_workers']} is more data-loading processes than the "
                                f"{workers} cores this process may use; using {workers}")
        self.best_model = None
        self.writer = None

    # ---- what the method gets through the context ---------------------------------------
    def train_batches(self, shuffle=None):
        """The training data in batches of train.batch_size: every sample once in the data's order, or, for
        an integer ``shuffle``, as a shuffled training loader gives them (a permutation drawn from
        (train.seed, shuffle) alone — the same on every rank and after a resume, nothing drawn from the
        run's random streams — and the last incomplete batch dropped)."""
        batches = self.eval_loaders["train"]
        if shuffle is not None:
            order = torch.Generator().manual_seed(self.train_cfg["seed"] * 1_000_003 + shuffle)
            batches = DataLoader(self.prepared.datasets["train"], batch_size=batches.batch_size,
                                 sampler=RandomSampler(self.prepared.datasets["train"], generator=order),
                                 num_workers=batches.num_workers, collate_fn=collate, generator=torch.Generator(),
                                 drop_last=len(self.prepared.datasets["train"]) >= batches.batch_size)
        return (to_device(batch, self.device, self.modalities) for batch in batches)

    def evaluate(self, split):
        """Metrics of the model as it is now on ``split``; computed once per state of the model. For a
        method with ``separate_modalities``, validation recomputes only the logits of the modalities
        trained since their last pass. Validation first calls ``method.fit_on_validation`` when the
        method fits something there (``fits_on_validation``: the "fitted" fusion)."""
        cached = self._evaluated.get(split)
        if cached is None or cached[0] != self.model_version:
            if split == "val" and self.method.fits_on_validation:
                self.method.fit_on_validation(*self.val_logits())     # buffers of the model: it changed
                self.model_changed()
            predict = self.val_predict() if split == "val" and self.method.separate_modalities else None
            metrics = distributed.from_rank0(evaluate(self.method, self.eval_loaders[split], self.device,
                                                      self.modalities, self.model if predict else None, predict))
            self._evaluated[split] = cached = (self.model_version, metrics)
        return cached[1]

    @torch.no_grad()
    def cached_val_logits(self):
        """({m: [modality m's ``method.modality_logits`` (own, share) of each validation batch]}, [labels of
        each batch]), kept per modality and recomputed only when that modality was trained since."""
        with eval_mode(self.model):
            for m in self.modalities:
                version = self.state["modality_epochs"][m]
                if self._val_logits.get(m, (None,))[0] != version:
                    outputs, labels = [], []
                    for batch in self.eval_loaders["val"]:
                        xs, y = to_device(batch, self.device, [m])
                        outputs.append(self.method.modality_logits(m, xs[m]))
                        labels.append(y)
                    self._val_logits[m] = (version, outputs, labels)
        return {m: self._val_logits[m][1] for m in self.modalities}, self._val_logits[self.modalities[0]][2]

    def val_predict(self):
        """A ``predict`` over the validation loader's batches, in order, from ``cached_val_logits``: the fused
        logits are the sum of the modalities' shares when they have them."""
        batches = iter(zip(*self.cached_val_logits()[0].values()))

        def predict(xs):
            outputs = next(batches)
            shares = [share for _, share in outputs]
            fused = None if shares[0] is None else sum(shares)
            return self.method.predict_from_logits({m: own for m, (own, _) in zip(self.modalities, outputs)}, fused)
        return predict

    @torch.no_grad()
    def val_logits(self):
        """({m: modality m's logits (N, K)}, labels (N,)) over the whole validation split, in order: from
        ``cached_val_logits`` under ``separate_modalities``, else from one pass of ``method.logits``."""
        if self.method.separate_modalities:
            outputs, labels = self.cached_val_logits()
            per = {m: [own for own, _ in batches] for m, batches in outputs.items()}
        else:
            per, labels = {m: [] for m in self.modalities}, []
            with eval_mode(self.model):
                for batch in self.eval_loaders["val"]:
                    xs, y = to_device(batch, self.device, self.modalities)
                    logits, _ = self.method.logits(xs)
                    for m in self.modalities:
                        per[m].append(logits[m])
                    labels.append(y)
        return {m: torch.cat(z).float() for m, z in per.items()}, torch.cat(labels)

    def evaluate_for_method(self, split, model=None, predict=None):
        """``evaluate`` of train or val (a method never sees the test split, read once at the end); with
        ``model`` and ``predict`` (xs → (fused probs, {m: probs})), of another model the method trains,
        such as OGR-GB's copies (not cached)."""
        if split not in ("train", "val"):
            raise ValueError(f"a method may evaluate 'train' or 'val', not {split!r}: test is read once, at the end")
        if model is None:
            return self.evaluate(split)
        return distributed.from_rank0(evaluate(self.method, self.eval_loaders[split], self.device, self.modalities,
                                               model, predict))

    def improves(self, score, loss):
        """Whether validation's ``score`` (``train.select_on``) beats the chosen checkpoint's, ties going to the
        lower validation loss: on a small validation split accuracy saturates early (every epoch after
        one may score 1.0), and the first epoch to reach it is not the best trained."""
        best = self.state["best_score"]
        return score > best or (score == best and loss < self.state["best_val"]["loss"])

    def model_changed(self):
        self.model_version += 1

    # ---- stages ------------------------------------------------------------------------
    def restore(self, resume):
        """Continue from out/checkpoints/last.pt when resuming; write config.yaml and split.npz."""
        if self.out is None:
            return
        last = self.out / "checkpoints" / "last.pt"
        if last.exists() and not resume:
            raise MieInputError(f"{self.out} already holds a run; pass --resume to continue it, or choose another --out")
        if resume and last.exists():
            ckpt = read_torch(last, self.device, "the run's last checkpoint")
            if not isinstance(ckpt, dict) or ckpt.get("config") != self.cfg:
                raise MieInputError(f"{last} was written with another config; resume with the same settings")
            self.model.load_state_dict(ckpt["model"])
            self.method.load_state_dict(ckpt["method"])
            self.generator.set_state(ckpt["generator"])
            torch.set_rng_state(ckpt["torch_rng"])
            self.state = {**self.state, **ckpt["loop"]}
            self.optimizers.steps = self.state["optimizer_steps"]
            self.best_model = read_torch(self.out / "checkpoints" / "best.pt", "cpu", "the run's best checkpoint")["model"]
        if self.main:
            write_text(self.out / "config.yaml", config_mod.dump(self.cfg))
            if self.prepared.indices is not None:
                with atomic_path(self.out / "split.npz") as tmp, open(tmp, "wb") as f:
                    np.savez(f, **self.prepared.indices)
            self.writer = _tensorboard(self.out, self.state["epoch"])

    def epochs(self, progress):
        if self.main:
            for notice in self.notices:
                tqdm.write(f"mie: note: {notice}", file=sys.stderr)
        start = self.state["epoch"]
        self.bar = tqdm(range(start, self.num_epochs), initial=start, total=self.num_epochs,
                        desc=f"{self.method.name} seed {self.train_cfg['seed']}", leave=False,
                        disable=True if not self.main else (None if progress is None else not progress))
        return self.bar

    def train_epoch(self, epoch):
        """The method's steps over one shuffled pass of the training data, then its ``end_epoch``."""
        t0 = time.perf_counter()
        method, t = self.method, self.train_cfg
        self.model.train()
        method.start_epoch(epoch)
        factor = schedule_factor(t, method.schedule_epoch(epoch))
        self.optimizers.apply(factor, method)
        data = method.training_data(epoch, self.prepared.datasets["train"])
        inputs = method.training_inputs(epoch)
        if inputs is not None and set(inputs) != set(self.modalities):
            data = with_modalities(data, inputs)        # the same samples and order, fewer files read
        batches = self.train_loader if data is self.prepared.datasets["train"] else self.epoch_loader(data)
        if isinstance(batches.sampler, DistributedSampler):
            batches.sampler.set_epoch(epoch)
        logs, n, timing = EpochLogs(), len(batches), self.state["timing"]
        waited, samples, t_wait = 0.0, 0, time.perf_counter()
        for index, batch in enumerate(batches):
            waited += time.perf_counter() - t_wait
            samples += len(batch[1])
            step = Step(epoch, index, n, self.state["steps"])
            logs.add(method.training_step(to_device(batch, self.device, self.modalities), step))
            self.state["steps"] += 1
            self.model_changed()
            t_wait = time.perf_counter()
        waited += time.perf_counter() - t_wait
        self.synchronize()
        t1 = time.perf_counter()
        for m in method.trained_modalities(epoch):
            self.state["modality_epochs"][m] += 1
        self.state["optimizer_steps"] = self.optimizers.steps
        row = {"epoch": epoch + 1, **logs.means()}
        if t["lr_step"]:
            row["lr_factor"] = factor
        if distributed.world_size() > 1:
            distributed.average_buffers(self.model)
        row.update(method.end_epoch(epoch))
        self.model_changed()
        self.synchronize()
        t2 = time.perf_counter()
        timing["train_steps"] += t1 - t0 - waited
        timing["data_loading"] += waited
        timing["end_epoch"] += t2 - t1
        timing["train_samples"] += samples
        self.state["seconds"] += t2 - t0
        return row

    def synchronize(self):
        """Wait for the device's queued work (CUDA only), so that a phase's wall time is its own."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def validate(self, epoch, row):
        """The loop's validation pass, the method's ``on_validation``, and the best checkpoint so far."""
        t0 = time.perf_counter()
        val = self.evaluate("val")
        row.update(self.method.on_validation(epoch, val))
        row.update({f"val_{k}": val[k] for k in ("accuracy", "macro_f1", "map")})
        row.update({f"val_acc_{m}": v["accuracy"] for m, v in val["per_modality"].items()})
        row["val_loss"] = val["loss"]
        row.update({f"val_loss_{m}": v["loss"] for m, v in val["per_modality"].items()})
        score = val[self.train_cfg["select_on"]]
        if self.improves(score, val["loss"]):
            self.state.update(best_score=score, best_epoch=epoch + 1, best_val=val)
            self.best_model = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            if self.out is not None and self.main:
                save_torch(self.out / "checkpoints" / "best.pt", self.checkpoint(self.best_model, epoch + 1))
        seconds = time.perf_counter() - t0
        self.state["timing"]["validation"] += seconds
        self.state["seconds"] += seconds
        row["seconds"] = self.state["seconds"]
        self.bar.set_postfix(val_acc=f"{val['accuracy']:.3f}")

    def save_epoch(self, row):
        """history.csv, last.pt and TensorBoard scalars after each epoch."""
        self.state["history"].append(row)
        self.state["epoch"] = row["epoch"]
        if self.out is None or not self.main:
            return
        write_text(self.out / "history.csv", csv_text(self.state["history"]))
        self.method.write_files(self.out, final=row["epoch"] == self.num_epochs)
        if self.method.keep_model(row["epoch"] - 1):
            save_torch(self.out / "checkpoints" / f"epoch_{row['epoch']}.pt",
                       self.checkpoint(self.model.state_dict(), row["epoch"]))
        save_torch(self.out / "checkpoints" / "last.pt",
                   {"config": self.cfg, "model": self.model.state_dict(), "method": self.method.state_dict(),
                    "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "loop": self.state})
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def finish(self, read_test=True):
        """Test metrics of the checkpoint validation chose, read once (None without ``read_test``);
        metrics.json."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.model.load_state_dict(self.best_model)
        self.model_changed()
        test = self.evaluate("test") if read_test else None
        s, t = self.state, self.train_cfg
        result = {"method": self.method.name, "method_params": self.method.hparams(), "seed": t["seed"],
                  "data": self.prepared.name, "modalities": self.modalities, "num_classes": self.prepared.num_classes,
                  "split": {"how": self.prepared.split_how,
                            "sizes": {k: len(d) for k, d in self.prepared.datasets.items()}},
                  "epochs_per_modality": t["epochs"], "loop_epochs": self.num_epochs,
                  "budget": {"modality_epochs": dict(s["modality_epochs"]), "optimizer_steps": s["optimizer_steps"],
                             "stops_early": self.method.stops_early},
                  "notices": self.notices,
                  "best_epoch": s["best_epoch"], "select_on": t["select_on"],
                  "val": s["best_val"], "test": test, "seconds": round(s["seconds"], 3),
                  "timing": {k: round(v, 3) if isinstance(v, float) else v for k, v in s["timing"].items()},
                  "device": str(self.device), "processes": distributed.world_size()}
        if self.out is not None and self.main:
            write_json(self.out / "metrics.json", result)
        return result

    def checkpoint(self, model_state, epoch):
        """What ``mie eval`` needs to rebuild and re-run a model without the training state."""
        return {"config": self.cfg, "spec": vars(self.spec), "model": model_state, "epoch": epoch,
                "standardizer": self.prepared.standardizer, "classes": self.prepared.classes}


def _tensorboard(out_dir, purge_step):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=purge_step)
