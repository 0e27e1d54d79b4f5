"""The `mie` command: outputs of train / eval / compare, and one clear line (exit 2) on bad input."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import TINY, make_arrays
from mie.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_every_output_and_eval_reproduces_test(capsys, npz_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--data", npz_file, "--method", "mie", "--seed", "1",
                                "--out", out, *TINY)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "mie" and metrics["seed"] == 1 and metrics["seconds"] > 0
    for key in ("accuracy", "macro_f1", "map"):
        assert 0 <= metrics["test"][key] <= 1 and key in metrics["val"]
    assert set(metrics["test"]["per_modality"]) == {"a", "b"}
    assert metrics["split"]["sizes"] == {"train": 84, "val": 18, "test": 18}
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == metrics["loop_epochs"] == 4            # 2 epochs × 2 modalities, alternating
    assert [r["active"] for r in rows] == ["a", "b", "a", "b"]
    assert {"val_accuracy", "val_acc_a", "val_acc_b", "gm_T_dist_identity", "gm_grad_rel_change"} <= set(rows[0])
    assert float(rows[3]["gm_T_dist_identity"]) > 0             # T^(a) ≠ I once a's stage has ended
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 1
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert list((out / "tensorboard").iterdir())
    split = np.load(out / "split.npz")
    assert sorted(np.concatenate([split["train"], split["val"], split["test"]]).tolist()) == list(range(120))
    assert not list(out.rglob("*.tmp"))

    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "best.pt")
    assert code == 0, err
    again = json.loads(stdout)
    assert again["accuracy"] == metrics["test"]["accuracy"] and again["map"] == metrics["test"]["map"]
    assert again["per_modality"] == metrics["test"]["per_modality"]


def test_train_refuses_to_overwrite_a_run(capsys, npz_file, tmp_path):
    args = ["train", "--data", npz_file, "--method", "joint", "--out", tmp_path / "r", *TINY]
    assert run_cli(capsys, *args)[0] == 0
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--resume" in err


@pytest.mark.parametrize("shapes, encoder", [({"a": (2, 16), "b": (3, 12)}, "CNN1DEncoder"),
                                             ({"a": (1, 8, 8), "b": (6,)}, "ResNetEncoder")])
def test_encoder_follows_the_rank_of_the_arrays(capsys, tmp_path, shapes, encoder):
    import torch
    x, y = make_arrays(n=60, shapes=shapes)
    path = tmp_path / "d.npz"
    np.savez(path, y=y, **{f"x_{m}": a for m, a in x.items()})
    code, _, err = run_cli(capsys, "train", "--data", path, "--method", "joint", "--out", tmp_path / "r", *TINY)
    assert code == 0, err
    state = torch.load(tmp_path / "r" / "checkpoints" / "best.pt", weights_only=False)
    assert state["spec"]["encoders"]["a"] == {"CNN1DEncoder": "cnn1d", "ResNetEncoder": "resnet_small"}[encoder]


def test_compare_writes_table_and_rows(capsys, npz_file, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "compare", "--data", npz_file, "--methods", "joint,mie",
                                "--seeds", "0,1", "--out", out, *TINY, "method.tau=0.8")
    assert code == 0, err
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["method"], r["seed"]) for r in rows] == [("joint", "0"), ("joint", "1"), ("mie", "0"), ("mie", "1")]
    table = (out / "results.md").read_text()
    assert "| joint |" in table and "| mie |" in table and "acc a" in table and "±" in table
    assert json.loads((out / "mie" / "seed_1" / "metrics.json").read_text())["method_params"]["tau"] == 0.8
    # a second call reads finished runs back instead of training again
    assert run_cli(capsys, "compare", "--data", npz_file, "--methods", "joint,mie", "--seeds", "0,1",
                   "--out", out, *TINY, "method.tau=0.8")[0] == 0


def test_methods_and_datasets_list(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and "mie " in out and "joint" in out and "tau=0.4" in out
    code, out, _ = run_cli(capsys, "datasets")
    assert code == 0 and "mfeat" in out and "basicmotions" in out


def _npz(tmp_path, **arrays):
    path = tmp_path / f"bad{len(list(tmp_path.glob('bad*.npz')))}.npz"
    np.savez(path, **arrays)
    return path


def bad_inputs(tmp_path):
    x, y = make_arrays(n=30)
    ok = {"x_a": x["a"], "y": y}
    nan = x["a"].copy()
    nan[3, 1] = np.nan
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lrr: 0.1\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    return {
        "missing file": (["--data", tmp_path / "nope.npz"], "no such file"),
        "no y": (["--data", _npz(tmp_path, x_a=x["a"])], "no array 'y'"),
        "no x": (["--data", _npz(tmp_path, y=y)], "no x_<modality> arrays"),
        "lengths": (["--data", _npz(tmp_path, x_a=x["a"][:20], y=y)], "20 samples but y has 30"),
        "nan": (["--data", _npz(tmp_path, x_a=nan, y=y)], "NaN or inf"),
        "negative label": (["--data", _npz(tmp_path, x_a=x["a"], y=y - 1)], "labels must be integers"),
        "class missing from train": (["--data", _npz(tmp_path, x_a=x["a"], y=y,
                                                     split=np.where(y == 2, 2, np.arange(30) % 2))],
                                     "no training samples"),
        "unknown method": (["--data", _npz(tmp_path, **ok), "--method", "magic"], "unknown method 'magic'"),
        "unknown dataset": (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        "unknown modality": (["--dataset", "mfeat", "--modalities", "pix,audio"], "unknown modality 'audio'"),
        "empty train": (["--data", _npz(tmp_path, x_a=x["a"], y=y, split=np.ones(30, int))], "train split is empty"),
        "bad config key": (["--data", _npz(tmp_path, **ok), "--config", config], "unknown config key 'train.lrr'"),
        "bad override key": (["--data", _npz(tmp_path, **ok), "train.lrr=1"], "unknown config key 'train.lrr'"),
        "bad method key": (["--data", _npz(tmp_path, **ok), "method.taux=1"], "unknown config key 'method.taux'"),
        "bad value type": (["--data", _npz(tmp_path, **ok), "train.epochs=many"], "train.epochs must be an integer"),
        "broken yaml": (["--data", _npz(tmp_path, **ok), "--config", broken], "cannot parse"),
        "not an npz": (["--data", config], "cannot read"),
    }


@pytest.mark.parametrize("case", [
    "missing file", "no y", "no x", "lengths", "nan", "negative label", "class missing from train",
    "unknown method", "unknown dataset", "unknown modality", "empty train", "bad config key",
    "bad override key", "bad method key", "bad value type", "broken yaml", "not an npz"])
def test_bad_input_gives_one_line_and_exit_2(capsys, tmp_path, case):
    args, message = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "train", "--out", out, *TINY, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mie: error:") and message in lines[0], err
    assert not (out / "metrics.json").exists()


def test_real_entry_point_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mie.cli", "train", "--data", str(tmp_path / "x.npz"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"mie: error: no such file: {tmp_path / 'x.npz'}"
    proc = subprocess.run([sys.executable, "-m", "mie.cli", "train", "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_diverged_training_is_one_line(tmp_path, npz_file, capsys):
    code = main(["train", "--data", str(npz_file), "--method", "joint", "--out", str(tmp_path / "r"), "--epochs", "2",
                 "train.optimizer=sgd", "train.lr=1e30", "model.dim=8", "model.head_hidden=[8]"])
    err = capsys.readouterr().err
    assert code == 2 and "training diverged" in err and err.count("\n") == 1


# ---- every command fails in one line ---------------------------------------------------------------
def _catalogue(tmp_path, npz_file):
    """(argv, expected text) for failures of train, eval, compare and prepare."""
    empty = _npz(tmp_path, x_a=np.zeros((0, 8), np.float32), y=np.zeros(0, int))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    damaged_run = tmp_path / "damaged"
    assert main(["train", "--data", str(npz_file), "--method", "joint", "--out", str(damaged_run), *TINY]) == 0
    (damaged_run / "checkpoints" / "last.pt").write_bytes(b"\x80\x04 truncated")
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"PK\x03\x04 not a zip")
    data = ["--data", npz_file]
    return {
        "train: npz with zero samples": (["train", "--data", empty, "--out", tmp_path / "o1", *TINY], "has no samples"),
        "train: --out is a file": (["train", *data, "--out", a_file, *TINY], "is a file; expected a folder"),
        "train: --resume from a damaged last.pt": (["train", *data, "--method", "joint", "--out", damaged_run,
                                                     "--resume", *TINY], "damaged or not a mie checkpoint"),
        "train: unknown fusion": (["train", *data, "--out", tmp_path / "o2", "method.fusion=bogus", *TINY],
                                  "fusion must be one of 'average', 'weight', 'log', 'fitted', 'model', got 'bogus'"),
        "train: tau out of range": (["train", *data, "--out", tmp_path / "o3", "method.tau=-1", *TINY],
                                    "tau must be a number > 0, got -1"),
        "eval: missing checkpoint": (["eval", "--checkpoint", tmp_path / "none.pt"], "no such file"),
        "eval: damaged checkpoint": (["eval", "--checkpoint", bad_ckpt], "damaged or not a mie checkpoint"),
        "compare: --out is a file": (["compare", *data, "--methods", "joint", "--seeds", "0", "--out", a_file, *TINY],
                                     "is a file; expected a folder"),
        "compare: unknown method": (["compare", *data, "--methods", "joint,magic", "--out", tmp_path / "c1", *TINY],
                                    "unknown method 'magic'"),
        "compare: diverged run": (["compare", *data, "--methods", "joint", "--seeds", "0", "--out", tmp_path / "c2",
                                   "train.optimizer=sgd", "train.lr=1e30", *TINY], "training diverged"),
        "prepare: root not a folder": (["prepare", "cremad", "--root", a_file], "is not a folder"),
        "prepare: unknown benchmark": (["prepare", "imagenet", "--root", tmp_path], "unknown benchmark 'imagenet'"),
        "prepare: bad option": (["prepare", "cremad", "--root", tmp_path, "fps=fast"], "fps"),
    }


CATALOGUE = ["train: npz with zero samples", "train: --out is a file", "train: --resume from a damaged last.pt",
             "train: unknown fusion", "train: tau out of range", "eval: missing checkpoint", "eval: damaged checkpoint",
             "compare: --out is a file", "compare: unknown method", "compare: diverged run",
             "prepare: root not a folder", "prepare: unknown benchmark", "prepare: bad option"]


@pytest.mark.parametrize("case", CATALOGUE)
def test_every_command_fails_in_one_line_with_exit_2(capsys, tmp_path, npz_file, case):
    argv, message = _catalogue(tmp_path, npz_file)[case]
    capsys.readouterr()
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mie: error:") and message in lines[0], err
    assert "Traceback" not in err


def test_an_unexpected_failure_is_still_one_line(capsys, monkeypatch, npz_file, tmp_path):
    import mie.train

    def boom(*args, **kwargs):
        raise RuntimeError("something inside broke")
    monkeypatch.setattr(mie.train, "prepare_run", boom)
    code, _, err = run_cli(capsys, "train", "--data", npz_file, "--out", tmp_path / "o", *TINY)
    assert code == 2 and err.strip().splitlines() == [
        "mie: error: unexpected RuntimeError: something inside broke (MIE_DEBUG=1 shows where)"]
    monkeypatch.setenv("MIE_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["train", "--data", str(npz_file), "--out", str(tmp_path / "o2"), *TINY])


def test_more_loader_workers_than_cores_are_capped_with_one_notice(npz_file, tmp_path, capsys, monkeypatch):
    import os
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert main(["train", "--data", str(npz_file), "--method", "joint", "--out", str(tmp_path / "run"),
                 "train.num_workers=4", *TINY]) == 0
    notices = json.loads((tmp_path / "run" / "metrics.json").read_text())["notices"]
    assert notices == ["train.num_workers=4 is more data-loading processes than the 1 cores this process may use; "
                       "using 1"]
