"""mie sweep: value parsing, the table's statistics against numpy, the choice on validation only, the
numbers drawn in sweep.png, the command end to end, bad input, and an interrupted sweep resuming."""
import csv
import json

import numpy as np
import scipy.stats
import pytest
import yaml

import mie.compare
from conftest import TINY
from mie.cli import main
from mie.errors import MieInputError
from mie.sweep import best_index, curve_rows, parse_values, summarize, sweep_figure, sweep_markdown

CFG = {"data": {"dataset": None, "path": "toy.npz"}, "train": {"epochs": 2}, "method": {"name": "mie"}}


def test_values_from_lists_and_ranges():
    assert parse_values("log:1e-3:100:6") == ([0.001, 0.01, 0.1, 1, 10, 100], True)
    assert parse_values("lin:0:1:5") == ([0, 0.25, 0.5, 0.75, 1], False)
    values, log = parse_values("lin:1:4:4")
    assert values == [1, 2, 3, 4] and all(type(v) is int for v in values) and not log
    assert parse_values("log:1:100:3")[0] == [1, 10, 100]
    assert parse_values("0.1,3,adam,true,null,[b, a],{a: 1, b: 2}") == (
        [0.1, 3, "adam", True, None, ["b", "a"], {"a": 1, "b": 2}], False)
    assert parse_values("1e-3,0.1,10") == ([0.001, 0.1, 10], True)      # positive, two decades or more: log axis
    assert parse_values("0.5,1,2")[1] is False and parse_values("0,1,100")[1] is False


@pytest.mark.parametrize("text", ["log:0:1:3", "log:1:10", "log:1:10:1", "lin:1:1:3", "lin:a:b:3", "lin:0:1:2.5", "lin:0:inf:3",
                                  "", "1,,2", "[1,2"])
def test_bad_values_are_one_error(text):
    with pytest.raises(MieInputError, match="--values"):
        parse_values(text)


