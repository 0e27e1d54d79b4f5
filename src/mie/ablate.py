"""``mie ablate``: MIE's ablations side by side on one dataset, n seeds each, built on ``mie.compare``.

Rows (the paper's SAM × GM grid, then its unidirectional GM rows):

    alternating        neither SAM nor GM: plain alternating unimodal stages
    mie_sam_only       SAM, no GM
    mie_gm_only        GM, no SAM
    mie                both
    mie_gm_into_<m>    both, GM applied to modality m's updates only (``method.gm_into=[m]``: m's
                       gradients are rewritten by T of the modality trained before it; the others
                       train unmodified); one row per modality

Each row is a ``compare`` of its method over the seeds in ``<out>/<row>/`` (runs in
``<out>/<row>/<method>/seed_<s>``), with the same data, splits and epoch budget; method overrides
go to every row whose method has them. Written in ``<out>``: ``ablation.csv`` (one line per run:
fused and per-modality test metrics of the checkpoint validation chose), ``ablation.md`` (mean ± std,
paired differences to ``mie`` by seed with 95% t-intervals, the accuracy after each stage),
``ablation_stages.csv`` and ``ablation.png``.

Accuracy after each stage is an analysis that reads the test split at every stage end: each run
keeps its model at each stage end (``method.stage_checkpoints``), which is evaluated on test after
the run, those numbers are written to the run's ``stage_accuracy.csv`` and the stage checkpoints
deleted. It chooses nothing; the main table reads test once per run, from the checkpoint chosen on
validation.
"""
import csv
import re
import sys
from pathlib import Path

from .compare import (budget_line, compare, machine_line, mean_std, paired_table, protocol_line, reference_method,
                      results_table)
from .data import DISK_DATASETS
from .data.prepare import load_arrays
from .errors import MieInputError
from .io import csv_text, read_torch, write_text
from .methods import method_params

GRID = [("alternating", "alternating"), ("mie_sam_only", "mie_sam_only"), ("mie_gm_only", "mie_gm_only"),
        ("mie", "mie")]
SET_BY_ABLATE = ("sam", "gm", "gm_into", "stage_checkpoints")
STAGE_NOTE = ("Test accuracy after each stage is an analysis: it reads the test split at the end of every stage, "
              "from the model at that moment (not the checkpoint validation chose), and chooses nothing.")


def ablation_rows(modalities):
    """[(label, method name, {parameter: value})] of the ablation, for data with ``modalities``."""
    return [(label, name, {}) for label, name in GRID] + [(f"mie_gm_into_{m}", "mie", {"gm_into": [m]})
                                                          for m in modalities]


def data_modalities(cfg, arrays):
    """The modalities the runs will train on."""
    if arrays is not None:
        return list(arrays.modalities)
    return list(cfg["data"]["modalities"] or DISK_DATASETS[cfg["data"]["dataset"]].modalities)


