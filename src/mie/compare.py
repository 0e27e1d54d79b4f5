"""Side-by-side comparison: every method × every seed on the same data, splits and epoch budget.

Writes, under the output folder, one run folder per (method, seed), ``results.csv`` (one row
per run) and ``results.md`` (mean ± std over seeds per method: fused and per-modality test
metrics, validation accuracy, seconds per run). Finished runs are read back, unfinished ones
resumed, so an interrupted comparison continues where it stopped.
"""
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

from . import config as config_mod
from .data import DISK_DATASETS
from .data.prepare import load_arrays
from .errors import MieInputError
from .io import csv_text, write_text
from .methods import method_params
from .train import output_folder, run


def method_config(cfg, name, overrides):
    """``cfg`` with the method section of ``name``: its defaults, updated by those ``overrides``
    ({key: value}) that this method accepts."""
    params = method_params(name)
    out = config_mod.merge(cfg, {})
    out["method"] = {"name": name, **{k: v for k, v in overrides.items() if k in params}}
    return config_mod.validate(out)


def compare(cfg, methods, seeds, out_dir, method_overrides=None, progress=None, log=print, command=None):
    """Run the grid; return the per-run rows. ``cfg``'s method section is ignored: each method
    starts from its own defaults, and ``method_overrides`` ({key: value}) are applied to every
    method that has that hyper-parameter."""
    if not methods or not seeds:
        raise MieInputError("compare needs at least one method and one seed")
    for name in methods:
        method_params(name)  # unknown names fail before anything runs
    overrides = dict(method_overrides or {})
    unused = [k for k in overrides if not any(k in method_params(n) for n in methods)]
    if unused:
        raise MieInputError(f"no compared method has parameter(s) {', '.join(unused)}")
    out = output_folder(out_dir)
    arrays = None if cfg["data"]["dataset"] in DISK_DATASETS else load_arrays(cfg)   # disk: read per run
    rows = []
    for name in methods:
        for seed in seeds:
            result = run_or_load(method_config(cfg, name, overrides), seed, arrays, out / name / f"seed_{seed}",
                                 progress)
            rows.append(result_row(result))
            log(run_line(name, result))
    write_text(out / "results.csv", csv_text(rows))
    write_text(out / "results.md", results_markdown(rows, cfg, methods, seeds, command))
    return rows


def run_or_load(cfg, seed, data, run_dir, progress=None):
    """The result of one run: read back from ``run_dir`` when finished there, else trained
    (resuming from its last checkpoint when one exists)."""
    metrics_path = Path(run_dir) / "metrics.json"
    if metrics_path.exists():
        return json.loads(metrics_path.read_text())
    cfg = config_mod.merge(cfg, {"train": {"seed": seed}})
    return run(cfg, data, out_dir=run_dir, resume=True, progress=progress)


def run_line(label, result):
    per = ", ".join(f"{m} {v['accuracy']:.3f}" for m, v in result["test"]["per_modality"].items())
    return (f"{label:>16} seed {result['seed']}: test acc {result['test']['accuracy']:.4f} ({per})  "
            f"{result['seconds']:.1f}s")


def result_row(result):
    row = {"method": result["method"], "seed": result["seed"],
           "test_accuracy": result["test"]["accuracy"], "test_macro_f1": result["test"]["macro_f1"],
           "test_map": result["test"]["map"]}
    row.update({f"test_acc_{m}": v["accuracy"] for m, v in result["test"]["per_modality"].items()})
    row.update({"val_accuracy": result["val"]["accuracy"], "best_epoch": result["best_epoch"],
                "loop_epochs": result["loop_epochs"], "seconds": result["seconds"]})
    return row


def mean_std(values):
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


def results_table(rows, labels):
    """Markdown table, one line per label in ``labels`` (rows' "method"): mean ± std over its
    runs of every test metric, each modality's own accuracy, validation accuracy and seconds.
    A modality a method does not see is shown as –; the best fused accuracy is in bold."""
    columns = []
    for row in rows:
        columns += [k for k in row if k.startswith("test_") and k not in columns]
    columns.append("val_accuracy")
    names = {"test_accuracy": "test acc", "test_macro_f1": "test macro-F1", "test_map": "test MAP",
             "val_accuracy": "val acc"}
    header = ["method"] + [names.get(k, k.replace("test_acc_", "acc ")) for k in columns] + ["s / run"]
    summary = {}
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        summary[label] = {k: mean_std([float(r[k]) for r in mine]) for k in columns + ["seconds"]
                          if all(r.get(k) not in (None, "") for r in mine)}
    best = max(labels, key=lambda n: summary[n]["test_accuracy"][0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        cells = [f"{summary[label][k][0]:.4f} ± {summary[label][k][1]:.4f}" if k in summary[label] else "–"
                 for k in columns]
        if label == best:
            cells[0] = f"**{cells[0]}**"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {summary[label]['seconds'][0]:.1f} |")
    return "\n".join(lines)


def source_revision():
    """The git commit of the working directory (with "+changes" if it has uncommitted edits), or None."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine_line():
    revision = source_revision()
    return (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}"
            + (f"; mie commit {revision}." if revision else "."))


def protocol_line(cfg, seeds):
    return (f"Seeds {', '.join(map(str, seeds))}; {cfg['train']['epochs']} epochs per modality for every method; "
            f"checkpoint chosen on validation {cfg['train']['select_on']}, test read once. "
            "Columns `acc <modality>`: that modality's own prediction alone (test).")


def results_markdown(rows, cfg, methods, seeds, command=None):
    """The comparison table and what it was run on."""
    data = cfg["data"]["dataset"] or cfg["data"]["path"]
    mods = ", ".join(r.replace("test_acc_", "") for r in rows[0] if r.startswith("test_acc_"))
    notes = ([f"Command: `{command}`"] if command else []) + [
        f"Data: {data} (modalities {mods}).", protocol_line(cfg, seeds), machine_line()]
    return results_table(rows, methods) + "\n\n" + "\n".join(notes) + "\n"
