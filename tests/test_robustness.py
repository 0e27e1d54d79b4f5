"""Robustness evaluation (``mie eval --missing / --drop / --noise``): each corruption's unit, masks that
are the same for every model, the clean row equal to the run's own test metrics, and the fusion over
the modalities that are present."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mie
from conftest import TINY, make_arrays
from mie.cli import main
from mie.evaluate import evaluate_robustness, load_for_evaluation
from mie.robustness import Corruption, add_noise, erase, evaluate_corruption, parse_levels

CONFIG = {"train": {"epochs": 2, "batch_size": 16}, "model": {"dim": 16, "head_hidden": [16, 8]}}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_levels_parse_ranges_and_lists():
    assert parse_levels("0:0.9:0.1", "--missing") == (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert parse_levels("0.5,1", "--noise") == (0.5, 1.0)
    for bad in ("a", "0:1", "1:0:0.1", "0:1:0", "-1"):
        with pytest.raises(mie.MieInputError, match="--missing"):
            parse_levels(bad, "--missing")


def test_vector_elements_are_erased_independently_with_probability_r():
    x = torch.ones(400, 50)
    out = erase(x, 0.3, gen())
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert abs((out == 0).float().mean().item() - 0.3) < 0.02
    assert torch.equal(erase(x, 0.0, gen()), x)                  # r = 0 draws nothing, changes nothing
    assert torch.equal(erase(x, 0.3, gen(5)), erase(x, 0.3, gen(5)))
    assert not torch.equal(erase(x, 0.3, gen(5)), erase(x, 0.3, gen(6)))


@pytest.mark.parametrize("shape, unit_axes", [((3, 40), (2,)),              # sequence (C, L): time steps
                                               ((1, 6, 40), (3,)),          # spectrogram (C, F, T): time steps
                                               ((3, 40, 4, 4), (2,))])      # clip (C, T, H, W): frames
def test_a_unit_is_erased_whole(shape, unit_axes):
    x = torch.rand(8, *shape) + 1
    out = erase(x, 0.5, gen())
    erased = out == 0
    # a unit is erased across every other axis at once: reduce over all axes but batch and the unit axis
    other = tuple(a for a in range(1, x.ndim) if a not in unit_axes)
    assert torch.equal(erased.all(dim=other), erased.any(dim=other))
    assert 0.3 < erased.float().mean().item() < 0.7


def test_tokens_become_unk_keeping_cls_sep_and_padding():
    ids = torch.tensor([[101, 7, 8, 9, 102, 0, 0], [101, 5, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    out = erase(torch.stack([ids, mask], dim=1), 1.0, gen(), unk_id=100)
    assert out[:, 0].tolist() == [[101, 100, 100, 100, 102, 0, 0], [101, 100, 102, 0, 0, 0, 0]]
    assert torch.equal(out[:, 1], mask)


def test_noise_has_the_asked_scale_and_leaves_tokens_alone():
    x = torch.zeros(200, 100)
    assert abs(add_noise(x, 2.0, gen()).std().item() - 2.0) < 0.05
    tokens = torch.ones(4, 2, 5, dtype=torch.long)
    assert torch.equal(add_noise(tokens, 2.0, gen()), tokens)
    assert add_noise(x, 0.0, gen()) is x


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three trained runs on the same data: late-fusion joint, MIE (average of heads), concat joint."""
    root = tmp_path_factory.mktemp("runs")
    x, y = make_arrays(n=150)
    data = mie.MultimodalArrays(x, y)
    out = {}
    for name in ("joint", "mie", "joint_concat"):
        mie.fit(data, name, config=CONFIG, out_dir=root / name, seed=1, progress=False)
        out[name] = root / name
    return data, out


@pytest.mark.parametrize("name", ["joint", "mie", "joint_concat"])
def test_clean_rows_equal_the_runs_test_metrics(runs, name, tmp_path):
    data, dirs = runs
    test = json.loads((dirs[name] / "metrics.json").read_text())["test"]
    rows, _, _ = evaluate_robustness(dirs[name] / "checkpoints" / "best.pt", data, rates=(0.0, 0.5), noises=(0.0,),
                                     out_dir=tmp_path)
    for row in (rows[0], rows[3]):                         # missing 0, noise 0
        assert row["accuracy"] == test["accuracy"] and row["macro_f1"] == test["macro_f1"]
        assert {m: row[f"acc_{m}"] for m in ("a", "b")} == {m: v["accuracy"] for m, v in test["per_modality"].items()}
    assert rows[2]["setting"] == "missing mean"
    assert rows[2]["accuracy"] == pytest.approx((rows[0]["accuracy"] + rows[1]["accuracy"]) / 2)


def test_same_seed_same_damage_for_every_model(runs):
    """Two evaluations with one mask seed meet the same masks: the inputs the model sees are equal."""
    data, dirs = runs
    seen = []
    method, data_loader, dev, _ = load_for_evaluation(dirs["joint"] / "checkpoints" / "best.pt", data)
    original = method.predict
    method.predict = lambda xs: (seen.append({m: v.clone() for m, v in xs.items()}), original(xs))[1]
    for _ in range(2):
        evaluate_corruption(method, data_loader, dev, Corruption("missing", 0.4), mask_seed=3)
    half = len(seen) // 2
    assert all(torch.equal(seen[i][m], seen[half + i][m]) for i in range(half) for m in ("a", "b"))


