"""The offline benchmark (``mie benchmark``): every method × every offline dataset setting × seeds,
into one generated report (``docs/results.md``).

Settings: UCI mfeat with views pix + zer, UCI mfeat with all six views, UEA BasicMotions
(accelerometer + gyroscope). ``unimodal`` is run once per modality. A method that is not defined
for a setting (e.g. one defined for two modalities only, on six views) is listed with the reason
instead of a row. Finished runs are read back, so an interrupted benchmark continues. Optional
columns: each run's test accuracy under missing modality parts (``--robustness``) and each
method's cost per epoch relative to joint training, measured side by side (``--cost-epochs N``).
"""
import datetime
from pathlib import Path

from . import config as config_mod
from .compare import (ROBUSTNESS_NOTE, budget_line, check_budget, machine_line, method_config,
                      missing_rate_accuracy, paired_table, protocol_line, reference_method, result_row, results_table,
                      run_line, run_or_load)
from .data import load_dataset
from .data.mfeat import VIEWS
from .errors import MieError, MieInputError
from .io import csv_text, write_text
from .methods import METHODS
from .train import run

SETTINGS = {
    "mfeat_pix_zer": ("UCI Multiple Features, views pix + zer (2,000 digits, 10 classes; stratified 70/15/15 per seed)",
                      {"data": {"dataset": "mfeat", "modalities": ["pix", "zer"]}}),
    "mfeat_all_views": ("UCI Multiple Features, all six views fou, fac, kar, pix, zer, mor",
                        {"data": {"dataset": "mfeat", "modalities": list(VIEWS)}}),
    "basicmotions": ("UEA BasicMotions, accelerometer + gyroscope (80 recordings, 4 activities; the archive's "
                     "40/40 train/test split, 20% of train as validation per seed)",
                     {"data": {"dataset": "basicmotions", "modalities": ["acc", "gyro"]},
                      "model": {"dim": 128}, "train": {"batch_size": 16}}),
}


def run_setting(name, methods, seeds, out_dir, overrides=(), progress=None, log=print, robustness=False,
                cost_epochs=0):
    """All runs of one setting → (title, cfg, rows, {label: why it was not run}, {label: seconds per epoch}).
    ``robustness``: each run's test accuracy averaged over missing rates too; ``cost_epochs`` > 0: each
    method's cost per epoch, measured side by side (``measure_costs``)."""
    title, base = SETTINGS[name]
    cfg = config_mod.build_config(base, overrides)
    arrays = load_dataset(cfg["data"]["dataset"], cfg["data"]["modalities"])
    variants = []
    for method in methods:
        for label, data in ([(f"unimodal ({m})", arrays.select([m])) for m in arrays.modalities]
                            if method == "unimodal" else [(method, arrays)]):
            run_cfg = method_config(config_mod.merge(cfg, {"data": {"modalities": data.modalities}}), method, {})
            variants.append((label, run_cfg, data))
    rows, skipped = [], {}
    for label, run_cfg, data in variants:
        try:
            for seed in seeds:
                run_dir = Path(out_dir) / name / label.replace(" (", "_").rstrip(")") / f"seed_{seed}"
                result = run_or_load(run_cfg, seed, data, run_dir, progress)
                check_budget(result, cfg["train"]["epochs"])
                row = {**result_row(result), "method": label}
                if robustness:
                    row["test_missing_acc"] = missing_rate_accuracy(run_dir, data)
                rows.append(row)
                log(f"[{name}] " + run_line(label, result))
        except MieError as e:   # bad settings for this data, or a diverged run
            skipped[label] = str(e)
            rows = [r for r in rows if r["method"] != label]
            log(f"[{name}] {label}: not run — {e}")
    ran = [v for v in variants if v[0] not in skipped]
    costs = measure_costs(ran, cost_epochs, log=lambda text: log(f"[{name}] {text}")) if cost_epochs else {}
    return title, cfg, rows, skipped, costs


def measure_costs(variants, epochs, repeats=2, log=print):
    """{label: seconds per epoch of budget} for (label, config, data) ``variants``: every method trained
    on seed 0 for ``epochs`` epochs per modality in this process, one after the other, ``repeats``
    times in turn; the fastest repeat is kept (nothing is written)."""
    seconds = {label: [] for label, _, _ in variants}
    for _ in range(repeats):
        for label, run_cfg, data in variants:
            short = config_mod.merge(run_cfg, {"train": {"epochs": epochs, "seed": 0}})
            seconds[label].append(run(short, data, progress=False)["seconds"] / epochs)
    costs = {label: min(v) for label, v in seconds.items()}
    log("cost per epoch: " + ", ".join(f"{k} {v:.2f}s" for k, v in costs.items()))
    return costs


def cost_column(costs, reference):
    """{label: "r× (s s)"}: each method's seconds per epoch relative to ``reference``'s."""
    if not costs or reference not in costs:
        return {}
    return {label: f"{c / costs[reference]:.2f}× ({c:.2f} s)" for label, c in costs.items()}


def cost_line(epochs, reference):
    return (f"Cost / epoch: training and validation seconds per epoch of budget, every method run on seed 0 for "
            f"{epochs} epochs per modality one after the other in one process (fastest of 2 turns), relative to "
            f"{reference}.")


def benchmark(out_dir, report, seeds, methods=None, settings=None, overrides=(), command=None, progress=None,
              log=print, robustness=False, cost_epochs=0):
    """Run the grid and write ``report`` (markdown) and ``out_dir/results.csv``; ``robustness`` and
    ``cost_epochs`` as in ``run_setting``."""
    methods = list(methods or METHODS)
    settings = list(settings or SETTINGS)
    unknown = [s for s in settings if s not in SETTINGS] + [m for m in methods if m not in METHODS]
    if unknown:
        raise MieInputError(f"unknown setting or method {', '.join(unknown)}; settings: {', '.join(SETTINGS)}; "
                            f"methods: see `mie methods`")
    sections, all_rows = [], []
    for name in settings:
        title, cfg, rows, skipped, costs = run_setting(name, methods, seeds, out_dir, overrides, progress, log,
                                                       robustness, cost_epochs)
        labels = list(dict.fromkeys(r["method"] for r in rows))
        all_rows += [{"setting": name, **r} for r in rows]
        reference = reference_method(labels)
        paired = paired_table(rows, labels, reference)
        extra = {f"cost / epoch (× {reference})": cost_column(costs, reference)} if costs else {}
        text = (f"## {title}\n\n{results_table(rows, labels, extra)}\n\n" + (f"{paired}\n\n" if paired else "")
                + f"{protocol_line(cfg, seeds)}\n{budget_line(rows, labels)}\n")
        if costs:
            text += cost_line(cost_epochs, reference) + "\n"
        if robustness:
            text += ROBUSTNESS_NOTE + "\n"
        if skipped:
            text += "\nNot run here:\n" + "".join(f"- `{k}`: {v}\n" for k, v in skipped.items())
        sections.append(text)
    head = ["# Results on the offline datasets", "",
            "Generated by `mie benchmark`; not edited by hand. Mean ± std over n seeds, and each method's paired "
            "difference to joint training by seed with its 95% interval; every method has the "
            "same data, split rule, epoch budget per modality and checkpoint rule (validation chooses, test "
            "is read once). `s / run` is the wall-clock training time of one run.", ""]
    if command:
        head += [f"Command: `{command}`", ""]
    head += [machine_line(), f"Finished {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.", ""]
    write_text(Path(out_dir) / "results.csv", csv_text(all_rows))
    write_text(report, "\n".join(head) + "\n" + "\n".join(sections))
    return all_rows
