"""Side-by-side comparison: every method × every seed on the same data, splits and epoch budget.

A method is a name or a variant of one, ``name:key=value[:key=value]`` (``mie:sam_every=8``), so that
settings of one method can be compared side by side and paired. Writes, under the output folder, one
run folder per (method, seed), ``results.csv`` (one row
per run, with the epochs of updates each modality received and the optimizer steps) and
``results.md``: mean ± std over n seeds per method (fused and per-modality test metrics,
validation accuracy, seconds per run), and each method's paired difference in test accuracy to a
reference method over the seeds both ran, with its 95% t-interval and the seeds won. A grid whose
methods did not give every modality the same ``train.epochs`` epochs of updates is refused, unless
a method stops a modality early by design (MSES), which the table marks. With ``robustness``, each
run's fused test accuracy averaged over the missing rates 0, 0.1, …, 0.9 is a column too. Finished
runs are read back, unfinished ones resumed, so an interrupted comparison continues where it stopped.
"""
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch
import yaml

from . import config as config_mod
from .data import DISK_DATASETS
from .data.prepare import load_arrays
from .errors import MieInputError
from .io import csv_text, write_text
from .methods import method_params
from .train import output_folder, run


def method_config(cfg, name, overrides, own=None):
    """``cfg`` with the method section of ``name``: its defaults, updated by those ``overrides``
    ({key: value}) that this method accepts, then by ``own`` ({key: value}, this method's alone: a
    parameter of it, or a ``section.key`` of the config such as train.lr)."""
    params = method_params(name)
    own = own or {}
    out = config_mod.merge(cfg, {})
    out["method"] = {"name": name, **{k: v for k, v in overrides.items() if k in params},
                     **{k: v for k, v in own.items() if "." not in k}}
    for key, value in own.items():
        section, dot, field = key.partition(".")
        if dot and (section not in ("data", "model", "train") or not field or "." in field):
            raise MieInputError(f"setting '{key}' of {name}: expected a parameter of it or data|model|train.<key>")
        if dot:
            out[section][field] = value
    return config_mod.validate(out)


def parse_label(label):
    """A method label → (method name, its settings): 'mie' → ('mie', {}); a variant
    'mie:rho=0.1:sam_every=2' → ('mie', {'rho': 0.1, 'sam_every': 2}), values read as YAML."""
    name, *settings = label.split(":")
    accepted = method_params(name)   # an unknown method fails here, before anything runs
    params = {}
    for text in settings:
        key, eq, value = text.partition("=")
        if not eq or key not in accepted:
            raise MieInputError(f"cannot read '{text}' in --methods {label}: expected key=value with a parameter "
                                f"of {name} ({', '.join(accepted) or 'none'})")
        params[key] = yaml.safe_load(value)
    return name, params


def compare(cfg, methods, seeds, out_dir, method_overrides=None, progress=None, log=print, command=None,
            reference=None, robustness=False, method_settings=None):
    """Run the grid; return the per-run rows. ``methods``: method names or variants of them
    ('mie:sam_every=8', ``parse_label``). ``cfg``'s method section is ignored: each method
    starts from its own defaults, and ``method_overrides`` ({key: value}) are applied to every
    method that has that hyper-parameter; ``method_settings`` ({method: {key: value}}) to that method
    alone (its parameters, or ``section.key`` settings such as train.lr: e.g. each one's tuned values,
    ``mie tune``). ``reference``: the method every other is paired with
    (default ``joint`` when compared, else the first method). ``robustness``: also each run's fused
    test accuracy averaged over the missing rates 0, 0.1, …, 0.9 (``mie.robustness``)."""
    if not methods or not seeds:
        raise MieInputError("compare needs at least one method and one seed")
    reference = reference_method(methods, reference)
    if len(set(methods)) != len(methods):
        raise MieInputError(f"--methods names a method twice: {','.join(methods)}")
    variants = {label: parse_label(label) for label in methods}   # unknown names fail before anything runs
    overrides = dict(method_overrides or {})
    unused = [k for k in overrides if not any(k in method_params(n) for n, _ in variants.values())]
    if unused:
        raise MieInputError(f"no compared method has parameter(s) {', '.join(unused)}")
    settings = dict(method_settings or {})
    strangers = [m for m in settings if m not in methods]
    if strangers:
        raise MieInputError(f"settings given for {', '.join(strangers)}, which is not compared")
    configs = {label: method_config(cfg, name, overrides, {**own, **settings.get(label, {})})
               for label, (name, own) in variants.items()}
    out = output_folder(out_dir)
    arrays = None if cfg["data"]["dataset"] in DISK_DATASETS else load_arrays(cfg)   # disk: read per run
    rows = []
    for name in methods:
        for seed in seeds:
            result = run_or_load(configs[name], seed, arrays, out / name / f"seed_{seed}", progress)
            check_budget(result, cfg["train"]["epochs"])
            row = {**result_row(result), "method": name}
            if robustness:
                row["test_missing_acc"] = missing_rate_accuracy(out / name / f"seed_{seed}", arrays)
            rows.append(row)
            log(run_line(name, result))
    write_text(out / "results.csv", csv_text(rows))
    write_text(out / "results.md", results_markdown(rows, cfg, methods, seeds, command, reference))
    return rows


