"""What ``mie tune`` leaves once every study is done: best_params.yaml, the re-run of each method's
best parameters over the seeds (``mie compare`` into final/, test read once per run), Optuna's plots
per method (optimization history; parameter importances) as PNGs, and tune.md summarising it all."""
import warnings
from pathlib import Path

import yaml

from . import config as config_mod
from .compare import compare
from .errors import MieError, MieInputError
from .io import write_text
from .tune_study import elapsed_seconds, startup_trials, trial_counts

MIN_IMPORTANCE_TRIALS = 4     # complete trials before parameter importances say anything


def report(plan, storage, cfg, method_overrides, seeds, out, command=None, log=print):
    """Best parameters, the final comparison, plots and tune.md; return {method: summary row}."""
    import optuna
    from optuna.trial import TrialState
    studies = {sp.method: optuna.load_study(study_name=sp.name, storage=storage) for sp in plan.studies}
    rows, best = {}, {}
    for sp in plan.studies:
        study = studies[sp.method]
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        rows[sp.method] = {"counts": trial_counts(study), "minutes": elapsed_seconds(study) / 60,
                           "best": study.best_trial if complete else None}
        if complete:
            best[sp.method] = {**sp.fixed, **study.best_trial.params}
        log(f"{sp.method}: {trial_line(rows[sp.method]['counts'])}")
    skipped = [m for m in studies if m not in best]
    if not best:
        raise MieError("no method has a complete trial (all failed or were pruned); see the trials/ folder")
    final = out / "final"
    previous = out / "best_params.yaml"
    if final.exists() and previous.exists() and yaml.safe_load(previous.read_text()) != best:
        raise MieInputError(f"{previous} differs from the studies' best parameters now; remove "
                            f"{final} to re-run the tuned methods")
    write_text(previous, yaml.safe_dump(best, sort_keys=False))
    split_seed = plan.studies[0].cfg["data"]["split_seed"]
    final_cfg = config_mod.merge(cfg, {"data": {"split_seed": split_seed}})
    compare(final_cfg, list(best), list(seeds), final, method_overrides, command=command, log=log,
            method_settings=best)
    plot_notes = [note for sp in plan.studies for note in draw_plots(studies[sp.method], sp, out / "plots")]
    write_text(out / "tune.md", tune_markdown(plan, rows, best, skipped, seeds, split_seed, plot_notes, command,
                                              (final / "results.md").read_text()))
    return rows


def trial_line(counts):
    names = ("complete", "pruned", "fail", "waiting")
    return ", ".join(f"{counts.get(k, 0)} {'failed' if k == 'fail' else 'not run' if k == 'waiting' else k}"
                     for k in names)