def test_told_fusion_uses_only_the_present_modalities(runs):
    data, dirs = runs
    for name in ("joint", "mie"):
        method, data_loader, dev, _ = load_for_evaluation(dirs[name] / "checkpoints" / "best.pt", data)
        xs = {m: torch.as_tensor(v[:10]) for m, v in data.x.items()}
        method.model.eval()
        per, _ = method.logits(xs)
        told = method.predict_present(xs, ["b"])
        # joint's sum of logits and MIE's average of probabilities both reduce to b's own prediction
        torch.testing.assert_close(told, F.softmax(per["b"], dim=-1))
        row = evaluate_corruption(method, data_loader, dev, Corruption("drop", removed=("a",)))
        assert row["told_accuracy"] == row["acc_b"]
    concat, data_loader, dev, _ = load_for_evaluation(dirs["joint_concat"] / "checkpoints" / "best.pt", data)
    assert concat.predict_present(xs, ["b"]) is None            # one head on joint features: cannot be told
    assert evaluate_corruption(concat, data_loader, dev, Corruption("drop", removed=("a",)))["told_accuracy"] is None


def test_joint_three_modalities_told_is_the_sum_of_the_present_logits():
    x, y = make_arrays(n=60, shapes={"a": (4,), "b": (3,), "c": (2,)})
    method = mie.create_method("joint")
    from mie.models import ModelSpec
    spec = ModelSpec(["a", "b", "c"], {"a": (4,), "b": (3,), "c": (2,)}, {m: "mlp" for m in "abc"}, 3, 8, (8,))
    method.model = method.build_model(spec).eval()
    xs = {m: torch.as_tensor(v) for m, v in x.items()}
    per = method.model(xs)
    torch.testing.assert_close(method.predict_present(xs, ["a", "c"]), F.softmax(per["a"] + per["c"], dim=-1))


def test_cli_writes_csv_markdown_and_plot(npz_file, tmp_path, capsys):
    assert main(["train", "--data", str(npz_file), "--method", "joint", "--out", str(tmp_path / "run"), *TINY]) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "best.pt")
    assert main(["eval", "--checkpoint", ckpt, "--data", str(npz_file), "--missing", "0:0.9:0.3",
                 "--drop", "a", "--noise", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| missing mean |" in printed.replace("**", "") and "drop a" in printed
    folder = tmp_path / "run" / "robustness"
    rows = list(csv.DictReader((folder / "robustness.csv").open()))
    assert [r["setting"] for r in rows] == ["missing 0", "missing 0.3", "missing 0.6", "missing 0.9", "missing mean",
                                            "noise 1", "drop a"]
    assert (folder / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    assert float(rows[0]["accuracy"]) == test["accuracy"]


@pytest.mark.parametrize("args, message", [
    (["--drop", "zz"], "--drop zz: name some but not all"),
    (["--drop", "a,b"], "--drop a,b: name some but not all"),
    (["--missing", "0,1.5"], "probabilities in \\[0, 1\\]"),
    (["--out", "X"], "--out is for a robustness report"),
])
def test_cli_refuses_bad_robustness_input_in_one_line(npz_file, tmp_path, capsys, args, message):
    assert main(["train", "--data", str(npz_file), "--method", "joint", "--out", str(tmp_path / "run"), *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best.pt"), "--data", str(npz_file),
                 *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(message, err)


def test_compare_adds_the_mean_over_missing_rates(npz_file, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(npz_file), "--methods", "joint,mie", "--seeds", "0", "--out", str(out),
                 "--robustness", *TINY]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    for row in rows:
        report = list(csv.DictReader((out / row["method"] / "seed_0" / "robustness" / "robustness.csv").open()))
        assert [r["setting"] for r in report][:10] == [f"missing {r:g}" for r in np.arange(10) / 10]
        assert float(row["test_missing_acc"]) == pytest.approx(float(report[10]["accuracy"]))
        assert float(report[0]["accuracy"]) == float(row["test_accuracy"])
    assert "missing r 0–0.9 (mean)" in (out / "results.md").read_text()


@pytest.mark.parametrize("name", sorted(mie.METHODS))
def test_every_method_is_evaluated_from_its_checkpoint_alone(tmp_path, name):
    """`mie eval` builds a method from its checkpoint without training it (no ``setup``): its clean row
    equals the run's test metrics, and damaged inputs and a dropped modality evaluate."""
    x, y = make_arrays(n=90, shapes={"a": (8,)} if name == "unimodal" else {"a": (8,), "b": (5,)})
    data = mie.MultimodalArrays(x, y)
    config = {**CONFIG, "train": {**CONFIG["train"], "epochs": 1}}
    result = mie.fit(data, name, config=config, out_dir=tmp_path / "run", seed=0, progress=False)
    drops = [] if name == "unimodal" else [("a",)]
    rows, _, _ = evaluate_robustness(tmp_path / "run" / "checkpoints" / "best.pt", data, rates=(0.0, 0.5),
                                     drops=drops, out_dir=tmp_path / "rob")
    assert rows[0]["accuracy"] == result["test"]["accuracy"]
    assert all(np.isfinite(r["accuracy"]) for r in rows)


def test_text_modalities_erase_to_their_tokenizers_unk():
    """MiniLM's tokenizer (bert-base-uncased WordPiece, shipped offline) names [UNK] = 100."""
    from mie.models import ModelSpec
    from mie.robustness import unknown_token_ids
    spec = ModelSpec(["img", "text"], {"img": (8,), "text": (2, 16)}, {"img": "mlp", "text": "minilm"}, 3, 8, (8,))
    assert unknown_token_ids(spec) == {"text": 100}
