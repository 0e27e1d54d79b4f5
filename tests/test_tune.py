"""mie tune: search-space parsing and narrowing, the wall time a budget counts (against hand-built
intervals), exactly N trials per study with two worker processes and after a kill, no test number in
any trial record or folder, the pruner, the fixed split and per-method settings it relies on, and
one-line errors."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import make_arrays
from mie.cli import main
from mie.config import build_config
from mie.errors import MieInputError
from mie.methods.params import Space

optuna = pytest.importorskip("optuna")

from mie.tune import Fixed, parse_spec, resolve_spaces, trial_config  # noqa: E402
from mie.tune_study import ALIVE, elapsed_seconds  # noqa: E402

TINY = ["train.epochs=2", "train.batch_size=32", "model.dim=8", "model.head_hidden=[8]", "train.threads=1"]
CFG = build_config(None, TINY, data={"path": "toy.npz"})


@pytest.fixture
def toy(tmp_path):
    x, y = make_arrays(n=90)
    path = tmp_path / "toy.npz"
    np.savez(path, y=y, **{f"x_{m}": a for m, a in x.items()})
    return path


def _studies(db):
    """{study name: [FrozenTrial]} of a tune.db."""
    storage = f"sqlite:///{db}"
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).trials
            for s in optuna.get_all_study_summaries(storage)}


def _keys(obj):
    """Every mapping key inside ``obj`` (nested)."""
    if isinstance(obj, dict):
        return [k for k, v in obj.items() for k in [k, *_keys(v)]]
    return [k for v in obj for k in _keys(v)] if isinstance(obj, list) else []


def _assert_no_test_numbers(trials, trial_root):
    for t in trials:
        for record in (t.user_attrs, t.system_attrs, t.params):
            assert not [k for k in _keys(record) if "test" in str(k).lower()], record
    files = list(Path(trial_root).rglob("*"))
    assert [f for f in files if f.name == "metrics.json"]
    for f in files:
        if f.name == "metrics.json":
            metrics = json.loads(f.read_text())
            assert metrics["test"] is None and not [k for k in _keys(metrics) if "test" in k and k != "test"]
        elif f.suffix == ".csv":
            assert "test" not in f.read_text().splitlines()[0]
        assert f.suffix not in (".pt",)       # checkpoints are removed once a trial ends


# ---- spaces ------------------------------------------------------------------------------------
def test_specs_parse_into_spaces_or_fixed_values():
    assert parse_spec("log:1e-4:1e-2", "w") == Space("log", 1e-4, 1e-2)
    assert parse_spec("float:0:0.5", "w") == Space("float", 0.0, 0.5)
    assert parse_spec("int:2:8", "w") == Space("int", 2, 8)
    assert parse_spec("choice:adam,sgd,1e-3,true", "w") == Space("choice", choices=("adam", "sgd", 0.001, True))
    assert parse_spec([16, 32], "w") == Space("choice", choices=(16, 32))          # a YAML list
    for spec, value in (("0.003", 0.003), ("1e-3", 0.001), ("8", 8), ("adam", "adam"), (0.5, 0.5)):
        fixed = parse_spec(spec, "w")
        assert isinstance(fixed, Fixed) and fixed.value == value and type(fixed.value) is type(value)


@pytest.mark.parametrize("spec", ["log:0:1", "log:-1:1", "float:2:1", "int:1.5:3", "int:3:3", "float:a:b",
                                  "log:1", "choice:", "float:0:inf"])
def test_bad_specs_are_one_error(spec):
    with pytest.raises(MieInputError, match="w: expected"):
        parse_spec(spec, "w")


def test_declared_spaces_narrowed_widened_and_fixed():
    spaces = resolve_spaces(["joint", "mie"], CFG, [])
    assert set(spaces["joint"][0]) == {"train.lr", "train.weight_decay"}          # no own space: shared only
    assert spaces["mie"][0]["tau"].kind == "log" and {"train.lr", "train.weight_decay"} < set(spaces["mie"][0])
    entries = [("all", "method.tau", "log:0.1:1"), ("all", "train.lr", "0.003"),
               ("mie", "rho", "choice:0.01,0.05"), ("all", "train.batch_size", "int:16:64"),
               ("joint", "train.weight_decay", "log:1e-5:1e-3"), ("all", "train.weight_decay", "float:0:0.01")]
    spaces = resolve_spaces(["joint", "mie"], CFG, entries, fixed_keys=["tau"])
    joint, mie = spaces["joint"], spaces["mie"]
    assert joint[1] == {"train.lr": 0.003} and mie[1] == {"train.lr": 0.003}       # fixed, not searched
    assert "train.lr" not in joint[0] and joint[0]["train.batch_size"] == Space("int", 16, 64)
    assert joint[0]["train.weight_decay"] == Space("float", 0.0, 0.01)             # the later entry wins
    assert mie[0]["rho"] == Space("choice", choices=(0.01, 0.05))
    assert "tau" not in mie[0]                                                     # set on the command line


@pytest.mark.parametrize("entry, message", [
    (("all", "foo", "1"), "no tuned method has a parameter 'foo'"),
    (("all", "lr", "log:1e-4:1e-2"), "a training setting is written train.lr"),
    (("joint", "tau", "log:0.1:1"), "method 'joint' has a parameter 'tau'"),
    (("all", "train.epochs", "int:1:5"), "not tunable"),
    (("all", "data.carve_val", "0.3"), "expected a method parameter"),
    (("all", "tau", "log:1e-3:10"), None),
    (("all", "tau", "float:-1:1"), "tau must be a number > 0, got -1.0"),
    (("all", "train.optimizer", "choice:adam,rmsprop"), "train.optimizer 'rmsprop' is not one of"),
    (("all", "train.batch_size", "float:16:64"), "train.batch_size must be an integer"),
])
def test_bad_spaces_are_refused_before_anything_runs(entry, message):
    if message is None:
        assert resolve_spaces(["mie"], CFG, [entry])["mie"][0]["tau"] == Space("log", 1e-3, 10.0)
        return
    with pytest.raises(MieInputError, match=message):
        resolve_spaces(["joint", "mie"], CFG, [entry])


def test_trial_config_sets_method_and_training_values():
    cfg = build_config(None, TINY, data={"path": "toy.npz"}, method={"name": "mie"})
    out = trial_config(cfg, {"tau": 0.8, "train.lr": 0.004, "model.dim": 16})
    assert out["method"]["tau"] == 0.8 and out["train"]["lr"] == 0.004 and out["model"]["dim"] == 16
    assert cfg["method"]["tau"] == 0.4                      # the trial's base config is left as it was


# ---- the budget's wall time ----------------------------------------------------------------------
def test_elapsed_wall_time_is_the_union_of_trial_intervals():
    from optuna.distributions import FloatDistribution
    from optuna.trial import FrozenTrial, TrialState
    t0 = datetime(2024, 1, 1)
    study = optuna.create_study(direction="maximize")

    def add(start, end, state=TrialState.COMPLETE, alive=None):
        study.add_trial(FrozenTrial(number=0, state=state, value=0.5 if state == TrialState.COMPLETE else None,
                                    datetime_start=t0 + timedelta(seconds=start),
                                    datetime_complete=t0 + timedelta(seconds=end),
                                    params={"x": 1.0}, distributions={"x": FloatDistribution(0, 2)}, user_attrs={},
                                    system_attrs={} if alive is None else
                                    {ALIVE: (t0 + timedelta(seconds=alive)).timestamp()},
                                    intermediate_values={}, trial_id=0, values=None))
    add(0, 10)
    add(5, 12)          # overlaps the first: 12 s so far
    add(20, 25)         # +5
    add(30, 3600, TrialState.FAIL, alive=33)       # killed at 33 s, failed as stale an hour later: +3
    assert elapsed_seconds(study) == pytest.approx(12 + 5 + 3)


# ---- studies, workers, kills -----------------------------------------------------------------
def _tune_cmd(toy, out, *extra):
    return [sys.executable, "-m", "mie.cli", "tune", "--data", str(toy), "--out", str(out), *TINY, *extra]


def test_two_worker_processes_finish_exactly_n_trials_once(toy, tmp_path):
    out = tmp_path / "tune"
    r = subprocess.run(_tune_cmd(toy, out, "--methods", "joint,mie", "--trials", "3", "--workers", "2",
                                 "--seeds", "0"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    studies = _studies(out / "tune.db")
    assert set(studies) == {"joint@toy.npz:a,b", "mie@toy.npz:a,b"}
    for name, trials in studies.items():
        assert sorted(t.number for t in trials) == [0, 1, 2]
        assert all(t.state.name == "COMPLETE" for t in trials)
        assert {k for t in trials for k in t.user_attrs} >= {"val_accuracy", "val_acc_a", "val_acc_b", "best_epoch",
                                                             "seconds"}
    lines = [line for line in r.stdout.splitlines() if " trial " in line and line.startswith("[worker")]
    assert len(lines) == 6 and {line.split("]")[0] for line in lines} == {"[worker 0", "[worker 1"}
    assert sorted({line.split(": ")[0].split("] ")[1] for line in lines}) == [
        "joint trial 0", "joint trial 1", "joint trial 2", "mie trial 0", "mie trial 1", "mie trial 2"]
    _assert_no_test_numbers([t for ts in studies.values() for t in ts], out / "trials")
    trial0 = studies["mie@toy.npz:a,b"][0]
    assert trial0.params["tau"] == 0.4 and trial0.params["train.lr"] == 1e-3        # trial 0: the defaults
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    for method, name in (("joint", "joint@toy.npz:a,b"), ("mie", "mie@toy.npz:a,b")):
        top = max((t for t in studies[name]), key=lambda t: t.value)
        assert best[method] == top.params
        rerun = json.loads((out / "final" / method / "seed_0" / "metrics.json").read_text())
        assert rerun["method_params"].items() >= {k: v for k, v in top.params.items() if "." not in k}.items()
        assert rerun["val"]["accuracy"] == pytest.approx(top.value)      # same split, seed and values: same run
        assert rerun["test"] is not None and rerun["split"]["how"].endswith("from seed 0")
    text = (out / "tune.md").read_text()
    assert "| joint | 3 | 0 | 0 | 0 |" in text and "[final/results.md](final/results.md)" in text
    assert (out / "plots" / "mie_history.png").stat().st_size > 0
    assert "mie: no parameter importances: they need 2+ searched parameters and 4+ complete trials" in text


def _claim_all(url, name, results):
    """A worker process of the claim test: claim WAITING trials until none is left."""
    from mie.tune_study import claim, open_storage
    storage = open_storage(url, heartbeat=30)
    study = optuna.load_study(study_name=name, storage=storage)
    claimed = []
    while (trial_id := claim(storage, study, name)) is not None:
        claimed.append(storage.get_trial_number_from_id(trial_id))
    results.put(claimed)


def test_concurrent_claims_take_each_queued_trial_once(tmp_path):
    import multiprocessing
    from mie.tune_study import open_storage
    url = f"sqlite:///{tmp_path / 'claims.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url, heartbeat=30))
    for _ in range(30):
        study.enqueue_trial({})
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_claim_all, args=(url, "s", results)) for _ in range(3)]
    for w in workers:
        w.start()
    claimed = [results.get(timeout=300) for _ in workers]
    for w in workers:
        w.join()
    everything = [n for c in claimed for n in c]
    assert sorted(everything) == list(range(30))            # each trial claimed by exactly one process


def test_a_trial_claimed_by_a_process_that_died_before_its_first_heartbeat_is_queued_again(tmp_path):
    from optuna.trial import TrialState
    from mie.tune_study import claim, fail_unbeaten, open_storage
    storage = open_storage(f"sqlite:///{tmp_path / 'db'}", heartbeat=30)
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 1.0})
    study.enqueue_trial({})
    dead = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), 0)
    assert storage.set_trial_state_values(dead, TrialState.RUNNING)      # claimed, then the process died
    alive = claim(storage, study, "s")                                     # claimed and beating
    time.sleep(0.05)
    fail_unbeaten(study, storage, grace=0)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {0: "FAIL", 1: "RUNNING", 2: "WAITING"} and storage.get_trial_number_from_id(alive) == 1
    assert study.trials[2].system_attrs["fixed_params"] == {"x": 1.0}      # queued again with its values


def _complete(db):
    try:
        with sqlite3.connect(db) as c:
            return c.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_killed_run_resumes_to_exactly_n_complete_trials(toy, tmp_path):
    out = tmp_path / "tune"
    cmd = _tune_cmd(toy, out, "--methods", "joint", "--trials", "3", "--seeds", "0", "--heartbeat", "1",
                    "train.epochs=4")
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _complete(out / "tune.db") < 1 and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    trials = _studies(out / "tune.db")["joint@toy.npz:a,b"]
    assert 1 <= sum(t.state.name == "COMPLETE" for t in trials) < 3, "the run was not killed mid-way"
    running = {t.number: t.params for t in trials if t.state.name == "RUNNING"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    trials = _studies(out / "tune.db")["joint@toy.npz:a,b"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    for number, params in running.items():       # the killed trial failed as stale, run again with its values
        assert trials[number].state.name == "FAIL"   # (killed mid-sampling, it holds only the values drawn so far)
        retry = [t for t in complete if t.system_attrs.get("failed_trial") == number]
        assert len(retry) == 1 and params.items() <= retry[0].params.items()
    assert f"| joint | 3 | 0 | 0 | 0 | {len(running)} |" in (out / "tune.md").read_text()   # killed, run again
    _assert_no_test_numbers(trials, out / "trials")


# ---- pruning and budgets (in this process) ------------------------------------------------------------
def test_the_median_pruner_stops_a_clearly_worse_trial(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tune"
    out.mkdir()
    study = optuna.create_study(study_name="joint@toy.npz:a,b", storage=f"sqlite:///{out / 'tune.db'}",
                                direction="maximize")
    for lr in (1e-2, 1e-2, 1e-7):           # queued by hand: the third cannot learn in 3 epochs
        study.enqueue_trial({"train.lr": lr, "train.weight_decay": 1e-4})
    rc = main(["tune", "--data", "toy.npz", "--methods", "joint", "--trials", "3", "--seeds", "0", "--out", "tune",
               "--pruner", "median", "--space", "train.lr=log:1e-8:1e-1", *TINY, "train.epochs=3"])
    assert rc == 0
    trials = _studies(out / "tune.db")["joint@toy.npz:a,b"]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert trials[2].user_attrs["pruned_at"] == "epoch 1" and max(trials[2].intermediate_values) == 1
    assert "| joint | 2 | 1 | 0 | 0 | 0 |" in (out / "tune.md").read_text()
    assert "joint trial 2: pruned at epoch 1" in capsys.readouterr().out


def test_the_first_trials_try_the_defaults_with_every_value_of_a_choice(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["tune", "--data", "toy.npz", "--methods", "mie_recipe_heads", "--trials", "4", "--seeds", "0",
               "--out", "tune", "--space", "tau=0.4", "--space", "rho=0.05", "--space", "fusion=choice:model,average,log",
               *TINY, "train.epochs=1"])
    assert rc == 0
    trials = _studies(tmp_path / "tune" / "tune.db")["mie_recipe_heads@toy.npz:a,b"]
    defaults = {"ensemble_weight": 0.5, "train.lr": 1e-3, "train.weight_decay": 1e-4}
    assert [t.params for t in trials[:3]] == [{**defaults, "fusion": f} for f in ("model", "average", "log")]
    assert trials[3].params != trials[0].params and trials[3].params["fusion"] in ("model", "average", "log")


def test_a_budget_stops_new_trials_and_the_report_says_so(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["tune", "--data", "toy.npz", "--methods", "joint", "--trials", "3", "--budget", "0.0001",
               "--seeds", "0", "--out", "tune", *TINY])
    assert rc == 0
    assert "| joint | 1 | 0 | 0 | 2 |" in (tmp_path / "tune" / "tune.md").read_text()
    assert "joint: 1 complete, 0 pruned, 0 failed, 2 not run" in capsys.readouterr().out


def test_a_study_refuses_to_resume_under_other_settings(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["tune", "--data", "toy.npz", "--methods", "joint", "--trials", "2", "--budget", "0.0001", "--seeds", "0",
            "--out", "tune", *TINY]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["train.epochs=3", "--space", "train.lr=log:1e-3:1e-1"]) == 2
    err = capsys.readouterr().err
    assert "study 'joint@toy.npz:a,b'" in err and "(space.train.lr, train.epochs)" in err


def test_trial_seeds_score_a_trial_by_the_mean_of_its_seeds_runs(toy, tmp_path, monkeypatch):
    """--trial-seeds 0,3: each trial trains from seed 0 and from seed 3 (folders seed_0, seed_3) and its
    value is the mean of the two runs' validation accuracies, each equal to a separate run of the
    trial's config from that seed; the study refuses to resume with other trial seeds."""
    import mie
    monkeypatch.chdir(tmp_path)
    args = ["tune", "--data", "toy.npz", "--methods", "joint", "--trials", "2", "--seeds", "0", "--out", "tune",
            "--trial-seeds", "0,3", *TINY]
    assert main(args) == 0
    trials = _studies(tmp_path / "tune" / "tune.db")["joint@toy.npz:a,b"]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        folder = tmp_path / "tune" / "trials" / "joint" / f"trial_{t.number:04d}"
        scores = []
        for seed in (0, 3):
            cfg = build_config(None, TINY + [f"train.lr={t.params['train.lr']}",
                                             f"train.weight_decay={t.params['train.weight_decay']}",
                                             f"train.seed={seed}", "data.split_seed=0"],
                               data={"path": "toy.npz"}, method={"name": "joint"})
            scores.append(mie.fit(config=cfg, progress=False)["val"]["accuracy"])
            assert json.loads((folder / f"seed_{seed}" / "metrics.json").read_text())["val"]["accuracy"] == scores[-1]
        assert t.user_attrs["val_accuracy_seeds"] == scores
        assert t.value == pytest.approx(sum(scores) / 2, abs=1e-12)
    assert "from each of seeds 0, 3 (the trial's score: their mean" in (tmp_path / "tune" / "tune.md").read_text()
    _assert_no_test_numbers(trials, tmp_path / "tune" / "trials")
    assert main(args[:-len(TINY) - 2] + ["--trial-seeds", "0", *TINY]) == 2


