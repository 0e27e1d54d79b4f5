"""The recipe's evidence across the development suite: reads every task's ``mie tune`` output
(``OUT/<task>/final/results.csv`` and ``best_params.yaml``, as ``scripts/recipe_suite.sh`` writes
them) and writes one Markdown report: per task, the tuned methods' fused test accuracy (mean ± std
over the re-run seeds), the paired difference of the recipe to each other method, and each modality's
own test accuracy — the recipe's weakest modality against joint training's same modality; then the
best parameters each task's tuning found, and their median across tasks.

    python scripts/recipe_report.py runs/suite --out docs/recipe_suite.md
"""
import argparse
import csv
import statistics
from pathlib import Path

import yaml

from mie.compare import mean_std, paired_differences
from mie.io import write_text


def read_task(folder):
    """(rows of final/results.csv, best parameters {method: {key: value}}) of one task's tuning."""
    with open(folder / "final" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, yaml.safe_load((folder / "best_params.yaml").read_text())


def modalities(rows):
    return [k[len("test_acc_"):] for k in rows[0] if k.startswith("test_acc_")]


def mean_of(rows, method, key):
    return mean_std([float(r[key]) for r in rows if r["method"] == method])


def tune_command(folder):
    """The ``mie tune`` command tune.md records (None if it records none)."""
    for line in (folder / "tune.md").read_text().splitlines():
        if line.startswith("Command: "):
            return line[len("Command: "):]
    return None


def task_lines(task, rows, methods, recipe, command=None, reference="joint"):
    """The task's table row per method and the recipe's verdicts (fused ≥ each other method; weakest
    modality above joint's)."""
    mods = modalities(rows)
    lines = [f"### {task}", ""] + ([command, ""] if command else [])
    lines += ["| method | n | test acc | " + " | ".join(f"acc {m}" for m in mods) + " | val acc |",
              "|---|---|---|" + "---|" * len(mods) + "---|"]
    for method in methods:
        n = sum(r["method"] == method for r in rows)
        cells = [f"{a:.4f} ± {s:.4f}" for a, s in (mean_of(rows, method, f"test_acc_{m}") for m in mods)]
        acc, sd = mean_of(rows, method, "test_accuracy")
        val, vsd = mean_of(rows, method, "val_accuracy")
        lines.append(f"| {method} | {n} | {acc:.4f} ± {sd:.4f} | " + " | ".join(cells) + f" | {val:.4f} ± {vsd:.4f} |")
    lines += ["", f"Paired by seed, `{recipe}` − method (fused test accuracy, 95% t-interval):", "",
              "| method | mean difference | 95% interval | seeds won by the recipe |", "|---|---|---|---|"]
    verdicts = {}
    for other in methods:
        if other == recipe:
            continue
        mean, half, won, n = paired_differences(rows, [recipe], other)[recipe]
        interval = "n/a" if half is None else f"[{mean - half:+.4f}, {mean + half:+.4f}]"
        lines.append(f"| {other} | {mean:+.4f} | {interval} | {won}/{n} |")
        verdicts[f"fused ≥ {other}"] = (mean >= 0, f"{mean:+.4f}")
    weakest = min(mods, key=lambda m: mean_of(rows, recipe, f"test_acc_{m}")[0])
    mine, theirs = mean_of(rows, recipe, f"test_acc_{weakest}")[0], mean_of(rows, reference, f"test_acc_{weakest}")[0]
    verdicts[f"weakest modality above {reference}'s"] = (mine > theirs, f"{weakest} {mine:.3f} vs {theirs:.3f}")
    lines += ["", f"The recipe's weakest modality alone: {weakest} {mine:.4f} against {reference}'s {theirs:.4f}.", ""]
    return lines, verdicts


def report(root, tasks, recipe="mie_recipe"):
    methods, verdict_rows, sections, best = None, [], [], {}
    for task in tasks:
        rows, params = read_task(root / task)
        methods = methods or list(dict.fromkeys(r["method"] for r in rows))
        lines, verdicts = task_lines(task, rows, methods, recipe, tune_command(root / task))
        sections += lines
        verdict_rows.append((task, verdicts))
        best[task] = params
    out = ["# The MIE recipe on the development suite", "",
           f"Read from `{root}` by `scripts/recipe_report.py` (`bash scripts/recipe_suite.sh` runs it all). Every method "
           "tuned with the same number of trials on validation only (`mie tune`), its best parameters re-run over "
           "the seeds on the tuning's split, test read once per run.", "",
           "## Verdicts", "", "| task | " + " | ".join(verdict_rows[0][1]) + " |",
           "|---|" + "---|" * len(verdict_rows[0][1])]
    for task, verdicts in verdict_rows:
        out.append(f"| {task} | " + " | ".join(f"{'yes' if ok else '**no**'} ({why})" for ok, why in verdicts.values())
                   + " |")
    out += ["", "## Per task", ""] + sections + ["## Best parameters found by each task's tuning", ""]
    keys = sorted({k for params in best.values() for k in params.get(recipe, {})})
    out += [f"`{recipe}`:", "", "| task | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for task, params in best.items():
        out.append(f"| {task} | " + " | ".join(_value(params[recipe].get(k, '–')) for k in keys) + " |")
    medians = [_median([p[recipe][k] for p in best.values() if k in p[recipe]]) for k in keys]
    out.append("| median | " + " | ".join(map(_value, medians)) + " |")
    for method in methods:
        if method != recipe:
            out += ["", f"`{method}`: " + "; ".join(
                f"{task} " + ", ".join(f"{k} {_value(v)}" for k, v in params[method].items()) for task, params in best.items())]
    return "\n".join(out) + "\n"


def _value(v):
    """A parameter's value as the tables print it: numbers to 3 significant digits."""
    return f"{v:.3g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _median(values):
    """The median of numbers; of words, the most frequent."""
    if all(isinstance(v, (int, float)) for v in values):
        return statistics.median(values)
    return statistics.mode(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder holding one mie tune output per task")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown report to write")
    parser.add_argument("--recipe", default="mie_recipe", help="the method the others are compared with")
    args = parser.parse_args()
    tasks = sorted(p.name for p in args.root.iterdir() if (p / "final" / "results.csv").is_file())
    if not tasks:
        raise SystemExit(f"no finished tuning under {args.root} (expected <task>/final/results.csv)")
    write_text(args.out, report(args.root, tasks, args.recipe))
    print(f"wrote {args.out} ({len(tasks)} tasks: {', '.join(tasks)})")


if __name__ == "__main__":
    main()
