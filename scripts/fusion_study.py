"""Why MIE's better heads do not always give a better fused prediction: the numbers of docs/fusion.md.

Trains ``joint`` and ``mie`` on each task with ``mie.compare`` (finished runs are read back, so a
rerun only analyses), then, from each run's checkpoint chosen on validation, reads every head's
logits on validation and test and measures

- each head's accuracy, NLL and ECE, its mean confidence when it is wrong, the oracle accuracy
  (some head right) and the heads' agreement;
- the fused accuracy, NLL and ECE under the rules of ``mie.models.fusion`` (``fitted`` fitted on
  validation, exactly as ``method.fusion=fitted`` does in the loop) and under candidates that are
  not rules of ``mie``: the head best on validation alone, each head temperature-scaled on
  validation and then averaged, ``fitted`` fitted on the training split instead, and a "global
  rectification" of MIE's model (ReconBoost): all its parameters fine-tuned for a few epochs on
  CE(Σ_m z_m) over the training split, then fused;
- where the heads disagree: how often the stronger head (by validation accuracy) is right, how
  often the weaker one is, and how often each rule lets a wrong weaker head overrule a right
  stronger one.

Test is read for reporting only: everything fitted or chosen uses training or validation data.

    python scripts/fusion_study.py [--out runs/fusion_study] [--seeds 0,1,2,3,4] [--tasks t1,t2]

Writes the runs under <out>/<task>/, one row per (task, method, seed, split, prediction) in
<out>/fusion_study.csv and the tables (mean ± std over seeds) in <out>/fusion_study.md.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mie import config as config_mod
from mie.compare import compare
from mie.data.prepare import load_arrays
from mie.evaluate import load_for_evaluation
from mie.io import csv_text, write_text
from mie.models import eval_mode, fuse
from mie.models.fusion import fit_log_weights
from mie.train import loader, to_device

ROOT = Path(__file__).resolve().parent.parent
# task: (config, modalities, epochs of updates per modality)
TASKS = {"mfeat_pix_zer": ("configs/mfeat.yaml", ["pix", "zer"], 20),
         "mfeat_fac_mor": ("configs/mfeat.yaml", ["fac", "mor"], 20),
         "basicmotions": ("configs/basicmotions.yaml", ["acc", "gyro"], 30)}
METHODS = ("joint", "mie")
RULES = ("average", "weight", "log", "fitted")
RECTIFY_EPOCHS, RECTIFY_LR = 3, 1e-4       # fixed before looking at any result
ECE_BINS = 15


def task_config(name):
    path, modalities, epochs = TASKS[name]
    return config_mod.build_config(ROOT / path, [f"train.epochs={epochs}", "train.threads=1"],
                                   data={"modalities": modalities})


def compare_command(name, seeds, out):
    path, modalities, epochs = TASKS[name]
    return (f"mie compare --config {path} --modalities {','.join(modalities)} --methods {','.join(METHODS)} "
            f"--seeds {','.join(map(str, seeds))} --out {out / name} train.epochs={epochs} train.threads=1")


# ---- reading a run --------------------------------------------------------------------------
@torch.no_grad()
def split_logits(model, method, data_loader, device):
    """({m: (N, K) float64 logits}, the method's fused logits (N, K) or None, labels (N,))."""
    per, fused, ys = {m: [] for m in model.modalities}, [], []
    with eval_mode(model):
        for batch in data_loader:
            xs, y = to_device(batch, device, model.modalities)
            logits, z = method.logits(xs)
            for m in per:
                per[m].append(logits[m].double().cpu())
            fused.append(None if z is None else z.double().cpu())
            ys.append(y.cpu())
    return ({m: torch.cat(v) for m, v in per.items()},
            None if fused[0] is None else torch.cat(fused), torch.cat(ys))


def run_logits(run_dir, arrays):
    """{split: split_logits} for train, val and test of the run's best checkpoint."""
    out = {}
    for split in ("train", "val", "test"):
        method, data_loader, device, _ = load_for_evaluation(run_dir / "checkpoints" / "best.pt", arrays, split, "cpu")
        out[split] = split_logits(method.model, method, data_loader, device)
    return out


def rectified_logits(run_dir, arrays, seed):
    """``run_logits`` of the run's model after RECTIFY_EPOCHS epochs of Adam (RECTIFY_LR) on all its
    parameters with CE(Σ_m z_m) over the training split (ReconBoost's global rectification)."""
    method, train_loader, device, ckpt = load_for_evaluation(run_dir / "checkpoints" / "best.pt", arrays, "train",
                                                             "cpu")
    model = method.model
    torch.manual_seed(seed)
    shuffled = loader(train_loader.dataset, ckpt["config"]["train"]["batch_size"], shuffle=True,
                      generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=RECTIFY_LR)
    model.train()
    for _ in range(RECTIFY_EPOCHS):
        for batch in shuffled:
            xs, y = to_device(batch, device, model.modalities)
            loss = F.cross_entropy(torch.stack(list(model(xs).values())).sum(dim=0), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    out = {}
    for split in ("val", "test"):
        _, data_loader, _, _ = load_for_evaluation(run_dir / "checkpoints" / "best.pt", arrays, split, "cpu")
        out[split] = split_logits(model, method, data_loader, device)
    return out


# ---- measures -------------------------------------------------------------------------------
def ece(probs, y, bins=ECE_BINS):
    """Expected calibration error: Σ_b (n_b / N) |accuracy_b − confidence_b| over equal-width bins of
    the top probability."""
    conf, pred = probs.max(dim=1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.double().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return float(total)


def scores(probs, y):
    """{accuracy, nll, ece} of probabilities (N, K) against labels (N,)."""
    p = probs.double()
    return {"accuracy": float((p.argmax(1) == y).double().mean()),
            "nll": float(-p[torch.arange(len(y)), y].clamp_min(1e-12).log().mean()),
            "ece": ece(p, y)}


def predictions(logits, fused_logits, weights, extra):
    """{name: (N, K) probabilities}: "model" (joint's own), every rule of RULES, and ``extra``
    ({name: (N, K)})."""
    probs = torch.stack([F.softmax(z, dim=-1) for z in logits.values()])
    out = {} if fused_logits is None else {"model": F.softmax(fused_logits, dim=-1)}
    for rule in RULES:
        out[rule] = fuse(probs, rule, weights if rule == "fitted" else None)
    return {**out, **extra}


def analyse_run(task, method_name, seed, run_dir, arrays):
    """Rows (one per split × prediction) of one run, and the run's head-level facts."""
    logits = run_logits(run_dir, arrays)
    mods = list(logits["val"][0])
    val_probs = {m: F.softmax(z, dim=-1) for m, z in logits["val"][0].items()}
    y_val = logits["val"][2]
    val_acc = {m: float((p.argmax(1) == y_val).double().mean()) for m, p in val_probs.items()}
    strong = max(mods, key=lambda m: val_acc[m])
    weak = min(mods, key=lambda m: val_acc[m]) if len(mods) == 2 else None
    weights = fit_log_weights(torch.stack(list(val_probs.values())), y_val)
    train_probs = torch.stack([F.softmax(z, dim=-1) for z in logits["train"][0].values()])
    weights_train = fit_log_weights(train_probs, logits["train"][2])
    # temperature scaling of each head alone on validation: softmax(t_m z_m)
    temps = {m: fit_log_weights(val_probs[m][None], y_val)[0] for m in mods}
    rectified = rectified_logits(run_dir, arrays, seed) if method_name == "mie" else None
    rows = []
    for split in ("val", "test"):
        per, fused_logits, y = logits[split]
        probs = {m: F.softmax(z, dim=-1) for m, z in per.items()}
        stacked = torch.stack(list(probs.values()))
        extra = {"best head (val)": probs[strong],
                 "temperature + average": torch.stack([F.softmax(temps[m] * per[m], -1) for m in mods]).mean(0),
                 "fitted on train": fuse(stacked, "fitted", weights_train)}
        if rectified is not None:
            r_per, _, _ = rectified[split]
            r_probs = torch.stack([F.softmax(z, dim=-1) for z in r_per.values()])
            extra["rectified: sum"] = F.softmax(torch.stack(list(r_per.values())).sum(0), dim=-1)
            extra["rectified: average"] = fuse(r_probs, "average")
            extra.update({f"rectified: {m} head": p for m, p in zip(r_per, r_probs)})
        preds = predictions(per, fused_logits, weights, extra)
        right = {m: p.argmax(1) == y for m, p in probs.items()}
        base = {"task": task, "method": method_name, "seed": seed, "split": split, "strong": strong,
                "oracle": float(torch.stack(list(right.values())).any(0).double().mean()),
                "agreement": float(torch.stack([p.argmax(1) for p in probs.values()]).eq(
                    probs[mods[0]].argmax(1)).all(0).double().mean()),
                **{f"w_{m}": float(w) for m, w in zip(mods, weights)},
                **{f"w_train_{m}": float(w) for m, w in zip(mods, weights_train)}}
        for m, p in probs.items():
            s = scores(p, y)
            conf = p.max(1).values
            base.update({f"{m}_accuracy": s["accuracy"], f"{m}_nll": s["nll"], f"{m}_ece": s["ece"],
                         f"{m}_conf_wrong": float(conf[~right[m]].mean()) if (~right[m]).any() else float("nan"),
                         f"{m}_conf_right": float(conf[right[m]].mean())})
        if weak is not None:
            base["strong_only_right"] = float((right[strong] & ~right[weak]).double().mean())
            base["weak_only_right"] = float((right[weak] & ~right[strong]).double().mean())
        for name, p in preds.items():
            row = {**base, "prediction": name, **scores(p, y)}
            if weak is not None:
                fused_right = p.argmax(1) == y
                row["overruled"] = float((right[strong] & ~right[weak] & ~fused_right).double().mean())
                row["rescued"] = float((right[weak] & ~right[strong] & fused_right).double().mean())
            rows.append(row)
    return rows


# ---- tables ----------------------------------------------------------------------------------
def ms(values, digits=3):
    values = [v for v in values if v == v]
    if not values:
        return "–"
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {s:.{digits}f}"


def task_tables(rows, task):
    mine = [r for r in rows if r["task"] == task]
    mods = TASKS[task][1]
    lines = [f"### {task} ({', '.join(mods)}; {TASKS[task][2]} epochs per modality; "
             f"n = {len({r['seed'] for r in mine})} seeds)", "",
             "Heads (test): accuracy, NLL, ECE, mean confidence when wrong; oracle = some head right.", "",
             "| method | " + " | ".join(f"{m} acc | {m} NLL | {m} ECE | {m} conf. wrong" for m in mods)
             + " | oracle | agreement |",
             "|---|" + "---|" * (4 * len(mods) + 2)]
    for method in METHODS:
        runs = [r for r in mine if r["method"] == method and r["split"] == "test" and r["prediction"] == "average"]
        cells = []
        for m in mods:
            cells += [ms([r[f"{m}_{k}"] for r in runs]) for k in ("accuracy", "nll", "ece", "conf_wrong")]
        cells += [ms([r["oracle"] for r in runs]), ms([r["agreement"] for r in runs])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Fused predictions: accuracy on validation and test, test NLL and ECE; where the heads "
                  "disagree (share of all test samples): overruled = the stronger head right, the weaker wrong "
                  "and the fusion wrong; rescued = the weaker head right, the stronger wrong, the fusion right.", "",
              "| method | prediction | val acc | test acc | test NLL | test ECE | overruled | rescued |",
              "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        names = list(dict.fromkeys(r["prediction"] for r in mine if r["method"] == method))
        for name in names:
            val = [r for r in mine if r["method"] == method and r["prediction"] == name and r["split"] == "val"]
            test = [r for r in mine if r["method"] == method and r["prediction"] == name and r["split"] == "test"]
            lines.append(f"| {method} | {name} | {ms([r['accuracy'] for r in val])} | "
                         f"{ms([r['accuracy'] for r in test])} | {ms([r['nll'] for r in test])} | "
                         f"{ms([r['ece'] for r in test])} | {ms([r.get('overruled', float('nan')) for r in test])} | "
                         f"{ms([r.get('rescued', float('nan')) for r in test])} |")
    references = (("mie", "average"), ("mie", "log"), ("joint", "model"))
    lines += ["", "Paired by seed (test accuracy): each MIE prediction minus MIE's `average` (the paper's rule), "
                  "minus MIE's `log` and minus joint training's own prediction (`model`); mean ± std of the "
                  "difference, and seeds better / equal / worse.", "",
              "| MIE prediction | " + " | ".join(f"− {' '.join(r)} | b/e/w" for r in references) + " |",
              "|---|" + "---|---|" * len(references)]
    accuracy = {(r["method"], r["prediction"], r["seed"]): r["accuracy"] for r in mine if r["split"] == "test"}
    seeds = sorted({r["seed"] for r in mine})
    for name in dict.fromkeys(r["prediction"] for r in mine if r["method"] == "mie"):
        if name.endswith(" head"):
            continue
        cells = []
        for reference in references:
            diff = [accuracy[("mie", name, s)] - accuracy[(*reference, s)] for s in seeds]
            cells += [ms(diff), "/".join(str(sum(f(d) for d in diff)) for f in
                                         (lambda d: d > 1e-9, lambda d: abs(d) <= 1e-9, lambda d: d < -1e-9))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    test = [r for r in mine if r["split"] == "test" and r["prediction"] == "average"]
    lines += ["", "Where the heads disagree (test, share of all samples), and the weights `fitted` found "
                  "(on validation; on the training split for `fitted on train`):", "",
              "| method | stronger head (val) | only the stronger right | only the weaker right | "
              + " | ".join(f"w_{m}" for m in mods) + " | " + " | ".join(f"w_{m}, train" for m in mods) + " |",
              "|---|---|---|---|" + "---|" * (2 * len(mods))]
    for method in METHODS:
        runs = [r for r in test if r["method"] == method]
        counts = {m: sum(r["strong"] == m for r in runs) for m in mods}
        strong = ", ".join(f"{m} {n}×" for m, n in counts.items() if n)
        lines.append(f"| {method} | {strong} | {ms([r['strong_only_right'] for r in runs])} | "
                     f"{ms([r['weak_only_right'] for r in runs])} | "
                     + " | ".join(ms([r[f'w_{m}'] for r in runs], 2) for m in mods) + " | "
                     + " | ".join(ms([r[f'w_train_{m}'] for r in runs], 2) for m in mods) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fusion_study"))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        sys.exit(f"fusion_study: unknown task(s) {', '.join(unknown)}; expected some of {', '.join(TASKS)}")
    torch.set_num_threads(1)
    rows, commands = [], []
    for task in tasks:
        t0 = time.perf_counter()
        cfg = task_config(task)
        commands.append(compare_command(task, seeds, args.out))
        compare(cfg, list(METHODS), seeds, args.out / task, progress=False, command=commands[-1])
        arrays = load_arrays(cfg)
        for method in METHODS:
            for seed in seeds:
                rows += analyse_run(task, method, seed, args.out / task / method / f"seed_{seed}", arrays)
        print(f"{task}: {time.perf_counter() - t0:.0f} s", flush=True)
    write_text(args.out / "fusion_study.csv", csv_text(rows))
    text = "\n\n".join([f"Regenerate: `python scripts/fusion_study.py --out {args.out} --seeds {args.seeds} "
                        f"--tasks {','.join(tasks)}`; the runs are those of", "\n".join(f"    {c}" for c in commands),
                        *[task_tables(rows, t) for t in tasks]])
    write_text(args.out / "fusion_study.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