def reference_method(methods, reference=None):
    """The method the others are paired with: ``reference``, else joint if compared, else the first."""
    if reference is None:
        return "joint" if "joint" in methods else methods[0]
    if reference not in methods:
        raise MieInputError(f"--reference {reference} is not among the compared methods: {', '.join(methods)}")
    return reference


def check_budget(result, epochs):
    """Refuse a run that did not give each of its modalities ``epochs`` epochs of updates, unless its
    method stops modalities early by design."""
    budget = result["budget"]
    trained = budget["modality_epochs"]
    if not budget["stops_early"] and any(n != epochs for n in trained.values()):
        raise MieInputError(f"{result['method']} trained the modalities for {trained} epochs, not {epochs} each: "
                            f"a comparison needs every method at the same budget (train.epochs)")


def run_or_load(cfg, seed, data, run_dir, progress=None):
    """The result of one run: read back from ``run_dir`` when finished there, else trained
    (resuming from its last checkpoint when one exists)."""
    metrics_path = Path(run_dir) / "metrics.json"
    if metrics_path.exists():
        return json.loads(metrics_path.read_text())
    cfg = config_mod.merge(cfg, {"train": {"seed": seed}})
    return run(cfg, data, out_dir=run_dir, resume=True, progress=progress)


def missing_rate_accuracy(run_dir, data=None):
    """The fused test accuracy of the run in ``run_dir`` averaged over the missing rates 0, 0.1, …, 0.9
    (its report in run_dir/robustness/, read back when there)."""
    from .evaluate import evaluate_robustness
    from .robustness import DEFAULT_RATES, mean_missing_accuracy
    report = Path(run_dir) / "robustness" / "robustness.csv"
    if report.exists():
        import csv
        with report.open() as f:
            rows = [{**r, "accuracy": float(r["accuracy"])} for r in csv.DictReader(f)]
        return mean_missing_accuracy([r for r in rows if r["kind"] == "missing"])
    rows, _, _ = evaluate_robustness(Path(run_dir) / "checkpoints" / "best.pt", data, rates=DEFAULT_RATES,
                                     out_dir=Path(run_dir) / "robustness")
    return mean_missing_accuracy(rows)


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
    budget = result["budget"]
    row.update({f"epochs_{m}": n for m, n in budget["modality_epochs"].items()})
    row.update({"optimizer_steps": budget["optimizer_steps"], "stops_early": budget["stops_early"]})
    return row


def mean_std(values):
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


ROBUSTNESS_NOTE = ("Column `test acc, missing r 0–0.9 (mean)`: the fused test accuracy with every modality's units "
                   "erased with probability r, averaged over r = 0, 0.1, …, 0.9 (`mie eval --missing 0:0.9:0.1`, "
                   "mask seed 0; each run's full report in its robustness/ folder).")


