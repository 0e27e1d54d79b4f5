"""`mie bench` and the loop's wall-time breakdown (metrics.json "timing")."""
import csv

import pytest
import torch

from conftest import TINY
from mie import config as config_mod
from mie.bench import PHASES, bench, bench_rows, label_config, parse_label, raw_throughput
from mie.cli import main
from mie.errors import MieInputError
from mie.train import run

ARGS = TINY + ["train.threads=1"]


def tiny_config(npz_file, method="joint"):
    return config_mod.build_config(None, ARGS, data={"path": str(npz_file)}, method={"name": method})


@pytest.mark.parametrize("method", ["joint", "mie"])
def test_timing_shares_sum_to_the_run_seconds(npz_file, method):
    result = run(tiny_config(npz_file, method), progress=False)
    timing, seconds = result["timing"], result["seconds"]
    parts = [timing[k] for k in PHASES]
    assert all(p >= 0 for p in parts)
    assert sum(parts) <= seconds + 0.003          # each figure rounded to the millisecond
    assert sum(parts) >= 0.9 * seconds - 0.003    # the loop does little outside the four phases
    n_train, bs = result["split"]["sizes"]["train"], 32
    per_pass = n_train - (1 if n_train % bs == 1 else 0)
    assert timing["train_samples"] == per_pass * result["loop_epochs"]
    if method == "mie":
        assert timing["end_epoch"] > 0            # covariance and T after each stage


def fake_result(seconds, steps, validation, end, data, samples, loop_epochs=2, optimizer_steps=6):
    return {"seconds": seconds, "loop_epochs": loop_epochs, "budget": {"optimizer_steps": optimizer_steps},
            "timing": {"train_steps": steps, "validation": validation, "end_epoch": end, "data_loading": data,
                       "train_samples": samples}}


def test_bench_rows_by_hand():
    results = {"joint": fake_result(4.0, 2.0, 1.5, 0.0, 0.4, 1000),
               "mie": fake_result(9.0, 5.0, 2.0, 1.5, 0.3, 2000, 4, 12)}
    rows = {r["method"]: r for r in bench_rows(results, "joint", epochs=2, raw=1000.0)}
    assert list(rows) == ["joint", "mie"]
    assert rows["joint"]["seconds_per_epoch"] == 2.0 and rows["mie"]["seconds_per_epoch"] == 4.5
    assert rows["mie"]["ratio"] == pytest.approx(9.0 / 4.0) and rows["joint"]["ratio"] == 1.0
    assert rows["mie"]["share_train_steps"] == pytest.approx(5 / 9)
    assert rows["mie"]["share_end_epoch"] == pytest.approx(1.5 / 9)
    assert rows["mie"]["samples_per_second"] == pytest.approx(400.0)
    assert rows["mie"]["of_raw"] == pytest.approx(0.4)
    assert (rows["mie"]["loop_epochs"], rows["mie"]["optimizer_steps"]) == (4, 12)
    # with every turn's seconds: the ratio within each turn, its median and range
    turns = {"joint": [4.0, 5.0, 4.4], "mie": [9.0, 9.5, 11.0]}
    rows = {r["method"]: r for r in bench_rows(results, "joint", epochs=2, turns=turns)}
    assert rows["mie"]["ratio"] == pytest.approx(9.0 / 4.0)          # of 2.25, 1.9, 2.5
    assert (rows["mie"]["ratio_min"], rows["mie"]["ratio_max"]) == pytest.approx((1.9, 2.5))
    assert rows["mie"]["seconds_per_epoch"] == 4.5 and rows["joint"]["ratio"] == 1.0


def test_bench_measures_the_requested_methods(npz_file):
    cfg = tiny_config(npz_file)
    rows, raw, text = bench(cfg, ["mie", "joint"], epochs=1, repeats=2, log=lambda line: None)
    assert [r["method"] for r in rows] == ["mie", "joint"] and raw is None
    by = {r["method"]: r for r in rows}
    assert by["mie"]["ratio_min"] <= by["mie"]["ratio"] <= by["mie"]["ratio_max"]
    assert by["mie"]["loop_epochs"] == 2 and by["joint"]["loop_epochs"] == 1
    for r in rows:
        shares = [r[f"share_{k}"] for k in PHASES]
        assert all(s >= 0 for s in shares) and 0.85 <= sum(shares)
        assert sum(shares) * r["seconds"] <= r["seconds"] + 0.003     # each phase rounded to the millisecond
        assert f"| {r['method']} | {r['seconds_per_epoch']:.3f} | {r['ratio']:.2f} | {r['ratio_min']:.2f}–" in text


def test_variants_and_bad_labels():
    assert parse_label("mie:rho=0.1:gm=false") == ("mie", {"rho": 0.1, "gm": False})
    with pytest.raises(MieInputError, match="parameter of joint"):
        parse_label("joint:rho=0.1")
    with pytest.raises(MieInputError):
        parse_label("nosuchmethod")


def test_raw_throughput_runs_on_cpu(npz_file):
    cfg = label_config(tiny_config(npz_file), "joint", {}, 1)
    assert raw_throughput(cfg, steps=3, warmup=1) > 0


def test_cli_bench_end_to_end(npz_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--data", str(npz_file), "--epochs", "1", "--repeats", "1", *ARGS]) == 0
    out = capsys.readouterr().out
    assert "| joint |" in out and "| mie |" in out and "× joint" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.npz"]          # nothing written without --out
    assert main(["bench", "--data", str(npz_file), "--epochs", "1", "--repeats", "1", "--methods", "joint,mie",
                 "--out", str(tmp_path / "b"), *ARGS]) == 0
    rows = list(csv.DictReader(open(tmp_path / "b" / "bench.csv")))
    assert [r["method"] for r in rows] == ["joint", "mie"]
    assert float(rows[1]["ratio"]) == pytest.approx(float(rows[1]["seconds"]) / float(rows[0]["seconds"]))
    assert "| mie |" in (tmp_path / "b" / "bench.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU exists")
def test_cli_cuda_without_gpu_is_one_line(npz_file, capsys):
    assert main(["bench", "--data", str(npz_file), "--device", "cuda", *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA GPU" in err
