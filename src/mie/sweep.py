"""Sensitivity of one method to one setting (``mie sweep``): every value × every seed on the same data,
splits and epoch budget.

The setting is a method parameter (``tau`` or ``method.tau``) or a ``train.<key>`` / ``model.<key>``;
the values are a comma-separated list (numbers, strings, true/false, [lists], {mappings}),
``log:A:B:N`` (N values from A to B, evenly spaced in log) or ``lin:A:B:N``. Every value is checked
against what the method or config accepts before anything runs. Writes, under the output folder,
one run folder per (value, seed), ``sweep.csv`` (one row per run), ``sweep.md`` (per value: validation
and test accuracy mean ± std over the seeds, each modality's test accuracy, n; the best value on mean
validation accuracy in bold; each value's test accuracy paired by seed with the first value's, with its
95% interval), and ``sweep.png`` with its data ``sweep_curve.csv`` (validation and test
accuracy against the value, ± std bands, the validation-best value marked; a log x-axis for log ranges
and for positive lists spanning two decades or more). Test accuracy is read once per run and plays no
part in the choice. Finished runs are read back, so an interrupted sweep continues where it stopped.
"""
import copy
import json
import re
from pathlib import Path

import numpy as np
import yaml

from . import config as config_mod
from .compare import (budget_line, check_budget, machine_line, mean_std, paired_table, result_row, run_line,
                      run_or_load)
from .config import FLOAT
from .data import DISK_DATASETS
from .data.prepare import load_arrays
from .errors import MieInputError
from .io import csv_text, write_text
from .methods import create_method, method_params
from .plots import missing_extra, pyplot, save_figure
from .train import output_folder

SECTIONS = ("method", "train", "model")


def parse_values(text):
    """'0.1,1,adam' | 'log:A:B:N' | 'lin:A:B:N' → (values, log_scale). Range values are rounded to 6
    significant digits, and whole numbers become ints (so integer settings can take a lin range)."""
    kind, _, spec = text.partition(":")
    if kind in ("log", "lin"):
        parts = spec.split(":")
        try:
            a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
            ok = (len(parts) == 3 and n >= 2 and np.isfinite([a, b]).all() and a != b
                  and (kind == "lin" or (a > 0 and b > 0)))
        except (ValueError, IndexError):
            ok = False
        if not ok:
            need = "A, B > 0" if kind == "log" else "A ≠ B"
            raise MieInputError(f"--values {text}: expected {kind}:A:B:N with numbers {need} and an integer N >= 2, "
                                f"e.g. {kind}:{'1e-3:100:6' if kind == 'log' else '0:1:5'}")
        grid = np.geomspace(a, b, n) if kind == "log" else np.linspace(a, b, n)
        values = [float(f"{v:.6g}") for v in grid]
        return [int(v) if v.is_integer() else v for v in values], kind == "log"
    values = [_scalar(word.strip(), text) for word in _split(text)]
    if not values or any(v == "" for v in values):
        raise MieInputError(f"--values '{text}': expected comma-separated values, log:A:B:N or lin:A:B:N")
    numbers = [v for v in values if _is_number(v)]
    log_scale = len(numbers) == len(values) and min(numbers) > 0 and max(numbers) / min(numbers) >= 100
    return values, log_scale


def _split(text):
    """Split on the commas that are not inside [...] or {...}."""
    words, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c in "[{") - (c in "]}")
        if c == "," and depth == 0:
            words.append(text[start:i])
            start = i + 1
    return words + [text[start:]]


def _scalar(word, text):
    if re.fullmatch(r"[-+]?\d+", word):
        return int(word)
    if FLOAT.fullmatch(word):
        return float(word)
    try:
        return yaml.safe_load(word) if word else ""
    except yaml.YAMLError:
        raise MieInputError(f"--values '{text}': cannot read '{word}'") from None


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def resolve_param(method, text):
    """'tau' | 'method.tau' | 'train.lr' | 'model.dim' → (section, key), refusing what ``method`` or
    the config does not have."""
    section, dot, key = text.rpartition(".")
    section = section if dot else "method"
    if section not in SECTIONS or not key:
        raise MieInputError(f"--param {text}: expected a parameter of method '{method}' (e.g. tau or method.tau), "
                            "train.<key> or model.<key>")
    if section == "method":
        params = method_params(method)
        if key == "name":
            raise MieInputError("--param method.name: a sweep varies one method's setting; compare methods with "
                                "`mie compare`")
        if key not in params:
            hint = f"; for a training setting write train.{key}" if key in config_mod.DEFAULTS["train"] else ""
            raise MieInputError(f"--param {text}: method '{method}' has no parameter '{key}'; its parameters: "
                                f"{', '.join(params) or '(none)'}{hint}")
    elif key == "seed":
        raise MieInputError("--param train.seed: give the seeds with --seeds")
    elif key not in config_mod.DEFAULTS[section]:
        raise MieInputError(f"--param {text}: unknown key; {section} has: {', '.join(config_mod.DEFAULTS[section])}")
    return section, key