def _rows(val, test, mods=None):
    """Rows of values "v0", "v1", … × seeds, with the given validation and test accuracies."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (vs, ts) in enumerate(zip(val, test)):
        for seed, (v, t) in enumerate(zip(vs, ts)):
            rows.append({"value": f"v{i}", "seed": seed, "val_accuracy": v, "test_accuracy": t,
                         **{f"test_acc_{m}": float(rng.uniform()) for m in (mods or ["a", "b"])},
                         "seconds": float(rng.uniform(1, 2)), "epochs_a": 2, "epochs_b": 2, "optimizer_steps": 10})
    return rows


def test_table_statistics_equal_numpy():
    rng = np.random.default_rng(1)
    rows = _rows(rng.uniform(size=(3, 4)), rng.uniform(size=(3, 4)))
    summary = summarize(rows, ["v0", "v1", "v2"])
    for s in summary:
        mine = [r for r in rows if r["value"] == s["value"]]
        assert s["n"] == 4
        for key in ("val_accuracy", "test_accuracy", "test_acc_a", "test_acc_b", "seconds"):
            x = np.array([r[key] for r in mine])
            assert s[key] == pytest.approx((x.mean(), x.std(ddof=1)))
    text = sweep_markdown(rows, summary, "tau", CFG, [0, 1, 2, 3])
    for s in summary:
        x = np.array([r["test_acc_b"] for r in rows if r["value"] == s["value"]])
        assert f"{x.mean():.4f} ± {x.std(ddof=1):.4f}" in text
    assert summarize(_rows([[0.7]], [[0.6]]), ["v0"])[0]["val_accuracy"] == (0.7, 0.0)    # one seed: std 0


def test_each_value_is_paired_by_seed_with_the_first():
    rows = _rows(val=[[0.5] * 3] * 2, test=[[0.70, 0.80, 0.75], [0.72, 0.83, 0.76]])
    text = sweep_markdown(rows, summarize(rows, ["v0", "v1"]), "tau", CFG, [0, 1, 2])
    d = np.array([0.02, 0.03, 0.01])
    half = scipy.stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert "Paired by seed against `tau=v0`" in text
    assert (f"| tau=v1 | 3 | {d.mean():+.4f} | [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] | 3/3 |" in text)


def test_best_value_is_chosen_on_validation_not_test():
    # v1 has the best validation mean, v2 the best test mean.
    rows = _rows(val=[[0.60, 0.62], [0.80, 0.78], [0.70, 0.72]], test=[[0.60, 0.61], [0.65, 0.66], [0.90, 0.91]])
    summary = summarize(rows, ["v0", "v1", "v2"])
    val_means = [np.mean([r["val_accuracy"] for r in rows if r["value"] == v]) for v in ("v0", "v1", "v2")]
    assert best_index(summary) == int(np.argmax(val_means)) == 1
    curve = curve_rows(summary, [0.1, 1.0, 10.0])
    assert [c["best_on_val"] for c in curve] == [False, True, False]
    text = sweep_markdown(rows, summary, "tau", CFG, [0, 1])
    assert "| **v1** | 2 | **0.7900 ± 0.0141** |" in text and "| v2 | 2 | 0.7100 ± 0.0141 |" in text
    assert "Best on validation: **tau = v1**" in text


def test_the_plot_draws_the_table():
    pytest.importorskip("matplotlib")
    rows = _rows(val=[[0.60, 0.62], [0.80, 0.78], [0.70, 0.72]], test=[[0.60, 0.61], [0.65, 0.66], [0.90, 0.91]])
    summary = summarize(rows, ["v0", "v1", "v2"])
    x = [100.0, 0.01, 1.0]                                   # drawn in order of the value
    fig = sweep_figure(curve_rows(summary, x), "mie", "tau", log_scale=True)
    ax = fig.axes[0]
    lines = {l.get_gid(): l for l in ax.lines}
    order = np.argsort(x)
    for split, key in (("val", "val_accuracy"), ("test", "test_accuracy")):
        np.testing.assert_allclose(lines[split].get_xdata(), np.array(x)[order])
        np.testing.assert_allclose(lines[split].get_ydata(), [summary[i][key][0] for i in order])
        band = next(c for c in ax.collections if c.get_gid() == f"{split}_band")
        ys = band.get_paths()[0].vertices[:, 1]
        lows = [summary[i][key][0] - summary[i][key][1] for i in order]
        highs = [summary[i][key][0] + summary[i][key][1] for i in order]
        assert ys.min() == pytest.approx(min(lows)) and ys.max() == pytest.approx(max(highs))
    assert list(lines["best"].get_xydata()[0]) == pytest.approx([0.01, summary[1]["val_accuracy"][0]])
    assert ax.get_xscale() == "log"
    fig = sweep_figure(curve_rows(summary, ["stage", "iteration", None]), "mie", "alternation", log_scale=False)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["v0", "v1", "v2"]
    assert fig.axes[0].get_xscale() == "linear"


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_end_to_end(capsys, npz_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sw"
    code = main(["sweep", "--data", str(npz_file), "--method", "mie", "--param", "tau", "--values", "log:0.01:1:2",
                 "--seeds", "0,1", "--out", str(out), *TINY])
    assert code == 0, capsys.readouterr().err
    rows = _read_csv(out / "sweep.csv")
    assert [(r["value"], r["seed"]) for r in rows] == [("0.01", "0"), ("0.01", "1"), ("1", "0"), ("1", "1")]
    assert {r["epochs_a"] for r in rows} == {"2"} and {r["epochs_b"] for r in rows} == {"2"}
    for r in rows:
        metrics = json.loads((out / f"tau={r['value']}" / f"seed_{r['seed']}" / "metrics.json").read_text())
        assert metrics["method_params"]["tau"] == float(r["value"]) and metrics["test"]["accuracy"] == float(
            r["test_accuracy"])
    text = (out / "sweep.md").read_text()
    curve = _read_csv(out / "sweep_curve.csv")
    val = {v: np.array([float(r["val_accuracy"]) for r in rows if r["value"] == v]) for v in ("0.01", "1")}
    test = {v: np.array([float(r["test_accuracy"]) for r in rows if r["value"] == v]) for v in ("0.01", "1")}
    best = max(val, key=lambda v: val[v].mean())        # ties: the first listed, as np.argmax
    for c in curve:
        v = c["value"]
        assert float(c["x"]) == float(v) and int(c["n"]) == 2
        assert float(c["val_mean"]) == pytest.approx(val[v].mean()) and float(c["val_std"]) == pytest.approx(
            val[v].std(ddof=1))
        assert float(c["test_mean"]) == pytest.approx(test[v].mean()) and float(c["test_std"]) == pytest.approx(
            test[v].std(ddof=1))
        assert (c["best_on_val"] == "True") == (v == best)
        assert f"{test[v].mean():.4f} ± {test[v].std(ddof=1):.4f}" in text
    assert f"Best on validation: **tau = {best}**" in text and "Budget (epochs" in text
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tau | n | val acc | test acc | acc a | acc b | s / run |" in capsys.readouterr().out


def test_without_matplotlib_the_numbers_are_written_and_one_line_says_what_to_install(
        capsys, npz_file, tmp_path, monkeypatch):
    import mie.sweep
    monkeypatch.setattr(mie.sweep, "missing_extra", lambda: "no plot drawn: matplotlib is not installed (pip ...)")
    out = tmp_path / "sw"
    assert main(["sweep", "--data", str(npz_file), "--method", "mie", "--param", "tau", "--values", "0.1,1",
                 "--seeds", "0", "--out", str(out), *TINY]) == 0
    assert "no plot drawn: matplotlib is not installed" in capsys.readouterr().out
    assert (out / "sweep.md").exists() and (out / "sweep_curve.csv").exists() and not (out / "sweep.png").exists()


def test_sweep_of_integer_string_and_training_settings(capsys, npz_file, tmp_path):
    pytest.importorskip("matplotlib")
    for param, values, read in (("epochs_per_stage", "lin:1:2:2", lambda d: d["method_params"]["epochs_per_stage"]),
                                ("method.alternation", "stage,iteration", lambda d: d["method_params"]["alternation"]),
                                ("train.lr", "0.001,0.01", None)):
        out = tmp_path / param
        assert main(["sweep", "--data", str(npz_file), "--method", "mie", "--param", param, "--values", values,
                     "--seeds", "0", "--out", str(out), *TINY]) == 0, capsys.readouterr().err
        for r in _read_csv(out / "sweep.csv"):
            run = out / f"{param.replace('method.', '')}={r['value']}" / "seed_0"
            got = read(json.loads((run / "metrics.json").read_text())) if read else \
                yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"]
            assert str(got) == r["value"]
            assert r["epochs_a"] == r["epochs_b"] == "2"


@pytest.mark.parametrize("args, message", [
    (["--param", "nope", "--values", "1,2"], "method 'mie' has no parameter 'nope'"),
    (["--param", "lr", "--values", "1,2"], "for a training setting write train.lr"),
    (["--param", "tau", "--values", "0,1"], "--values: 0 is refused: method 'mie': tau must be a number > 0"),
    (["--param", "gm_scope", "--values", "0.5,2"], "gm_scope must be a number in [0, 1], got 2"),
    (["--param", "epochs_per_stage", "--values", "1,1.5"], "1.5 is refused"),
    (["--param", "alternation", "--values", "stage,sometimes"], "alternation must be one of 'stage', 'iteration'"),
    (["--param", "tau", "--values", "log:0:1:3"], "expected log:A:B:N"),
    (["--param", "tau", "--values", "0.1,0.10"], "the same value twice"),
    (["--param", "train.seed", "--values", "1,2"], "give the seeds with --seeds"),
    (["--param", "train.nope", "--values", "1,2"], "train.nope: unknown key"),
    (["--param", "train.lr", "--values", "0.1,-1"], "train.lr must be > 0"),
    (["--param", "data.path", "--values", "a,b"], "train.<key> or model.<key>"),
    (["--param", "tau", "--values", "0.1,1", "method.tau=0.3"], "sets method.tau, the swept parameter"),
    (["--method", "mie_sam_only", "--param", "tau", "--values", "0.1,1"], "has no parameter 'tau'"),
    (["--method", "nope", "--param", "tau", "--values", "1"], "unknown method 'nope'"),
    (["--param", "tau", "--values", "1", "--seeds", "a"], "--seeds must be comma-separated integers"),
])
def test_bad_input_is_one_line_before_anything_runs(capsys, npz_file, tmp_path, args, message):
    argv = ["sweep", "--data", str(npz_file), "--out", str(tmp_path / "sw"), *TINY, *args]
    if "--method" not in args:
        argv += ["--method", "mie"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "sw").exists()


def test_an_interrupted_sweep_continues_where_it_stopped(capsys, npz_file, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sw"
    argv = ["sweep", "--data", str(npz_file), "--method", "mie", "--param", "tau", "--values", "0.1,1",
            "--seeds", "0,1", "--out", str(out), *TINY]
    trained, real_run = [], mie.compare.run

    def stop_at_third(cfg, data, **kw):
        trained.append((cfg["method"]["tau"], cfg["train"]["seed"]))
        if len(trained) == 3:
            raise KeyboardInterrupt
        return real_run(cfg, data, **kw)
    monkeypatch.setattr(mie.compare, "run", stop_at_third)
    assert main(argv) == 130
    assert not (out / "sweep.csv").exists()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("tau=*/seed_*/metrics.json")}
    assert len(finished) == 2
    trained.clear()
    monkeypatch.setattr(mie.compare, "run", lambda cfg, data, **kw: trained.append(1) or real_run(cfg, data, **kw))
    assert main(argv) == 0, capsys.readouterr().err
    assert len(trained) == 2                                    # only the runs that had not finished
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert len(_read_csv(out / "sweep.csv")) == 4
    capsys.readouterr()
    assert main([*argv[:-len(TINY)], *TINY[1:], "train.epochs=3"]) == 2    # same --out, other settings
    assert "holds a finished run with other settings" in capsys.readouterr().err