# ---- what tuning relies on ---------------------------------------------------------------------------
def test_split_seed_fixes_the_split_across_run_seeds():
    from mie.data import MultimodalArrays
    from mie.data.prepare import prepare_arrays
    x, y = make_arrays(n=90)
    arrays = MultimodalArrays(x, y)

    def indices(seed, split_seed):
        cfg = build_config(None, (), data={"split_seed": split_seed}, train={"seed": seed})
        return prepare_arrays(arrays, cfg).indices
    fixed = [indices(s, 3) for s in (0, 1)]
    assert all(np.array_equal(fixed[0][k], fixed[1][k]) for k in ("train", "val", "test"))
    assert all(np.array_equal(fixed[0][k], indices(3, None)[k]) for k in ("train", "val", "test"))
    assert not np.array_equal(indices(0, None)["test"], indices(1, None)["test"])
    with pytest.raises(MieInputError, match="data.split_seed must be an integer or null"):
        build_config(None, ["data.split_seed=1.5"])


def test_a_run_without_test_reads_none(toy, tmp_path):
    from mie.train import run
    cfg = build_config(None, TINY, data={"path": str(toy)}, method={"name": "joint"})
    result = run(cfg, out_dir=tmp_path / "r", read_test=False, progress=False)
    assert result["test"] is None and result["val"]["accuracy"] >= 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["test"] is None


