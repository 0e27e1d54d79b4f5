"""Fair tuning (``mie tune``): every method gets the same number of trials (and, with a budget, at most
the same wall time), each trial a full training run scored on validation only; test is read once per
run, when each method's best parameters are re-run over the seeds by ``mie compare``.

What is searched: each method's declared spaces (``Param(..., space=Space(...))``) and the shared
training parameters (``SHARED_SPACE``), narrowed, widened or fixed by --space KEY=SPEC and
--space-file ({method or all: {key: spec}}). SPEC: log:A:B, float:A:B, int:A:B, choice:a,b,c, or one
value (fixed). Every trial trains on one split (data.split_seed, default 0) from seed 0's
initialisation (or, with --trial-seeds, from each of those seeds, its score the mean of their
validation scores: one lucky initialisation then picks no parameters), trial 0 of each study with the
method's defaults (those in its space), the next trials with the defaults and each other value of a
"choice" space; the re-runs keep that split and vary train.seed, so no test
sample ever served the tuning.

One Optuna study per method, named ``<method>@<data>:<modalities>`` so that several datasets share a
storage; a study remembers its settings (config, space, trials) and refuses to resume under others.
Writes under the output folder: tune.db (the studies, unless --storage), trials/<method>/trial_NNNN/
(run folders: config, history, validation metrics; no test number; checkpoints removed),
best_params.yaml, final/ (``mie compare`` of the tuned methods), plots/<method>_history.png and
<method>_importance.png, and tune.md. Rerunning the same command resumes.
"""
import json
import math
import multiprocessing
from pathlib import Path

import yaml

from . import config as config_mod
from .compare import method_config
from .config import FLOAT
from .data import DISK_DATASETS
from .data.prepare import load_arrays
from .errors import MieError, MieInputError
from .methods import METHODS, method_params
from .methods import spaces as declared_spaces
from .methods.params import Space
from .train import output_folder
from .tune_study import Plan, StudyPlan, open_storage, ready_study, require_optuna, work, worker_main
from .tune_report import report

SHARED_SPACE = {"train.lr": Space("log", 1e-4, 1e-2), "train.weight_decay": Space("log", 1e-6, 1e-2)}
KINDS = ("log", "float", "int", "choice")
UNTUNABLE = {"epochs": "the epoch budget is the same for every method",
             "seed": "trials use --trial-seeds; the re-runs use --seeds", "select_on": "it defines the score",
             "device": "it is not a hyper-parameter", "threads": "it is not a hyper-parameter",
             "num_workers": "it is not a hyper-parameter"}
PRUNERS = ("none", "median", "hyperband")


class Fixed:
    """A --space entry that fixes a key to one value instead of searching it."""

    def __init__(self, value):
        self.value = value


def _value(word):
    """One written value as YAML, with 1e-3 read as a number (YAML 1.1 leaves it a string)."""
    word = word.strip()
    if FLOAT.fullmatch(word) and not word.lstrip("+-").isdigit():
        return float(word)
    try:
        return yaml.safe_load(word)
    except yaml.YAMLError:
        raise MieInputError(f"cannot read the value '{word}'") from None


def parse_spec(spec, where):
    """'log:A:B' | 'float:A:B' | 'int:A:B' | 'choice:a,b,c' → Space; a YAML list → choice; any other
    value → Fixed(value). ``where`` names the entry in errors."""
    if isinstance(spec, list):
        spec = "choice:" + ",".join(map(str, spec))
    if not isinstance(spec, str):
        return Fixed(spec)
    kind, colon, rest = spec.partition(":")
    if not colon or kind not in KINDS:
        return Fixed(_value(spec))
    if kind == "choice":
        choices = tuple(_value(w) for w in rest.split(","))
        if not rest.strip() or any(c is None or isinstance(c, (list, dict)) for c in choices):
            raise MieInputError(f"{where}: expected choice:a,b,c with numbers, words or true/false")
        return Space("choice", choices=choices)
    parts = rest.split(":")
    try:
        low, high = (int(p) if kind == "int" else float(p) for p in parts)
    except ValueError:
        low = high = None
    if low is None or not (math.isfinite(low) and math.isfinite(high) and low < high) or (kind == "log" and low <= 0):
        need = "integers A < B" if kind == "int" else "numbers 0 < A < B" if kind == "log" else "numbers A < B"
        raise MieInputError(f"{where}: expected {kind}:A:B with {need}")
    return Space(kind, low, high)