def results_table(rows, labels, extra=None):
    """Markdown table, one line per label in ``labels`` (rows' "method"): mean ± std over its n runs
    of every test metric, each modality's own accuracy, validation accuracy and seconds. A modality
    a method does not see is shown as –; the best fused accuracy is in bold; † marks a method that
    stops modalities early by design. ``extra``: {column header: {label: text}}, appended columns."""
    columns = []
    for row in rows:
        columns += [k for k in row if k.startswith("test_") and k not in columns]
    columns.append("val_accuracy")
    names = {"test_accuracy": "test acc", "test_macro_f1": "test macro-F1", "test_map": "test MAP",
             "test_missing_acc": "test acc, missing r 0–0.9 (mean)", "val_accuracy": "val acc"}
    extra = extra or {}
    header = ["method", "n"] + [names.get(k, k.replace("test_acc_", "acc ")) for k in columns] + ["s / run", *extra]
    summary = {}
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        summary[label] = {k: mean_std([float(r[k]) for r in mine]) for k in columns + ["seconds"]
                          if all(r.get(k) not in (None, "") for r in mine)}
    best = max(labels, key=lambda n: summary[n]["test_accuracy"][0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        cells = [f"{summary[label][k][0]:.4f} ± {summary[label][k][1]:.4f}" if k in summary[label] else "–"
                 for k in columns]
        if label == best:
            cells[0] = f"**{cells[0]}**"
        mark = " †" if any(_true(r.get("stops_early")) for r in mine) else ""
        cells += [f"{summary[label]['seconds'][0]:.1f}"] + [column.get(label, "–") for column in extra.values()]
        lines.append(f"| {label}{mark} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _true(value):
    return value is True or value == "True"      # rows read back from results.csv hold text


def paired_differences(rows, labels, reference, metric="test_accuracy"):
    """{label: (mean d, half-width of the 95% t-interval or None for n < 2, seeds won, n)} with
    d_s = metric(label, seed s) − metric(reference, seed s) over the seeds both ran."""
    from scipy import stats
    by = {(r["method"], int(r["seed"])): float(r[metric]) for r in rows}
    out = {}
    for label in labels:
        if label == reference:
            continue
        seeds = sorted(s for m, s in by if m == label and (reference, s) in by)
        d = [by[(label, s)] - by[(reference, s)] for s in seeds]
        if not d:
            continue
        n = len(d)
        mean = statistics.fmean(d)
        half = stats.t.ppf(0.975, n - 1) * statistics.stdev(d) / n ** 0.5 if n > 1 else None
        out[label] = (mean, half, sum(x > 0 for x in d), n)
    return out


def paired_table(rows, labels, reference):
    """Markdown: each method's paired difference in test accuracy to ``reference``."""
    diffs = paired_differences(rows, labels, reference)
    if not diffs:
        return ""
    lines = [f"Paired by seed against `{reference}` (test accuracy, method − {reference}; 95% t-interval; "
             "**bold**: the interval excludes 0):", "",
             "| method | n | mean difference | 95% interval | seeds won |", "|---|---|---|---|---|"]
    for label, (mean, half, won, n) in diffs.items():
        if half is None:
            interval, mean_text = "n/a (one seed)", f"{mean:+.4f}"
        else:
            interval = f"[{mean - half:+.4f}, {mean + half:+.4f}]"
            mean_text = f"**{mean:+.4f}**" if mean - half > 0 or mean + half < 0 else f"{mean:+.4f}"
        lines.append(f"| {label} | {n} | {mean_text} | {interval} | {won}/{n} |")
    return "\n".join(lines)


def budget_line(rows, labels):
    """Each method's epochs of updates per modality and optimizer steps (means over its runs)."""
    parts = []
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        epochs = {k[len("epochs_"):]: statistics.fmean(float(r[k]) for r in mine)
                  for k in mine[0] if k.startswith("epochs_") and all(r.get(k) not in (None, "") for r in mine)}
        steps = statistics.fmean(float(r["optimizer_steps"]) for r in mine)
        parts.append(f"{label} {'/'.join(f'{m} {e:g}' for m, e in epochs.items())}, {steps:g} steps")
    return "Budget (epochs of updates per modality, optimizer steps per run): " + "; ".join(parts) + "."


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
    return (f"Seeds {', '.join(map(str, seeds))} (n = {len(seeds)} per method); {cfg['train']['epochs']} epochs of "
            "updates per modality for every method († stops a modality early by design); checkpoint chosen on "
            f"validation {cfg['train']['select_on']} (ties: the lower validation loss), test read once. Columns "
            "`acc <modality>`: that modality's own prediction alone (test).")


def results_markdown(rows, cfg, methods, seeds, command=None, reference=None):
    """The comparison table, the paired differences, and what it was run on."""
    data = cfg["data"]["dataset"] or cfg["data"]["path"]
    mods = ", ".join(r.replace("test_acc_", "") for r in rows[0] if r.startswith("test_acc_"))
    notes = ([f"Command: `{command}`"] if command else []) + [
        f"Data: {data} (modalities {mods}).", protocol_line(cfg, seeds), budget_line(rows, methods), machine_line()]
    if any("test_missing_acc" in r for r in rows):
        notes.append(ROBUSTNESS_NOTE)
    paired = paired_table(rows, methods, reference_method(methods, reference))
    return (results_table(rows, methods) + "\n\n" + (paired + "\n\n" if paired else "") + "\n".join(notes) + "\n")