def ablate(cfg, seeds, out_dir, method_overrides=None, progress=None, log=print, command=None, reference="mie"):
    """Run every row of the ablation over ``seeds`` (``mie.compare.compare`` per row); write the
    tables and the figure in ``out_dir``. Returns (per-run rows, per-stage rows)."""
    overrides = dict(method_overrides or {})
    fixed = [k for k in SET_BY_ABLATE if k in overrides]
    if fixed:
        raise MieInputError(f"mie ablate sets method.{fixed[0]} itself in each row; leave it out")
    unknown = sorted(set(overrides) - set(method_params("mie")))
    if unknown:
        raise MieInputError(f"MIE has no parameter(s) {', '.join(unknown)} (see `mie methods`)")
    arrays = None if cfg["data"]["dataset"] in DISK_DATASETS else load_arrays(cfg)
    modalities = data_modalities(cfg, arrays)
    if len(modalities) < 2:
        raise MieInputError(f"mie ablate needs two or more modalities; the data has {', '.join(modalities)}")
    spec = ablation_rows(modalities)
    labels = [label for label, _, _ in spec]
    reference = reference_method(labels, reference)
    out = Path(out_dir)
    rows, stages = [], []
    for label, name, extra in spec:
        accepted = method_params(name)
        row_overrides = {k: v for k, v in {**overrides, **extra, "stage_checkpoints": True}.items() if k in accepted}
        for row in compare(cfg, [name], seeds, out / label, row_overrides, progress,
                           log=lambda line, label=label: log(f"{label:>18} | {line.strip()}")):
            rows.append({"method": label, "sam": name in ("mie", "mie_sam_only"),
                         "gm": name in ("mie", "mie_gm_only"), "gm_into": ",".join(extra.get("gm_into", modalities))
                         if name in ("mie", "mie_gm_only") else "", **{k: v for k, v in row.items() if k != "method"}})
            run_dir = out / label / name / f"seed_{row['seed']}"
            stages += [{"method": label, "seed": row["seed"], **s} for s in stage_accuracies(run_dir, arrays)]
    write_text(out / "ablation.csv", csv_text(rows))
    write_text(out / "ablation_stages.csv", csv_text(stages))
    text = ablation_markdown(rows, stages, cfg, labels, seeds, modalities, command, reference)
    write_text(out / "ablation.md", text)
    from .plots import missing_extra, save_figure
    note = missing_extra()
    if note:
        print(f"mie: note: {note}", file=sys.stderr)
    else:
        save_figure(ablation_figure(rows, stages, labels, modalities), out / "ablation.png")
    return rows, stages