def space_key(key, method):
    """'tau' | 'method.tau' → 'tau' when ``method`` has it (else None); 'train.lr' | 'model.dim' as they are."""
    section, dot, field = key.rpartition(".")
    if not dot or section == "method":
        return field if field in method_params(method) else None
    if section not in ("train", "model") or field not in config_mod.DEFAULTS[section]:
        raise MieInputError(f"--space {key}: expected a method parameter (tau or method.tau), train.<key> or "
                            "model.<key>")
    if section == "train" and field in UNTUNABLE:
        raise MieInputError(f"--space {key}: not tunable ({UNTUNABLE[field]})")
    return key


def check_entry(method, key, entry, cfg, where):
    """Refuse a range or value ``method`` (or the config) would not accept, before anything runs."""
    values = ([entry.value] if isinstance(entry, Fixed) else
              list(entry.choices) if entry.kind == "choice" else [entry.low, entry.high])
    for value in values:
        if "." in key:
            section, _, field = key.partition(".")
            trial = config_mod.merge(cfg, {section: {field: value}})
            trial["method"] = {"name": method}
            try:
                config_mod.validate(trial)
            except MieInputError as e:
                raise MieInputError(f"{where}: {e}") from None
        else:
            expected = (METHODS[method][0].params[key].check or (lambda v: None))(value)
            if expected is not None:
                raise MieInputError(f"{where}: {method}'s {key} must be {expected}, got {value!r}")


def method_space(method):
    """{key: Space} declared for ``method`` (its parameters with a space) and the shared ones."""
    return {**declared_spaces(method), **SHARED_SPACE}