def label_of(value):
    """How a value is written in tables, run folders and the plot: 0.001, 3, true, adam, [b, a]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.12g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(", ", ": ")).replace('"', "")
    return str(value)


def value_configs(cfg, section, key, values):
    """[(label, value, config)] — ``cfg`` with ``section.key`` = each value, each validated as a run
    would be (the method's own checks included); the first refused value is one error line."""
    out = []
    for value in values:
        run_cfg = copy.deepcopy(cfg)
        run_cfg[section][key] = value
        try:
            run_cfg = config_mod.validate(run_cfg)
            method = dict(run_cfg["method"])
            create_method(method.pop("name"), **method)
        except MieInputError as e:
            raise MieInputError(f"--values: {label_of(value)} is refused: {e}") from None
        value = run_cfg[section][key]
        out.append((label_of(value), value, run_cfg))
    labels = [label for label, _, _ in out]
    if len(set(labels)) < len(labels):
        raise MieInputError(f"--values gives {section}.{key} the same value twice: {', '.join(labels)}")
    if len({folder_name(key, label) for label in labels}) < len(labels):
        raise MieInputError(f"--values {', '.join(labels)}: two values would share a run folder name")
    return out


def folder_name(name, label):
    """The run folder of one value: 'tau=0.1'; characters other than letters, digits and . + = - become _."""
    return re.sub(r"[^\w.+=-]", "_", f"{name}={label}")


def sweep(cfg, param, values, seeds, out_dir, fixed=(), progress=None, log=print, command=None):
    """Run ``cfg``'s method for every value of ``param`` × every seed; write the table, the CSV and
    the plot; return the per-run rows. ``values``: a list or the text of ``--values``. ``fixed``: the
    command line's section.key=value overrides, which must not set the swept parameter."""
    if not seeds:
        raise MieInputError("sweep needs at least one seed")
    method = cfg["method"]["name"]
    section, key = resolve_param(method, param)
    for text in fixed:
        if config_mod.parse_override(text)[0] == [section, key]:
            raise MieInputError(f"override '{text}' sets {section}.{key}, the swept parameter; give its values "
                                "with --values")
    values, log_scale = parse_values(values) if isinstance(values, str) else (list(values), False)
    runs = value_configs(cfg, section, key, values)
    out = output_folder(out_dir)
    arrays = None if cfg["data"]["dataset"] in DISK_DATASETS else load_arrays(cfg)   # disk: read per run
    name = key if section == "method" else f"{section}.{key}"
    rows = []
    for label, _, run_cfg in runs:
        for seed in seeds:
            run_dir = out / folder_name(name, label) / f"seed_{seed}"
            check_finished_run(run_dir, run_cfg, seed)
            result = run_or_load(run_cfg, seed, arrays, run_dir, progress)
            check_budget(result, run_cfg["train"]["epochs"])
            rows.append({"param": name, "value": label, **result_row(result)})
            log(run_line(f"{name}={label}", result))
    labels = [label for label, _, _ in runs]
    summary = summarize(rows, labels)
    curve = curve_rows(summary, [value for _, value, _ in runs])
    write_text(out / "sweep.csv", csv_text(rows))
    write_text(out / "sweep.md", sweep_markdown(rows, summary, name, cfg, seeds, command))
    write_text(out / "sweep_curve.csv", csv_text(curve))
    note = missing_extra()
    if note:
        log(note)
    else:
        save_figure(sweep_figure(curve, method, name, log_scale), out / "sweep.png")
    return rows


def check_finished_run(run_dir, cfg, seed):
    """Refuse to read back a finished run in ``run_dir`` that was trained with other settings."""
    saved = Path(run_dir) / "config.yaml"
    if not (Path(run_dir) / "metrics.json").exists() or not saved.exists():
        return
    wanted = yaml.safe_load(config_mod.dump(config_mod.merge(cfg, {"train": {"seed": seed}})))
    if yaml.safe_load(saved.read_text()) != wanted:
        raise MieInputError(f"{run_dir} holds a finished run with other settings; choose another --out")


def summarize(rows, labels):
    """[{"value", "n", "val_accuracy": (mean, std), "test_accuracy": …, "test_acc_<m>": …, "seconds": …}]
    per label in ``labels`` (rows' "value"); std is the sample std (n − 1), 0 for one run."""
    summary = []
    for label in labels:
        mine = [r for r in rows if r["value"] == label]
        keys = ["val_accuracy", "test_accuracy"] + [k for k in mine[0] if k.startswith("test_acc_")] + ["seconds"]
        summary.append({"value": label, "n": len(mine), **{k: mean_std([float(r[k]) for r in mine]) for k in keys}})
    return summary


def best_index(summary):
    """The position of the value with the highest mean validation accuracy (the first of equals)."""
    return int(np.argmax([s["val_accuracy"][0] for s in summary]))


def sweep_markdown(rows, summary, name, cfg, seeds, command=None):
    """The per-value table and what it was run on."""
    mods = [k for k in summary[0] if k.startswith("test_acc_")]
    best = best_index(summary)
    header = [name, "n", "val acc", "test acc"] + [k.replace("test_acc_", "acc ") for k in mods] + ["s / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, s in enumerate(summary):
        cells = [f"{s[k][0]:.4f} ± {s[k][1]:.4f}" for k in ["val_accuracy", "test_accuracy", *mods]]
        value = s["value"]
        if i == best:
            value, cells[0] = f"**{value}**", f"**{cells[0]}**"
        lines.append(f"| {value} | {s['n']} | " + " | ".join(cells) + f" | {s['seconds'][0]:.1f} |")
    data = cfg["data"]["dataset"] or cfg["data"]["path"]
    labelled = [{**r, "method": f"{name}={r['value']}"} for r in rows]
    paired = paired_table(labelled, [f"{name}={s['value']}" for s in summary], f"{name}={summary[0]['value']}")
    notes = ([paired, ""] if paired else []) + ([f"Command: `{command}`"] if command else []) + [
        f"Method {cfg['method']['name']}; data: {data} (modalities "
        f"{', '.join(m.replace('test_acc_', '') for m in mods)}).",
        f"Best on validation: **{name} = {summary[best]['value']}** (highest mean validation accuracy over the seeds; "
        "the first of equals). Test accuracy is read once per run, from the checkpoint validation chose, and plays "
        "no part in the choice.",
        f"Seeds {', '.join(map(str, seeds))}; mean ± std (n − 1) over the n runs of each value. Columns `acc "
        "<modality>`: that modality's own prediction alone (test). Picture: sweep.png (data: sweep_curve.csv).",
        budget_line(labelled, [f"{name}={s['value']}" for s in summary]),
        machine_line()]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def curve_rows(summary, values):
    """The data behind sweep.png, one row per value: its x (the value itself when every value is a
    number, else its position), validation and test accuracy mean and std, and whether validation chose it."""
    numeric = all(_is_number(v) for v in values)
    best = best_index(summary)
    return [{"value": s["value"], "x": float(v) if numeric else i, "numeric": numeric, "n": s["n"],
             "val_mean": s["val_accuracy"][0], "val_std": s["val_accuracy"][1],
             "test_mean": s["test_accuracy"][0], "test_std": s["test_accuracy"][1], "best_on_val": i == best}
            for i, (s, v) in enumerate(zip(summary, values))]


def sweep_figure(curve, method, name, log_scale):
    """Validation and test accuracy against the value with ± std bands, the validation-best value
    marked (not saved). ``curve``: ``curve_rows``; values that are not all numbers sit at their
    positions, labelled. gids: the lines "val" and "test", their bands "val_band" and "test_band",
    the marker "best"."""
    plt = pyplot()
    points = sorted(curve, key=lambda c: c["x"])
    x = np.array([c["x"] for c in points], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for split, color in (("val", "tab:blue"), ("test", "tab:orange")):
        mean = np.array([c[f"{split}_mean"] for c in points])
        std = np.array([c[f"{split}_std"] for c in points])
        ax.plot(x, mean, "o-", color=color, label=f"{'validation' if split == 'val' else 'test'} accuracy", gid=split)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0, gid=f"{split}_band")
    best = next(c for c in curve if c["best_on_val"])
    ax.axvline(best["x"], color="gray", linestyle=":", linewidth=1)
    ax.plot([best["x"]], [best["val_mean"]], "*", color="tab:blue", markersize=14, gid="best",
            label=f"best on validation: {best['value']}")
    if log_scale:
        ax.set_xscale("log")
    if not curve[0]["numeric"]:
        ax.set_xticks(x, [c["value"] for c in points])
    ax.set_xlabel(name)
    ax.set_ylabel("accuracy (mean ± std over seeds)")
    ax.set_title(f"{method}: {name} (n = {points[0]['n']} seeds per value)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig
