"""`mie ablate`: its rows, its tables, and the accuracy after each stage against the stage-end models
evaluated directly (`mie eval`'s path) and against a run whose budget ends at that stage."""
import csv

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY, make_arrays
from mie import config as config_mod
from mie.ablate import ablate, ablation_rows
from mie.cli import main
from mie.compare import method_config
from mie.errors import MieInputError
from mie.evaluate import evaluate_checkpoint
from mie.train import run

LABELS = ["alternating", "mie_sam_only", "mie_gm_only", "mie", "mie_gm_into_a", "mie_gm_into_b"]


def _cfg(npz_file, *overrides):
    return config_mod.build_config(None, TINY + ["train.threads=1", *overrides], data={"path": str(npz_file)})


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_tables_and_accuracy_after_each_stage(npz_file, tmp_path):
    cfg = _cfg(npz_file)
    out = tmp_path / "ablate"
    rows, stages = ablate(cfg, [0, 1], out, log=lambda line: None)

    assert [(r["method"], r["seed"]) for r in rows] == [(label, s) for label in LABELS for s in (0, 1)]
    table = _csv(out / "ablation.csv")
    assert [(r["method"], r["sam"], r["gm"], r["gm_into"]) for r in table[::2]] == [
        ("alternating", "False", "False", ""), ("mie_sam_only", "True", "False", ""),
        ("mie_gm_only", "False", "True", "a,b"), ("mie", "True", "True", "a,b"),
        ("mie_gm_into_a", "True", "True", "a"), ("mie_gm_into_b", "True", "True", "b")]
    for label, into in (("mie_gm_into_a", ["a"]), ("mie_gm_into_b", ["b"]), ("mie", None)):
        saved = yaml.safe_load((out / label / "mie" / "seed_0" / "config.yaml").read_text())["method"]
        assert saved["gm_into"] == into and saved["stage_checkpoints"] is True
    assert [float(r["test_accuracy"]) for r in table] == [r["test_accuracy"] for r in rows]

    # 2 epochs per modality in stages of one epoch: a, b, a, b
    mine = [s for s in stages if s["method"] == "mie" and s["seed"] == 0]
    assert [(s["stage"], s["epoch"], s["trained"]) for s in mine] == [(1, 1, "a"), (2, 2, "b"), (3, 3, "a"),
                                                                      (4, 4, "b")]
    assert len(_csv(out / "ablation_stages.csv")) == len(stages) == len(LABELS) * 2 * 4
    assert not list(out.glob("*/*/seed_*/checkpoints/epoch_*.pt"))      # evaluated, then removed

    # the same run trained directly keeps its stage-end models; evaluated as `mie eval` does, they agree
    direct = tmp_path / "direct"
    mie_cfg = config_mod.merge(method_config(cfg, "mie", {"stage_checkpoints": True}), {"train": {"seed": 0}})
    run(mie_cfg, out_dir=direct, progress=False)
    for s in mine:
        metrics = evaluate_checkpoint(direct / "checkpoints" / f"epoch_{s['epoch']}.pt", split="test")
        assert metrics["accuracy"] == pytest.approx(s["test_accuracy"], abs=1e-12)
        for m in "ab":
            assert metrics["per_modality"][m]["accuracy"] == pytest.approx(s[f"test_acc_{m}"], abs=1e-12)
    # … and they are the models at the stage ends: a budget of one epoch per modality ends at stage 2
    short = tmp_path / "short"
    run(config_mod.merge(mie_cfg, {"train": {"epochs": 1}}), out_dir=short, progress=False)
    kept = torch.load(direct / "checkpoints" / "epoch_2.pt", weights_only=False)["model"]
    for name, value in torch.load(short / "checkpoints" / "last.pt", weights_only=False)["model"].items():
        torch.testing.assert_close(kept[name], value, rtol=0, atol=0)

    text = (out / "ablation.md").read_text()
    assert "Paired by seed against `mie`" in text and "reads the test split at the end of every stage" in text
    stage_table = text.split("## Test accuracy after each stage (analysis)")[1]
    assert stage_table.count("\n| ") == 1 + 4                               # header + 4 stages
    first = np.mean([s["test_accuracy"] for s in stages if s["method"] == "alternating" and s["stage"] == 1])
    assert f"| 1 | 1 | a | {first:.4f} (" in stage_table
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again, again_stages = ablate(cfg, [0, 1], out, log=lambda line: None)   # read back, nothing retrained
    assert again_stages == stages and [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows]


def test_settings_ablate_owns_and_unusable_data_are_refused(npz_file, tmp_path):
    cfg = _cfg(npz_file)
    for overrides, match in (({"sam": False}, "sets method.sam"), ({"gm_into": ["a"]}, "sets method.gm_into"),
                             ({"alpha": 1.0}, "no parameter")):
        with pytest.raises(MieInputError, match=match):
            ablate(cfg, [0], tmp_path / "x", overrides)
    assert [label for label, _, _ in ablation_rows(["a", "b", "c"])][-3:] == [
        "mie_gm_into_a", "mie_gm_into_b", "mie_gm_into_c"]
    x, y = make_arrays()
    one = tmp_path / "one.npz"
    np.savez(one, y=y, x_a=x["a"])
    with pytest.raises(MieInputError, match="two or more modalities"):
        ablate(_cfg(one), [0], tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_applies_method_settings_to_the_rows_that_have_them(capsys, npz_file, tmp_path):
    out = tmp_path / "cli"
    code = main(["ablate", "--data", str(npz_file), "--seeds", "0", "--out", str(out), "method.tau=0.8",
                 "train.epochs=1", *TINY[1:], "train.threads=1"])
    stdout = capsys.readouterr().out
    assert code == 0 and "# MIE ablation on" in stdout and "mie_gm_into_b" in stdout
    method = lambda label, name: yaml.safe_load((out / label / name / "seed_0" / "config.yaml").read_text())["method"]
    assert method("mie_gm_into_a", "mie")["tau"] == 0.8 and method("mie_gm_only", "mie_gm_only")["tau"] == 0.8
    assert "tau" not in method("alternating", "alternating")
    assert main(["ablate", "--data", str(npz_file), "--out", str(tmp_path / "bad"), "method.gm=false"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