def stage_accuracies(run_dir, data=None):
    """[{stage, epoch, trained, test_accuracy, test_acc_<m>…}]: fused and per-modality test accuracy
    of the model at each stage end of the run in ``run_dir``, from its ``checkpoints/epoch_<n>.pt``
    (then deleted) or read back from its ``stage_accuracy.csv``."""
    from .evaluate import load_for_evaluation
    from .train import evaluate
    run_dir = Path(run_dir)
    saved = run_dir / "stage_accuracy.csv"
    if saved.exists():
        with saved.open(newline="") as f:
            return [{k: v if k == "trained" else int(v) if k in ("stage", "epoch") else float(v) for k, v in r.items()}
                    for r in csv.DictReader(f)]
    paths = sorted(run_dir.glob("checkpoints/epoch_*.pt"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
    if not paths:
        raise MieInputError(f"{run_dir} holds neither stage_accuracy.csv nor the stage checkpoints "
                            "checkpoints/epoch_<n>.pt; remove the folder to rerun it")
    with (run_dir / "history.csv").open(newline="") as f:
        trained = {int(r["epoch"]): r.get("active") or "all" for r in csv.DictReader(f)}
    method, test_loader, device, _ = load_for_evaluation(paths[0], data, "test")
    out = []
    for i, path in enumerate(paths):
        ckpt = read_torch(path, device, "a stage checkpoint")
        method.model.load_state_dict(ckpt["model"])
        metrics = evaluate(method, test_loader, device, method.model.modalities)
        out.append({"stage": i + 1, "epoch": ckpt["epoch"], "trained": trained[ckpt["epoch"]],
                    "test_accuracy": metrics["accuracy"],
                    **{f"test_acc_{m}": v["accuracy"] for m, v in metrics["per_modality"].items()}})
    write_text(saved, csv_text(out))
    for path in paths:
        path.unlink()
    return out


ROWS_NOTE = ("Rows: `alternating` = neither SAM nor GM; `mie_sam_only` = SAM only; `mie_gm_only` = GM only; "
             "`mie` = both; `mie_gm_into_<m>` = both, with GM applied to modality m's updates only (T of the "
             "modality trained before m), the other modalities trained without GM.")


def stage_summary(stages, labels, keys):
    """{(label, stage): {key: (mean, std)}} over the seeds, and [(stage, epoch, trained)] in order."""
    order = sorted({(int(s["stage"]), int(s["epoch"]), s["trained"]) for s in stages})
    summary = {}
    for label in labels:
        for stage, _, _ in order:
            mine = [s for s in stages if s["method"] == label and int(s["stage"]) == stage]
            if mine:
                summary[(label, stage)] = {k: mean_std([float(s[k]) for s in mine]) for k in keys}
    return summary, order


def ablation_markdown(rows, stages, cfg, labels, seeds, modalities, command=None, reference="mie"):
    """The table of the runs, the paired differences, the accuracy after each stage, the protocol."""
    data = cfg["data"]["dataset"] or cfg["data"]["path"]
    notes = ([f"Command: `{command}`"] if command else []) + [
        f"Data: {data} (modalities {', '.join(modalities)}).", ROWS_NOTE, protocol_line(cfg, seeds),
        budget_line(rows, labels), machine_line()]
    paired = paired_table(rows, labels, reference)
    keys = ["test_accuracy"] + [f"test_acc_{m}" for m in modalities]
    summary, order = stage_summary(stages, labels, keys)
    n = {label: len({s["seed"] for s in stages if s["method"] == label}) for label in labels}
    lines = ["| stage | epoch | trained | " + " | ".join(f"{label} (n={n[label]})" for label in labels) + " |",
             "|" + "---|" * (3 + len(labels))]
    for stage, epoch, trained in order:
        cells = []
        for label in labels:
            s = summary.get((label, stage))
            cells.append("–" if s is None else f"{s['test_accuracy'][0]:.4f} (" +
                         " / ".join(f"{s[f'test_acc_{m}'][0]:.3f}" for m in modalities) + ")")
        lines.append(f"| {stage} | {epoch} | {trained} | " + " | ".join(cells) + " |")
    return (f"# MIE ablation on {data}\n\n" + results_table(rows, labels) + "\n\n" + (paired + "\n\n" if paired else "")
            + "\n".join(notes) + "\n\n## Test accuracy after each stage (analysis)\n\n" + STAGE_NOTE
            + f" Mean over seeds: fused ({' / '.join(modalities)} alone).\n\n" + "\n".join(lines) + "\n")


def ablation_figure(rows, stages, labels, modalities):
    """Bars of each row's fused and per-modality test accuracy (mean ± std over seeds), then one panel
    per accuracy (fused, each modality) of the accuracy after each stage (mean ± std band)."""
    from .plots import pyplot
    plt = pyplot()
    keys = ["test_accuracy"] + [f"test_acc_{m}" for m in modalities]
    names = ["fused"] + [f"{m} alone" for m in modalities]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.2 * (1 + len(keys)) + 1, 3.9))
    width = 0.8 / len(keys)
    for i, (key, name) in enumerate(zip(keys, names)):
        stats = [mean_std([float(r[key]) for r in rows if r["method"] == label]) for label in labels]
        axes[0].bar([x + (i - (len(keys) - 1) / 2) * width for x in range(len(labels))], [m for m, _ in stats],
                    width, yerr=[s for _, s in stats], capsize=2, color="black" if i == 0 else f"C{i - 1}",
                    alpha=0.8, label=name)
    axes[0].set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
    axes[0].set(ylim=(0, 1.15), ylabel="test accuracy (mean ± std over seeds)")
    axes[0].set_title("checkpoint chosen on validation", fontsize=9)
    axes[0].legend(fontsize=7, ncol=len(keys), loc="upper center")
    summary, order = stage_summary(stages, labels, keys)
    for ax, key, name in zip(axes[1:], keys, names):
        for j, label in enumerate(labels):
            points = [(epoch, summary[(label, stage)][key]) for stage, epoch, _ in order if (label, stage) in summary]
            x = [e for e, _ in points]
            mean = [m for _, (m, _) in points]
            std = [s for _, (_, s) in points]
            ax.plot(x, mean, "o-", ms=2.5, lw=1.2, color=f"C{j}", label=label)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=f"C{j}", alpha=0.12, lw=0)
        ax.set_xlabel("loop epoch (stage end)")
        ax.set_title(f"{name}, after each stage", fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.suptitle("Test accuracy; right: after each stage, an analysis that reads test at every stage end and "
                 "chooses nothing", fontsize=9)
    return fig