def draw_plots(study, sp, folder):
    """Optuna's optimization history and, with 2+ searched parameters and enough complete trials,
    parameter importances (fANOVA, seed 0) as PNGs; return one line per plot not drawn, saying why."""
    from optuna.trial import TrialState
    from .plots import missing_extra, pyplot, save_figure
    note = missing_extra()
    if note:
        return [f"{sp.method}: {note}"]
    import matplotlib
    from optuna.exceptions import ExperimentalWarning
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as optuna_plots
    pyplot()
    notes = []
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    with matplotlib.rc_context(), warnings.catch_warnings():     # Optuna's plots set a global style
        warnings.simplefilter("ignore", ExperimentalWarning)     # its matplotlib plots are "experimental"
        ax = optuna_plots.plot_optimization_history(study, target_name=f"validation {sp.cfg['train']['select_on']}")
        _title(ax, f"{sp.method}: optimization history")
        save_figure(ax.figure, Path(folder) / f"{sp.method}_history.png")
        values = {t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        if len(sp.space) >= 2 and n >= MIN_IMPORTANCE_TRIALS and len(values) == 1:
            notes.append(f"{sp.method}: no parameter importances: every complete trial scored {values.pop():.4f}, "
                         "so no parameter explains any variance")
        elif len(sp.space) >= 2 and n >= MIN_IMPORTANCE_TRIALS:
            ax = optuna_plots.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
            _title(ax, f"{sp.method}: parameter importances (fANOVA)")
            save_figure(ax.figure, Path(folder) / f"{sp.method}_importance.png")
        else:
            notes.append(f"{sp.method}: no parameter importances: they need 2+ searched parameters and "
                         f"{MIN_IMPORTANCE_TRIALS}+ complete trials; it has {len(sp.space)} and {n}")
    return notes


def _title(ax, text):
    """Replace Optuna's title (wherever it placed it) by ``text``."""
    for loc in ("left", "right"):
        ax.set_title("", loc=loc)
    ax.set_title(text)


def _number(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _space_text(space):
    return "; ".join(f"{k} {s.kind} {list(s.choices)}" if s.kind == "choice" else f"{k} {s.kind} [{_number(s.low)}, "
                     f"{_number(s.high)}]" for k, s in space.items()) or "(nothing)"


def _seeds_text(seeds):
    if len(seeds) == 1:
        return f"seed {seeds[0]}'s initialisation"
    return f"each of seeds {', '.join(map(str, seeds))} (the trial's score: their mean; the pruner follows seed {seeds[0]})"


def tune_markdown(plan, rows, best, skipped, seeds, split_seed, plot_notes, command, results):
    cfg = plan.studies[0].cfg
    select_on = cfg["train"]["select_on"]
    budget = f"; at most {plan.budget_s / 60:g} minutes of wall time per study" if plan.budget_s else ""
    lines = ["# Fair tuning", ""] + ([f"Command: `{command}`", ""] if command else []) + [
        f"Every method: {plan.trials} trials (TPE, sampler seed {plan.sampler_seed}, {startup_trials(plan.trials)} "
        f"random start-up trials, a constant liar for running trials; pruner {plan.pruner}){budget}. A trial is a full "
        f"training run ({cfg['train']['epochs']} epochs per modality) on one split (data.split_seed {split_seed}) "
        f"from {_seeds_text(plan.trial_seeds)}, scored on validation {select_on} of the checkpoint validation chose; no "
        "trial reads test. Trial 0 of each study runs the method's defaults (those inside its space); the next "
        "trials, where a space is a choice, the defaults with each of its other values.",
        f"Studies in `{plan.storage}`: " + ", ".join(f"`{sp.name}`" for sp in plan.studies) + ".", "",
        f"| method | complete | pruned | failed | not run | killed, run again | minutes | best val {select_on} | "
        "best trial | best parameters |", "|---|---|---|---|---|---|---|---|---|---|"]
    for sp in plan.studies:
        row = rows[sp.method]
        c, trial = row["counts"], row["best"]
        params = ", ".join(f"{k}={_number(v)}" for k, v in best.get(sp.method, {}).items()) or "–"
        score, number = (f"{trial.value:.4f}", str(trial.number)) if trial else ("–", "–")
        lines.append(f"| {sp.method} | {c.get('complete', 0)} | {c.get('pruned', 0)} | {c.get('fail', 0)} | "
                     f"{c.get('waiting', 0)} | {c['retried']} | {row['minutes']:.1f} | {score} | {number} | {params} |")
    lines += ["", "Searched: " + " · ".join(f"{sp.method}: {_space_text(sp.space)}" for sp in plan.studies) + "."]
    if skipped:
        lines.append(f"Not re-run (no complete trial): {', '.join(skipped)}.")
    lines += ["", "## The tuned methods, re-run", "",
              f"Each method's best parameters ([best_params.yaml](best_params.yaml)) re-run over seeds "
              f"{', '.join(map(str, seeds))} on the same split, train.seed varying; test read once per run "
              "([final/results.md](final/results.md)):", "", results.rstrip(), "", "## Plots", ""]
    for sp in plan.studies:
        for kind in ("history", "importance"):
            if (plan.trials_dir.parent / "plots" / f"{sp.method}_{kind}.png").exists():
                lines.append(f"![{sp.method} {kind}](plots/{sp.method}_{kind}.png)")
    lines += [f"- {note}" for note in plot_notes]
    return "\n".join(lines) + "\n"
