"""Figures: matplotlib (the optional extra ``mie[plot]``) without a display, PNGs written atomically.

``plot_folder(path)`` draws what a folder holds:
- a run (``mie train --out``: history.csv + metrics.json) → ``curves.png``: fused and per-modality
  validation accuracy and the loss over loop epochs, the epochs in which each modality trained
  shaded (MIE-family methods log it in history.csv's ``active`` column), the epoch validation chose
  marked. Its data is history.csv itself (and best_epoch of metrics.json).
- a comparison (``mie compare --out``: results.csv) → ``results.png``: fused and per-modality test
  accuracy per method, mean ± std over its seeds, with those numbers in ``results_plot.csv``; and
  ``curves.png`` in each of its run folders.
"""
import csv
import json
import math
from pathlib import Path

import numpy as np

from .errors import MieInputError
from .io import atomic_path, csv_text, write_text

INSTALL = "pip install 'mie[plot]'"
FUSED = "black"


def missing_extra():
    """None when matplotlib can be imported, else one line saying what to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"no plot drawn: matplotlib is not installed ({INSTALL})"
    return None


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    note = missing_extra()
    if note:
        raise MieInputError(note)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write ``fig`` as a PNG at ``path`` (complete or absent, never half-written) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    pyplot().close(fig)


# ---- reading what runs and comparisons wrote ----------------------------------------------
def read_rows(path):
    """The rows of a CSV this library wrote, as dicts of text; one error line when it has none."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise MieInputError(f"{path} holds no rows")
    return rows


def column(rows, key):
    """(N,) float64 values of ``key`` in ``rows``; NaN where a row leaves it empty or lacks it."""
    return np.array([float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows])


def stage_spans(rows):
    """[(modality, first loop epoch, last loop epoch)] of each run of consecutive epochs that trained
    the same modality (history.csv's ``active`` column); [] when the method logs none."""
    spans = []
    for r in rows:
        m, epoch = r.get("active") or None, int(r["epoch"])
        if m and spans and spans[-1][0] == m and spans[-1][2] == epoch - 1:
            spans[-1] = (m, spans[-1][1], epoch)
        elif m:
            spans.append((m, epoch, epoch))
    return spans


def loss_columns(rows, modalities):
    """(panel title, [(label, column)]) of the loss panel: validation losses (``val_loss``,
    ``val_loss_<m>``) when history.csv has them, else the training losses the method logged
    (``loss``, ``loss_fused``, ``loss_<m>``: means over each epoch's steps)."""
    present = lambda keys: [(label, k) for label, k in keys if np.isfinite(column(rows, k)).any()]
    val = present([("fused", "val_loss")] + [(m, f"val_loss_{m}") for m in modalities])
    if val:
        return "validation loss", val
    train = [("objective", "loss"), ("fused", "loss_fused")] + [(m, f"loss_{m}") for m in modalities]
    return "training loss (mean over the epoch's steps)", present(train)


# ---- a run --------------------------------------------------------------------------------
def run_figure(run_dir):
    """The curves figure of a finished run (not saved). Each line's gid is the history.csv column it
    draws, each shaded stage's gid ``stage:<modality>``, the chosen epoch's line gid ``best_epoch``."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir / "history.csv")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        modalities, best = list(metrics["modalities"]), int(metrics["best_epoch"])
    except (ValueError, KeyError, TypeError):
        raise MieInputError(f"{run_dir / 'metrics.json'} is damaged or not a mie run's metrics") from None
    if "val_accuracy" not in rows[0]:
        raise MieInputError(f"{run_dir / 'history.csv'} has no val_accuracy column; is it a mie run's history?")
    plt = pyplot()
    colors = {m: f"C{i}" for i, m in enumerate(modalities)}
    epochs = column(rows, "epoch")
    spans = stage_spans(rows)
    fig, (acc_ax, loss_ax) = plt.subplots(2, 1, figsize=(7.5, 6.4), sharex=True)
    for ax in (acc_ax, loss_ax):
        for m, first, last in spans:
            ax.axvspan(first - 0.5, last + 0.5, color=colors.get(m, "gray"), alpha=0.12, lw=0, gid=f"stage:{m}")
        ax.axvline(best, color="gray", ls="--", lw=1, gid="best_epoch")
        ax.grid(alpha=0.3)
    accuracy = [("fused", "val_accuracy")] + [(m, f"val_acc_{m}") for m in modalities if f"val_acc_{m}" in rows[0]]
    title, losses = loss_columns(rows, modalities)
    for ax, series in ((acc_ax, accuracy), (loss_ax, losses)):
        for label, key in series:
            y = column(rows, key)
            keep = np.isfinite(y)
            ax.plot(epochs[keep], y[keep], "o-", ms=3, lw=1.6 if label == "fused" else 1.2, label=label, gid=key,
                    color=colors.get(label, FUSED if label == "fused" else "gray"))
    chosen = [r for r in rows if int(r["epoch"]) == best]
    if chosen:
        acc_ax.plot([best], [float(chosen[0]["val_accuracy"])], "*", ms=12, color=FUSED, gid="best_point",
                    label=f"chosen: epoch {best} (validation {metrics.get('select_on', 'accuracy')})")
    for m in dict.fromkeys(m for m, _, _ in spans):
        acc_ax.plot([], [], "s", color=colors.get(m, "gray"), alpha=0.3, ms=9, label=f"{m} trained")
    acc_ax.set_ylabel("validation accuracy")
    acc_ax.legend(fontsize=7, ncol=2, loc="best")
    loss_ax.set_ylabel(title.split(" (")[0])
    loss_ax.set_title(title, fontsize=8)
    loss_ax.set_xlabel("loop epoch")
    if losses:
        loss_ax.legend(fontsize=7, loc="best")
    loss_ax.xaxis.get_major_locator().set_params(integer=True)
    acc_ax.set_title(f"{metrics.get('method', '?')}, seed {metrics.get('seed', '?')}, {metrics.get('data', '?')}: "
                     f"validation per epoch ({len(rows)} loop epochs)", fontsize=9)
    return fig


def plot_run(run_dir):
    """Write ``run_dir/curves.png``; returns its path."""
    path = Path(run_dir) / "curves.png"
    save_figure(run_figure(run_dir), path)
    return path


# ---- a comparison -------------------------------------------------------------------------
def results_summary(rows):
    """[{method, accuracy ("fused" or a modality), n, mean, std}] of test accuracy over each method's
    runs in results.csv ``rows`` (std: sample standard deviation, 0 for one run); a modality a method
    does not see has no row."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = [("fused", "test_accuracy")] + [(k[len("test_acc_"):], k) for k in rows[0] if k.startswith("test_acc_")]
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        for label, key in keys:
            values = column(mine, key)
            values = values[np.isfinite(values)]
            if len(values):
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                out.append({"method": method, "accuracy": label, "n": len(values), "mean": float(np.mean(values)),
                            "std": std})
    return out


