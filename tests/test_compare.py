"""mie compare's statistics and budgets: paired differences against an independent computation,
the budget check, the † mark, and --config's method settings reaching the methods that have them."""
import csv
import json

import numpy as np
import pytest

from conftest import TINY
from mie.cli import main
from mie.compare import check_budget, paired_differences, paired_table, results_table
from mie.errors import MieInputError

T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}     # Student t quantiles, 0.975, by degrees of freedom


def _rows(accs):
    return [{"method": m, "seed": s, "test_accuracy": a, "seconds": 1.0, "val_accuracy": 0.5}
            for m, values in accs.items() for s, a in enumerate(values)]


def test_paired_differences_by_hand():
    accs = {"joint": [0.80, 0.82, 0.78, 0.81, 0.79], "mie": [0.83, 0.85, 0.80, 0.84, 0.80],
            "ogm": [0.79, 0.83, 0.77, 0.80, 0.80]}
    diffs = paired_differences(_rows(accs), ["joint", "mie", "ogm"], "joint")
    for m in ("mie", "ogm"):
        d = np.array(accs[m]) - np.array(accs["joint"])
        half = T_975[4] * d.std(ddof=1) / np.sqrt(5)
        mean, got_half, won, n = diffs[m]
        assert mean == pytest.approx(d.mean()) and got_half == pytest.approx(half) and n == 5
        assert won == int((d > 0).sum())
    table = paired_table(_rows(accs), ["joint", "mie", "ogm"], "joint")
    assert "| mie | 5 | **+0.0240** | [+0.0129, +0.0351] | 5/5 |" in table      # excludes 0: bold
    assert "| ogm | 5 | -0.0020 | [-0.0156, +0.0116] | 2/5 |" in table         # contains 0


def test_pairs_use_only_the_seeds_both_ran():
    rows = _rows({"joint": [0.5, 0.6, 0.7], "mie": [0.6, 0.8]})
    mean, half, won, n = paired_differences(rows, ["joint", "mie"], "joint")["mie"]
    assert n == 2 and mean == pytest.approx(0.15) and won == 2


def test_the_table_states_n_and_marks_early_stopping():
    rows = _rows({"joint": [0.5, 0.6], "mses": [0.6, 0.7]})
    for r in rows:
        r["stops_early"] = r["method"] == "mses"
    table = results_table(rows, ["joint", "mses"])
    assert "| method | n |" in table and "| joint | 2 |" in table and "| mses † | 2 |" in table


def test_unequal_budgets_are_refused_unless_by_design():
    result = {"method": "mie", "budget": {"modality_epochs": {"a": 2, "b": 3}, "optimizer_steps": 10,
                                          "stops_early": False}}
    with pytest.raises(MieInputError, match="not 2 each: a comparison needs every method at the same budget"):
        check_budget(result, 2)
    result["budget"]["stops_early"] = True
    check_budget(result, 2)


def test_compare_writes_budgets_and_paired_intervals(capsys, npz_file, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--data", str(npz_file), "--methods", "joint,mie", "--seeds", "0,1,2",
                 "--out", str(out), *TINY])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["epochs_a"] for r in rows} == {"2"} and {r["epochs_b"] for r in rows} == {"2"}
    assert all(int(r["optimizer_steps"]) > 0 for r in rows)
    acc = {(r["method"], r["seed"]): float(r["test_accuracy"]) for r in rows}
    d = np.array([acc[("mie", s)] - acc[("joint", s)] for s in "012"])
    half = T_975[2] * d.std(ddof=1) / np.sqrt(3)
    text = (out / "results.md").read_text()
    assert f"[{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]" in text
    assert "Paired by seed against `joint`" in text and "(n = 3 per method)" in text
    assert "Budget (epochs of updates per modality, optimizer steps per run): joint a 2/b 2" in text
    metrics = json.loads((out / "mie" / "seed_0" / "metrics.json").read_text())
    assert metrics["budget"]["modality_epochs"] == {"a": 2, "b": 2}


def test_compare_config_method_settings_reach_the_methods_that_have_them(capsys, npz_file, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("method:\n  name: mie\n  tau: 0.9\n  fusion: weight\n")
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(npz_file), "--config", str(config), "--methods", "joint,mie",
                 "--seeds", "0", "--out", str(out), *TINY]) == 0
    mie_params = json.loads((out / "mie" / "seed_0" / "metrics.json").read_text())["method_params"]
    joint_params = json.loads((out / "joint" / "seed_0" / "metrics.json").read_text())["method_params"]
    assert mie_params["tau"] == 0.9 and mie_params["fusion"] == "weight"
    assert "tau" not in joint_params and joint_params["fusion"] == "weight"


def test_reference_must_be_compared(capsys, npz_file, tmp_path):
    code = main(["compare", "--data", str(npz_file), "--methods", "joint,mie", "--reference", "ogm_ge",
                 "--out", str(tmp_path / "c"), *TINY])
    assert code == 2 and "--reference ogm_ge is not among the compared methods" in capsys.readouterr().err


def test_variants_of_one_method_are_compared_and_paired(capsys, npz_file, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--data", str(npz_file), "--methods", "mie,mie:sam_every=2:gm_refresh=2", "--seeds", "0,1",
                 "--out", str(out), "method.tau=0.9", *TINY])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["mie", "mie", "mie:sam_every=2:gm_refresh=2", "mie:sam_every=2:gm_refresh=2"]
    plain = json.loads((out / "mie" / "seed_0" / "metrics.json").read_text())["method_params"]
    variant = json.loads((out / "mie:sam_every=2:gm_refresh=2" / "seed_0" / "metrics.json").read_text())
    assert (plain["sam_every"], plain["gm_refresh"], plain["tau"]) == (1, 1, 0.9)
    assert (variant["method"], variant["method_params"]["sam_every"], variant["method_params"]["gm_refresh"],
            variant["method_params"]["tau"]) == ("mie", 2, 2, 0.9)
    assert "Paired by seed against `mie`" in (out / "results.md").read_text()
    code = main(["compare", "--data", str(npz_file), "--methods", "mie,mie:bogus=1", "--out", str(tmp_path / "x"), *TINY])
    assert code == 2 and "cannot read 'bogus=1' in --methods mie:bogus=1" in capsys.readouterr().err
