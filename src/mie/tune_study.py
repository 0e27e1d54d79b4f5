"""The Optuna side of ``mie tune``: one study per method in a database many processes share, its
N trials queued once and each run exactly once, however many workers or machines join.

    storage = open_storage(url, heartbeat)     heartbeats; stale trials re-queued with their parameters
    ready_study(storage, plan, study, join)    created with N WAITING trials (the first: ``starting_points``)
    work(plan)                                 claim a WAITING trial → train → tell, until none is left

A worker claims a WAITING trial by moving it to RUNNING, which fails when another worker took it
first (Optuna's ``set_trial_state_values``; on SQLite every transaction starts with BEGIN IMMEDIATE,
as pysqlite would otherwise read the state outside the transaction and two workers could both win).
While a trial trains, a daemon thread records its heartbeat; a trial whose heartbeat stops for
GRACE × heartbeat seconds (its process was killed), or that never beat, is failed by the next worker
that looks and queued again with the same parameters, so the study still ends with N finished trials
(a killed try's folder keeps its history, not its checkpoints). A worker stops when
no trial of any study is WAITING (within its budget) or RUNNING.
"""
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from . import config as config_mod
from .errors import MieInputError, TrainingDivergedError

GRACE = 4          # heartbeats a trial may miss before it counts as stale
RETRIES = 3        # times a stale trial is queued again
POLL = 2.0         # seconds between looks at the studies while only other workers' trials run
ALIVE = "mie:alive"    # system attribute: when the trial's process last beat (time.time())


@dataclass
class StudyPlan:
    method: str
    name: str          # the Optuna study: "<method>@<data>:<modalities>"
    cfg: dict          # every trial's config before its sampled values (fixed split, seed 0)
    space: dict        # key ("tau", "train.lr") → Space
    fixed: dict        # key → value, not searched
    defaults: dict     # key → the value trial 0 tries (the defaults that lie in the space)
    settings: dict     # what a study resumed or joined must have been created with

    def starting_points(self):
        """The values the first trials try: the defaults, then the defaults with each other choice of
        every "choice" space in turn (a sampler's random start-up trials may miss a choice altogether)."""
        points = [self.defaults]
        for key, s in self.space.items():
            if s.kind == "choice":
                points += [{**self.defaults, key: c} for c in s.choices if c != self.defaults.get(key)]
        return points


@dataclass
class Plan:
    storage: str
    studies: list      # StudyPlan per method
    trials: int
    trials_dir: Path
    heartbeat: int = 30
    pruner: str = "none"
    sampler_seed: int = 0
    budget_s: float = None
    trial_seeds: tuple = (0,)   # a trial's score: the mean validation score of runs from these seeds


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise MieInputError('mie tune needs Optuna: pip install -e ".[tune]"') from None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)     # mie logs each trial itself
    return optuna


def open_storage(url, heartbeat):
    """The RDBStorage at ``url`` (any SQLAlchemy URL) with heartbeats every ``heartbeat`` seconds."""
    optuna = require_optuna()
    import sqlalchemy
    sqlite = url.startswith("sqlite")
    kwargs = {"connect_args": {"timeout": 120, "isolation_level": None}} if sqlite else {}
    try:
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=GRACE * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES))
    except (ImportError, sqlalchemy.exc.SQLAlchemyError, ValueError) as e:
        raise MieInputError(f"--storage {url}: cannot open it ({type(e).__name__}: {e})") from None
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def ready_study(storage, plan, study_plan, join):
    """Create the study with its N queued trials (or top up a queue a crash left short), or check that
    the existing one was created with the same settings."""
    optuna = require_optuna()
    name = study_plan.name
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        if join:
            raise MieInputError(f"--join: no study '{name}' in {plan.storage}; start it with `mie tune` "
                                "without --join") from None
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    stored = study.user_attrs.get("mie")
    if stored is not None and stored != study_plan.settings:
        old, new = _flat(stored), _flat(study_plan.settings)
        changed = sorted(k.removeprefix("config.") for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise MieInputError(f"study '{name}' in {plan.storage} was created with other settings ({', '.join(changed)}); "
                            "rerun with those, or use another --out / --storage")
    if join:
        return
    study.set_user_attr("mie", study_plan.settings)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback
    queued = [t for t in study.get_trials(deepcopy=False) if retry.retried_trial_number(t) is None]
    points = study_plan.starting_points()
    for number in range(len(queued), plan.trials):
        study.enqueue_trial(points[number] if number < len(points) else {})


def _flat(settings, prefix=""):
    """{"config.train.epochs": 5, "space.tau": [...], "trials": 6} of nested settings."""
    out = {}
    for k, v in settings.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def trial_counts(study):
    """{state name (lower case): n} of a study's trials, stale trials that were queued again left out
    and counted under "retried" (attempts whose process died; each was run again)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback as retry
    retried = {n for t in study.get_trials(deepcopy=False) for n in retry.retry_history(t)}
    counts = {"retried": len(retried)}
    for t in study.get_trials(deepcopy=False):
        if t.number not in retried:
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def elapsed_seconds(study):
    """Wall time spent on the study: the union of its trials' [start, end] intervals (a running trial
    ends now; a stale one at its last heartbeat), so parallel trials count once and pauses not at all."""
    from optuna.trial import TrialState
    now, spans = datetime.now(), []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is None:
            continue
        end = now if t.state == TrialState.RUNNING else t.datetime_complete
        if t.state == TrialState.FAIL and ALIVE in t.system_attrs:
            end = max(t.datetime_start, min(end, datetime.fromtimestamp(t.system_attrs[ALIVE])))
        spans.append((t.datetime_start, end))
    total, reach = 0.0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total += (end - start).total_seconds()
            reach = end
        elif end > reach:
            total += (end - reach).total_seconds()
            reach = end
    return total


def claim(storage, study, name):
    """The id of a WAITING trial this process moved to RUNNING (and beat for), or None."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    study_id = storage.get_study_id_from_name(name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                storage.record_heartbeat(trial_id)
                storage.set_trial_system_attr(trial_id, ALIVE, time.time())
                return trial_id
        except UpdateFinishedTrialError:
            continue
    return None


