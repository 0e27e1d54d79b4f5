"""Side-by-side comparison: every method × every seed on the same data, splits and epoch budget.

Writes, under the output folder, one run folder per (method, seed), ``results.csv`` (one row
per run) and ``results.md`` (mean ± std over seeds per method: fused and per-modality test
metrics, validation accuracy, seconds per run). Finished runs are read back, unfinished ones
resumed, so an interrupted comparison continues where it stopped.
"""
import csv
import io
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

from . import config as config_mod
from .data.prepare import load_arrays
from .errors import MieInputError
from .io import write_text
from .methods import method_params
from .train import run


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
    arrays = load_arrays(cfg)
    out = Path(out_dir)
    rows = []
    for name in methods:
        for seed in seeds:
            run_cfg = method_config(cfg, name, overrides)
            run_cfg["train"]["seed"] = seed
            run_dir = out / name / f"seed_{seed}"
            metrics_path = run_dir / "metrics.json"
            if metrics_path.exists():
                result = json.loads(metrics_path.read_text())
            else:
                result = run(run_cfg, arrays, out_dir=run_dir, resume=True, progress=progress)
            rows.append(result_row(result))
            per = ", ".join(f"{m} {v['accuracy']:.3f}" for m, v in result["test"]["per_modality"].items())
            log(f"{name:>14} seed {seed}: test acc {result['test']['accuracy']:.4f} ({per})  "
                f"{result['seconds']:.1f}s")
    write_text(out / "results.csv", rows_csv(rows))
    write_text(out / "results.md", results_markdown(rows, cfg, methods, seeds, command))
    return rows


def result_row(result):
    row = {"method": result["method"], "seed": result["seed"],
           "test_accuracy": result["test"]["accuracy"], "test_macro_f1": result["test"]["macro_f1"],
           "test_map": result["test"]["map"]}
    row.update({f"test_acc_{m}": v["accuracy"] for m, v in result["test"]["per_modality"].items()})
    row.update({"val_accuracy": result["val"]["accuracy"], "best_epoch": result["best_epoch"],
                "loop_epochs": result["loop_epochs"], "seconds": result["seconds"]})
    return row


def rows_csv(rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def mean_std(values):
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


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


def results_markdown(rows, cfg, methods, seeds, command=None):
    """The comparison table: mean ± std over seeds for each method, best fused accuracy in bold."""
    metrics = [k for k in rows[0] if k.startswith("test_")] + ["val_accuracy"]
    label = {"test_accuracy": "test acc", "test_macro_f1": "test macro-F1", "test_map": "test MAP",
             "val_accuracy": "val acc"}
    header = ["method"] + [label.get(k, k.replace("test_acc_", "acc ")) for k in metrics] + ["s / run"]
    summary = {}
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        summary[name] = {k: mean_std([r[k] for r in mine]) for k in metrics + ["seconds"]}
    best = max(methods, key=lambda n: summary[n]["test_accuracy"][0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in methods:
        cells = [f"{summary[name][k][0]:.4f} ± {summary[name][k][1]:.4f}" for k in metrics]
        if name == best:
            cells[0] = f"**{cells[0]}**"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary[name]['seconds'][0]:.1f} |")
    data = cfg["data"]["dataset"] or cfg["data"]["path"]
    mods = ", ".join(r.replace("test_acc_", "") for r in rows[0] if r.startswith("test_acc_"))
    notes = [f"Data: {data} (modalities {mods}); seeds {', '.join(map(str, seeds))}; "
             f"{cfg['train']['epochs']} epochs per modality for every method; checkpoint chosen on "
             f"validation {cfg['train']['select_on']}, test read once.",
             "Columns `acc <modality>`: that modality's own head alone (test).",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}, Python {platform.python_version()}"
             + (f"; mie commit {source_revision()}." if source_revision() else ".")]
    if command:
        notes.insert(0, f"Command: `{command}`")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
