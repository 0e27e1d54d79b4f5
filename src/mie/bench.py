"""``mie bench``: the wall time of methods trained side by side in one process, on the same data and
epoch budget, and where that time goes.

Every method (a name, or a variant ``name:key=value[:key=value]``, e.g. ``mie:rho=0.1``) is trained on
seed 0 for ``epochs`` epochs per modality, ``repeats`` times in turn (joint, mie, joint, mie, ...); the
fastest turn of each is kept. Per method: seconds per epoch of budget (fastest turn), the ratio to the
reference (joint when benched) as the median over the turns of the two runs' ratio within a turn,
with its smallest and largest (runs of one turn share the machine's state, so the paired ratio moves
less than one of fastest turns), the shares of the run's time in training steps, validation, the method's
``end_epoch`` (MIE: covariance and T) and waiting for training batches, training samples per second
of training-step time, loop epochs and optimizer steps. On a CUDA device, also the raw forward +
backward throughput of joint's model on cached on-device batches (``raw_throughput``), and
each method's samples per second as a fraction of it. Nothing is written unless ``out_dir`` is given.
"""
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import config as config_mod
from .compare import machine_line, method_config, parse_label
from .data import DISK_DATASETS
from .data.prepare import load_arrays, prepare_run
from .errors import MieInputError
from .io import csv_text, write_text
from .train import Run, run, start_process, to_device

PHASES = {"train_steps": "steps", "validation": "validation", "end_epoch": "end_epoch", "data_loading": "data"}


def label_config(cfg, label, method_overrides, epochs):
    """The run config of one benched method: its defaults ← ``method_overrides`` it accepts ← the
    label's own settings; seed 0, ``epochs`` epochs per modality."""
    name, params = parse_label(label)
    out = method_config(cfg, name, {**(method_overrides or {}), **params})
    return config_mod.merge(out, {"train": {"epochs": epochs, "seed": 0}})


def check_device(cfg):
    device = str(cfg["train"]["device"])
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MieInputError(f"--device {device}: no CUDA GPU is available here; bench on --device cpu")


def bench(cfg, labels, epochs=5, repeats=2, method_overrides=None, out_dir=None, log=print):
    """Time ``labels`` side by side (module docstring) → (rows, raw samples/s or None, markdown text);
    bench.md and bench.csv in ``out_dir`` when given."""
    if not labels:
        raise MieInputError("bench needs at least one method")
    if epochs < 1 or repeats < 1:
        raise MieInputError(f"--epochs and --repeats must be >= 1, got {epochs} and {repeats}")
    if len(set(labels)) != len(labels):
        raise MieInputError(f"--methods names a method twice: {','.join(labels)}")
    check_device(cfg)
    configs = {label: label_config(cfg, label, method_overrides, epochs) for label in labels}
    arrays = None if cfg["data"]["dataset"] in DISK_DATASETS else load_arrays(cfg)
    reference = "joint" if "joint" in labels else labels[0]
    fastest, turns = {}, {label: [] for label in labels}
    for turn in range(repeats):
        for label in labels:
            result = run(configs[label], arrays, progress=False)
            log(f"turn {turn + 1}/{repeats}: {label} {result['seconds']:.2f}s")
            turns[label].append(result["seconds"])
            if label not in fastest or result["seconds"] < fastest[label]["seconds"]:
                fastest[label] = result
    raw = None
    if fastest[reference]["device"].startswith("cuda"):
        raw = raw_throughput(label_config(cfg, "joint", method_overrides, epochs), arrays)
    rows = bench_rows(fastest, reference, epochs, raw, turns)
    text = bench_markdown(rows, reference, epochs, repeats, raw, fastest[reference]["device"])
    if out_dir is not None:
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise MieInputError(f"--out {out} is a file; expected a folder")
        write_text(out / "bench.csv", csv_text(rows))
        write_text(out / "bench.md", text)
    return rows, raw, text


def bench_rows(results, reference, epochs, raw=None, turns=None):
    """One row per method from its (fastest) run result: seconds per epoch of budget, ratio to
    ``reference`` (the median, smallest and largest over ``turns`` {label: [seconds of each turn]} of
    the ratio within a turn; of the results' seconds without ``turns``), phase shares of the run's
    seconds, samples/s of training-step time (and of ``raw`` when given)."""
    turns = turns or {label: [r["seconds"]] for label, r in results.items()}
    rows = []
    for label, r in results.items():
        seconds, timing = r["seconds"], r["timing"]
        ratios = [a / b for a, b in zip(turns[label], turns[reference])]
        per_sample = timing["train_samples"] / timing["train_steps"] if timing["train_steps"] > 0 else float("nan")
        row = {"method": label, "seconds_per_epoch": seconds / epochs, "ratio": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios),
               **{f"share_{k}": timing[k] / seconds if seconds > 0 else 0.0 for k in PHASES},
               "samples_per_second": per_sample, "loop_epochs": r["loop_epochs"],
               "optimizer_steps": r["budget"]["optimizer_steps"], "seconds": seconds}
        if raw:
            row["of_raw"] = per_sample / raw
        rows.append(row)
    return rows


def bench_markdown(rows, reference, epochs, repeats, raw, device):
    """The table of ``bench_rows`` and what it was measured on."""
    head = ["method", "s / epoch", f"× {reference}", "range", *(f"% {v}" for v in PHASES.values()), "samples/s",
            "loop epochs", "optimizer steps"] + (["of raw"] if raw else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['seconds_per_epoch']:.3f}", f"{r['ratio']:.2f}",
                 f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}",
                 *(f"{100 * r[f'share_{k}']:.1f}" for k in PHASES), f"{r['samples_per_second']:.0f}",
                 str(r["loop_epochs"]), str(r["optimizer_steps"])] + ([f"{100 * r['of_raw']:.0f}%"] if raw else [])
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Seed 0, {epochs} epochs per modality per method on {device}, trained side by side in one process, "
             f"{repeats} interleaved turns. s / epoch: the run's training and validation seconds per "
             f"epoch of budget, fastest turn. × {reference}: the median over the turns of the ratio of the two runs "
             "of one turn; range: its smallest and largest. Shares of those seconds: steps = training steps, "
             "validation = the loop's validation passes, end_epoch = the method's work between epochs "
             "(MIE: covariance and T), data = waiting for the next training batch. samples/s: training samples "
             "per second of training-step time."]
    if raw:
        notes.append(f"Raw: one forward + backward of joint's model on cached on-device batches, "
                     f"{raw:.0f} samples/s; of raw = samples/s ÷ raw (SAM's two passes per step halve it).")
    notes.append(machine_line())
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def raw_throughput(cfg, data=None, max_batches=16, steps=30, warmup=3):
    """Training samples per second of one forward + backward (cross-entropy of the fused logits, no
    optimizer step) of ``cfg``'s model (a late-fusion method such as joint), cycling over up to ``max_batches`` training batches cached on
    the device; the device is synchronised before and after the timed steps only."""
    device = start_process(cfg["train"])
    r = Run(cfg, prepare_run(cfg, data), device, None)
    batches = []
    for batch in r.train_loader:
        batches.append(to_device(batch, device, r.modalities))
        if len(batches) == max_batches:
            break
    r.model.train()

    def step(i):
        xs, y = batches[i % len(batches)]
        r.model.zero_grad(set_to_none=True)
        F.cross_entropy(r.method.logits(xs)[1], y).backward()
        return len(y)

    for i in range(warmup):
        step(i)
    r.synchronize()
    t0 = time.perf_counter()
    samples = sum(step(i) for i in range(steps))
    r.synchronize()
    return samples / (time.perf_counter() - t0)