def read_space_file(path, methods):
    """[(method or "all", key, spec)] of a YAML mapping {method or all: {key: spec}}."""
    path = Path(path)
    if not path.is_file():
        raise MieInputError(f"--space-file {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MieInputError(f"--space-file {path}: cannot parse it as YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise MieInputError(f"--space-file {path}: expected {{method or all: {{key: spec}}}}")
    strangers = [t for t in data if t != "all" and t not in methods]
    if strangers:
        raise MieInputError(f"--space-file {path}: {', '.join(map(str, strangers))} is not among --methods")
    return [(target, str(key), spec) for target, entries in data.items() for key, spec in entries.items()]


def resolve_spaces(methods, cfg, entries, fixed_keys=()):
    """{method: (space {key: Space}, fixed {key: value})}: the declared spaces, then ``entries``
    [(method or "all", key, spec)] in order, a later one replacing an earlier; ``fixed_keys`` (set
    on the command line as section.key=value or method.key=value) are not searched."""
    out = {m: (method_space(m), {}) for m in methods}
    for target, key, spec in entries:
        where = f"--space {key}={spec}" if target == "all" else f"--space-file {target}: {key}: {spec}"
        entry = parse_spec(spec, where)
        keys = {m: space_key(key, m) for m in (methods if target == "all" else [target])}
        if not any(keys.values()):
            owner = "no tuned method" if target == "all" else f"method '{target}'"
            name = key.rpartition(".")[2]
            hint = f" (a training setting is written train.{name})" if name in config_mod.DEFAULTS["train"] else ""
            raise MieInputError(f"{where}: {owner} has a parameter '{name}'{hint}")
        for m, k in keys.items():
            if k is None:
                continue
            check_entry(m, k, entry, cfg, where)
            space, fixed = out[m]
            if isinstance(entry, Fixed):
                space.pop(k, None)
                fixed[k] = entry.value
            else:
                fixed.pop(k, None)
                space[k] = entry
    for space, _ in out.values():
        for key in fixed_keys:
            space.pop(key.removeprefix("method."), None)
    return out


def trial_config(cfg, values):
    """``cfg`` with a trial's sampled ``values`` ({"tau": …, "train.lr": …}), validated."""
    out = config_mod.merge(cfg, {})
    for key, value in values.items():
        section, dot, field = key.partition(".")
        out[section if dot else "method"][field if dot else key] = value
    return config_mod.validate(out)


def trial_data(cfg):
    """The arrays trials train on (None for a benchmark read from disk per run)."""
    return None if cfg["data"]["dataset"] in DISK_DATASETS else load_arrays(cfg)


def data_tag(cfg, arrays):
    if arrays is None:
        return f"{cfg['data']['dataset']}:{','.join(cfg['data']['modalities'] or ['default'])}"
    return f"{arrays.name}:{','.join(arrays.modalities)}"


def config_value(cfg, key):
    """The value of "train.lr" / "model.dim" / a method parameter "tau" in ``cfg``."""
    section, dot, field = key.partition(".")
    return cfg[section][field] if dot else cfg["method"][key]


def _in_space(space, value):
    if space.kind == "choice":
        return value in space.choices
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and (space.kind != "int" or isinstance(value, int)) and space.low <= value <= space.high


def study_plans(cfg, methods, spaces, method_overrides, tag, trials, trial_seeds=(0,)):
    """A StudyPlan per method: its trial config (data.split_seed fixed, default 0; train.seed the first
    trial seed), space, fixed values, the defaults trial 0 tries, and the settings its study is checked
    against."""
    split_seed = 0 if cfg["data"]["split_seed"] is None else cfg["data"]["split_seed"]
    base = config_mod.merge(cfg, {"data": {"split_seed": split_seed}, "train": {"seed": trial_seeds[0]}})
    plans = []
    for m in methods:
        space, fixed = spaces[m]
        mcfg = method_config(base, m, method_overrides, fixed)
        defaults = {k: config_value(mcfg, k) for k in space if _in_space(space[k], config_value(mcfg, k))}
        kept = config_mod.merge(mcfg, {"train": {"threads": None, "device": None, "num_workers": None}})
        settings = {"config": kept, "space": {k: list(s) for k, s in space.items()}, "trials": trials}
        if list(trial_seeds) != [0]:          # a study made before --trial-seeds existed used seed 0
            settings["trial_seeds"] = list(trial_seeds)
        settings = json.loads(json.dumps(settings))
        plans.append(StudyPlan(m, f"{m}@{tag}", mcfg, space, fixed, defaults, settings))
    return plans


def tune(cfg, methods, trials, out_dir, *, storage=None, workers=1, join=False, budget=None, pruner="none",
         seeds=(0, 1, 2, 3, 4), trial_seeds=(0,), space_entries=(), fixed_keys=(), method_overrides=None,
         sampler_seed=0, heartbeat=30, command=None, log=print):
    """Tune every method in ``methods`` with ``trials`` trials (``budget`` minutes at most each), each
    trial scored by the mean validation score of runs from ``trial_seeds``, then re-run each one's best
    parameters over ``seeds``; return the summary ``report`` wrote (None with ``join``: this process
    only works on the studies' remaining trials)."""
    require_optuna()
    for what, value, low in (("--trials", trials, 1), ("--workers", workers, 1), ("--heartbeat", heartbeat, 1)):
        if not isinstance(value, int) or value < low:
            raise MieInputError(f"{what} must be an integer >= {low}, got {value}")
    if budget is not None and not budget > 0:
        raise MieInputError(f"--budget must be a number of minutes > 0, got {budget}")
    if pruner not in PRUNERS:
        raise MieInputError(f"--pruner {pruner}: expected one of {', '.join(PRUNERS)}")
    if not methods or not seeds or not trial_seeds:
        raise MieInputError("mie tune needs at least one method, one seed and one trial seed")
    if len(set(trial_seeds)) != len(trial_seeds):
        raise MieInputError(f"--trial-seeds {','.join(map(str, trial_seeds))}: each seed once")
    for m in methods:
        method_params(m)
    overrides = dict(method_overrides or {})
    spaces = resolve_spaces(methods, cfg, space_entries, fixed_keys)
    out = output_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = trial_data(cfg)
    plan = Plan(storage or f"sqlite:///{(out / 'tune.db').resolve()}",
                study_plans(cfg, methods, spaces, overrides, data_tag(cfg, arrays), trials, trial_seeds), trials,
                out / "trials", heartbeat, pruner, sampler_seed, None if budget is None else budget * 60,
                tuple(trial_seeds))
    db = open_storage(plan.storage, heartbeat)
    for sp in plan.studies:
        ready_study(db, plan, sp, join)
    done = run_workers(plan, workers, arrays, log)
    if join:
        log(f"joined {plan.storage}: {done} trial(s) run here; no trial is left to claim")
        return None
    return report(plan, db, cfg, overrides, seeds, out, command, log)


def run_workers(plan, workers, arrays, log):
    """Work on the studies in this process (one worker) or in ``workers`` spawned processes."""
    if workers == 1:
        return work(plan, data=arrays, log=log)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_main, args=(plan, i)) for i in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed:
        raise MieError(f"{len(failed)} of {workers} workers stopped (exit codes {failed}); their trials are queued "
                       "again: rerun the same command to continue")
    return None