def test_compare_applies_per_method_settings_to_that_method_alone(toy, tmp_path):
    from mie.compare import compare
    cfg = build_config(None, TINY, data={"path": str(toy)})
    compare(cfg, ["joint", "mie"], [0], tmp_path / "c", {"tau": 0.5}, log=lambda line: None,
            method_settings={"mie": {"rho": 0.01, "train.lr": 0.004}})
    joint = yaml.safe_load((tmp_path / "c" / "joint" / "seed_0" / "config.yaml").read_text())
    mie = yaml.safe_load((tmp_path / "c" / "mie" / "seed_0" / "config.yaml").read_text())
    assert joint["train"]["lr"] == 1e-3 and mie["train"]["lr"] == 0.004
    assert mie["method"]["rho"] == 0.01 and mie["method"]["tau"] == 0.5
    with pytest.raises(MieInputError, match="settings given for ogm, which is not compared"):
        compare(cfg, ["joint"], [0], tmp_path / "d", method_settings={"ogm": {"alpha": 1.0}})


# ---- one-line errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--space", "tau=log:0:1"], "--space tau=log:0:1: expected log:A:B with numbers 0 < A < B"),
    (["--space", "train.lr=log:1e-4:1e-2", "--space", "foo=3"], "no tuned method has a parameter 'foo'"),
    (["--space", "train.seed=int:0:3"], "--space train.seed: not tunable"),
    (["--space", "tau"], "--space tau: expected KEY=SPEC"),
    (["--space-file", "missing.yaml"], "--space-file missing.yaml: no such file"),
    (["--pruner", "bogus"], "argument --pruner: invalid choice"),
    (["--trials", "0"], "--trials must be an integer >= 1"),
    (["--budget", "-1"], "--budget must be a number of minutes > 0"),
    (["--join"], "--join: no study 'mie@toy.npz:a,b'"),
    (["--trial-seeds", "1,1"], "--trial-seeds 1,1: each seed once"),
])
def test_bad_input_is_one_line(toy, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    args = ["tune", "--data", "toy.npz", "--methods", "mie", "--out", "o", *TINY]
    rc = main(args + (extra if "--trials" in extra else ["--trials", "2", *extra]))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_space_file_names_methods_or_all(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("ogm: {alpha: log:0.1:1}\n")
    rc = main(["tune", "--data", "toy.npz", "--methods", "mie", "--trials", "2", "--out", "o",
               "--space-file", "s.yaml", *TINY])
    assert rc == 2 and "--space-file s.yaml: ogm is not among --methods" in capsys.readouterr().err


def test_without_optuna_one_line_says_what_to_install(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "optuna", None)
    rc = main(["tune", "--data", "toy.npz", "--methods", "joint", "--trials", "2", "--out", "o", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and 'pip install -e ".[tune]"' in err and len(err.strip().splitlines()) == 1


def test_importances_skipped_with_a_reason_when_every_trial_scored_the_same(tmp_path):
    """fANOVA cannot split zero variance (a validation set every trial gets all right): a note, no crash."""
    import types
    import optuna
    from optuna.distributions import FloatDistribution
    from mie.tune_report import draw_plots
    pytest.importorskip("matplotlib")
    study = optuna.create_study(direction="maximize")
    dists = {"tau": FloatDistribution(0.1, 1.0, log=True), "train.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    for i in range(5):
        study.add_trial(optuna.trial.create_trial(params={"tau": 0.1 + 0.1 * i, "train.lr": 1e-3}, distributions=dists,
                                                  value=1.0))
    sp = types.SimpleNamespace(method="mie", cfg={"train": {"select_on": "accuracy"}}, space=dists)
    notes = draw_plots(study, sp, tmp_path)
    assert notes == ["mie: no parameter importances: every complete trial scored 1.0000, so no parameter explains "
                     "any variance"]
    assert (tmp_path / "mie_history.png").is_file() and not (tmp_path / "mie_importance.png").exists()