class Heartbeat:
    """A daemon thread recording a trial's heartbeat every ``interval`` seconds while it trains."""

    def __init__(self, storage, trial_id, interval):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=self.interval)

    def _beat(self):
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
                self.storage.set_trial_system_attr(self.trial_id, ALIVE, time.time())
            except Exception:   # a missed beat (database busy, trial already failed): the next one may land
                pass


def sampler(plan, number):
    """TPE with a constant liar for the running trials, seeded per trial number (parallel workers
    sample differently; a sequential study repeats)."""
    import optuna
    seed = int(np.random.SeedSequence([plan.sampler_seed, number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=startup_trials(plan.trials))


def startup_trials(n):
    """Random trials before TPE models the others: a third of the study, 2 to 10."""
    return max(2, min(10, n // 3))


def pruner(plan):
    import optuna
    if plan.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, plan.trials // 4)))
    if plan.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


class Abandoned(Exception):
    """The trial was failed as stale by another worker (its retry runs in its place)."""


class Reporter:
    """A ``run`` callback: the best validation score so far after each epoch, for the pruner."""

    def __init__(self, trial, select_on):
        self.trial, self.key, self.best = trial, f"val_{select_on}", -float("inf")

    def __call__(self, epoch, row):
        import optuna
        self.best = max(self.best, row[self.key])
        try:
            self.trial.report(self.best, step=row["epoch"])
        except optuna.exceptions.UpdateFinishedTrialError:
            raise Abandoned() from None
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {row['epoch']}")


def suggest(trial, space):
    """{key: value} sampled for every key of ``space`` (key → Space)."""
    out = {}
    for key, s in space.items():
        if s.kind == "choice":
            out[key] = trial.suggest_categorical(key, list(s.choices))
        elif s.kind == "int":
            out[key] = trial.suggest_int(key, int(s.low), int(s.high))
        else:
            out[key] = trial.suggest_float(key, float(s.low), float(s.high), log=s.kind == "log")
    return out


def validation_attrs(results, select_on):
    """What a finished trial keeps: validation metrics (fused and per modality), best epoch and seconds;
    over several seeds' runs, the means (seconds: the sum) and each seed's score (``val_<select_on>_seeds``)."""
    each = []
    for result in results:
        val = result["val"]
        one = {f"val_{k}": val[k] for k in ("accuracy", "macro_f1", "map", "loss")}
        one.update({f"val_acc_{m}": v["accuracy"] for m, v in val["per_modality"].items()})
        each.append({**one, "best_epoch": result["best_epoch"], "loop_epochs": result["loop_epochs"]})
    if len(results) == 1:
        return {**each[0], "seconds": results[0]["seconds"]}
    attrs = {k: sum(one[k] for one in each) / len(each) for k in each[0]}
    attrs["seconds"] = sum(result["seconds"] for result in results)
    attrs[f"val_{select_on}_seeds"] = [one[f"val_{select_on}"] for one in each]
    return attrs


def remove_checkpoints(run_dir):
    """A trial's folder keeps no checkpoint: its run's, or each seed's run's."""
    for checkpoints in [run_dir / "checkpoints", *run_dir.glob("seed_*/checkpoints")]:
        shutil.rmtree(checkpoints, ignore_errors=True)


def run_trial(storage, plan, sp, trial_id, data, log):
    """Train the claimed trial on validation only and tell the study its score (or that it was pruned
    or diverged). Any other interruption queues the trial again before it propagates."""
    import optuna
    from optuna.trial import TrialState
    from .train import run
    from .tune import trial_config
    number = storage.get_trial_number_from_id(trial_id)
    study = optuna.load_study(study_name=sp.name, storage=storage, sampler=sampler(plan, number), pruner=pruner(plan))
    study.get_trials(deepcopy=False)      # the study's trial cache learns the claimed trial
    trial = optuna.trial.Trial(study, trial_id)
    folder = plan.trials_dir / sp.method
    run_dir = folder / f"trial_{number:04d}"
    shutil.rmtree(run_dir, ignore_errors=True)    # numbers are unique in a study: what is there is left over
    for earlier in optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(storage.get_trial(trial_id)):
        shutil.rmtree(folder / f"trial_{earlier:04d}" / "checkpoints", ignore_errors=True)   # a killed try's
    start = time.perf_counter()
    with Heartbeat(storage, trial_id, plan.heartbeat):
        try:
            values = suggest(trial, sp.space)
            cfg = trial_config(sp.cfg, values)
            select_on = cfg["train"]["select_on"]
            results = []
            for seed in plan.trial_seeds:       # the pruner follows the first seed's run
                results.append(run(config_mod.merge(cfg, {"train": {"seed": seed}}), data,
                                   out_dir=run_dir if len(plan.trial_seeds) == 1 else run_dir / f"seed_{seed}",
                                   callbacks=[Reporter(trial, select_on)] if not results else [], progress=False,
                                   read_test=False))
            attrs = validation_attrs(results, select_on)
            state, value = TrialState.COMPLETE, attrs[f"val_{select_on}"]
        except optuna.TrialPruned as e:
            attrs = {"pruned_at": str(e), "seconds": round(time.perf_counter() - start, 3)}
            state, value = TrialState.PRUNED, None
        except TrainingDivergedError as e:
            attrs, state, value = {"error": str(e)}, TrialState.FAIL, None
        except Abandoned:
            return
        except BaseException:
            requeue(study, storage, trial_id)
            raise
        finally:
            remove_checkpoints(run_dir)
        try:
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            study.tell(trial, value, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            return
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
    outcome = (f"val {value:.4f}" if state == TrialState.COMPLETE else f"pruned at {attrs['pruned_at']}"
               if state == TrialState.PRUNED else f"failed: {attrs['error']}")
    log(f"{sp.method} trial {number}: {outcome} ({shown or 'nothing searched'}) {time.perf_counter() - start:.1f}s")


def fail_unbeaten(study, storage, grace):
    """Fail and queue again a RUNNING trial whose process died between claiming it and its first
    heartbeat (Optuna never counts a trial without one as stale): none since its start, ``grace``
    seconds after it."""
    from optuna.trial import TrialState
    study_id, now = storage.get_study_id_from_name(study.study_name), datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.system_attrs.get(ALIVE)
        if (beat is None or beat < t.datetime_start.timestamp()) and (now - t.datetime_start).total_seconds() > grace:
            requeue(study, storage, storage.get_trial_id_from_study_id_trial_number(study_id, t.number))


def requeue(study, storage, trial_id):
    """Fail a trial this process cannot finish (interrupted, or a bug) and queue it again with its
    parameters, as a stale trial would be."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    try:
        study.tell(storage.get_trial_number_from_id(trial_id), state=TrialState.FAIL)
    except UpdateFinishedTrialError:   # failed as stale meanwhile: already queued again
        return
    storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial_id))


def work(plan, data=None, threads=None, log=print):
    """Run the plan's trials until none is left to claim or running; return how many ran here.
    ``data``: the arrays, when the caller has them (else read here)."""
    optuna = require_optuna()
    from optuna.trial import TrialState
    from .tune import trial_data
    if threads is not None:
        for sp in plan.studies:
            sp.cfg["train"]["threads"] = threads
    storage = open_storage(plan.storage, plan.heartbeat)
    data = trial_data(plan.studies[0].cfg) if data is None else data
    done = 0
    while True:
        claimed, running = None, False
        for sp in plan.studies:
            study = optuna.load_study(study_name=sp.name, storage=storage)
            optuna.storages.fail_stale_trials(study)
            fail_unbeaten(study, storage, GRACE * plan.heartbeat)
            if plan.budget_s is None or elapsed_seconds(study) < plan.budget_s:
                claimed = claim(storage, study, sp.name)
            if claimed is not None:
                break
            running = running or bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if claimed is not None:
            run_trial(storage, plan, sp, claimed, data, log)
            done += 1
        elif running:
            time.sleep(POLL)
        else:
            return done


def worker_main(plan, index):
    """Entry of a spawned worker process: one torch thread; a user-input failure is one line, exit 2."""
    import sys
    from .errors import MieError
    try:
        work(plan, threads=1, log=lambda line: print(f"[worker {index}] {line}", flush=True))
    except MieError as e:
        print(f"mie: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