def results_figure(summary):
    """Grouped bars of ``results_summary`` (not saved): one group per method, a bar per accuracy
    with its ± std error bar. Each bar's gid is ``<method>:<accuracy>``."""
    plt = pyplot()
    methods = list(dict.fromkeys(s["method"] for s in summary))
    labels = list(dict.fromkeys(s["accuracy"] for s in summary))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(methods) * max(1, len(labels) / 2) + 1.5), 3.8))
    for i, label in enumerate(labels):
        mine = [s for s in summary if s["accuracy"] == label]
        x = [methods.index(s["method"]) + (i - (len(labels) - 1) / 2) * width for s in mine]
        bars = ax.bar(x, [s["mean"] for s in mine], width, yerr=[s["std"] for s in mine], capsize=3,
                      color=FUSED if label == "fused" else f"C{i - 1}", alpha=0.85 if label == "fused" else 0.75,
                      label=label if label == "fused" else f"{label} alone", error_kw={"lw": 1, "ecolor": "dimgray"})
        for patch, s in zip(bars.patches, mine):
            patch.set_gid(f"{s['method']}:{label}")
    n = {s["method"]: s["n"] for s in summary if s["accuracy"] == "fused"}
    ax.set_xticks(range(len(methods)), [f"{m.replace(':', chr(10))}\n(n={n.get(m, '?')})" for m in methods],
                  fontsize=8)     # a variant's settings one per line
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("fused and per-modality test accuracy of the checkpoint validation chose", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(labels), loc="lower right")
    return fig


def plot_comparison(cmp_dir):
    """Write ``results.png`` and ``results_plot.csv`` in ``cmp_dir`` (each run's curves: ``mie plot
    <method>/seed_<s>``); returns one line naming them."""
    cmp_dir = Path(cmp_dir)
    rows = read_rows(cmp_dir / "results.csv")
    if "test_accuracy" not in rows[0] or "method" not in rows[0]:
        raise MieInputError(f"{cmp_dir / 'results.csv'} has no method and test_accuracy columns; "
                            "is it a `mie compare` table?")
    summary = results_summary(rows)
    write_text(cmp_dir / "results_plot.csv", csv_text(summary))
    save_figure(results_figure(summary), cmp_dir / "results.png")
    return f"plots: {cmp_dir / 'results.png'} (numbers in results_plot.csv)"


def is_run(folder):
    return (Path(folder) / "history.csv").is_file() and (Path(folder) / "metrics.json").is_file()


def plot_folder(folder):
    """The plots of a comparison folder (results.csv) or a run folder (history.csv + metrics.json);
    returns one line naming what was written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MieInputError(f"{folder} is not a folder; expected a run (mie train --out) or a comparison "
                            "(mie compare --out)")
    if (folder / "results.csv").is_file():
        return plot_comparison(folder)
    if is_run(folder):
        return f"plots: {plot_run(folder)}"
    raise MieInputError(f"{folder} holds neither a finished run (history.csv and metrics.json) nor a comparison "
                        "(results.csv)")
