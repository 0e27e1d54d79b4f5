"""SMV (mie.methods.smv): parity with a transcription of the authors' released valuation, re-sampling
and training step (sample and modality level); the copy counts of hand-set φ values at and around the
thresholds; exact Shapley values for three modalities against a permutation average; the re-sampled set
reaching the next epoch's steps (and nothing else changing during warm-up); resume; edge cases; the CLI."""
import copy
import csv
from collections import Counter
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import mie
import mie.cli
import mie.methods
from conftest import TINY, make_arrays, make_context, make_step
from mie.data import ArrayDataset
from mie.errors import MieInputError
from mie.methods import Batch, create_method, method_params
from mie.methods.smv import SMV, Resampled, sample_copies, shapley_values
from mie.models import ClassifierHead, SharedHeadModel


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(mie.methods.METHODS, "smv", (SMV, {"level": "sample"}, "SMV, sample level"))
    monkeypatch.setitem(mie.methods.METHODS, "smv_modality", (SMV, {"level": "modality"}, "SMV, modality level"))


def _model(mods=("a", "v"), seed=0):
    """Linear encoders and one Linear on the concatenation (the code's ConcatFusion)."""
    torch.manual_seed(seed)
    enc = {m: nn.Linear(3 + i, 4) for i, m in enumerate(mods)}
    return SharedHeadModel(enc, ClassifierHead(4 * len(mods), 3, hidden=()), "concat")


def _data(mods=("a", "v"), n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = {m: torch.randn(n, 3 + i, generator=g) for i, m in enumerate(mods)}
    return xs, torch.arange(n) % 3


def _batches(xs, y, size=16):
    return [Batch({m: x[i:i + size] for m, x in xs.items()}, y[i:i + size]) for i in range(0, len(y), size)]


def _method(model, xs, y, epochs=4, **params):
    method = create_method(params.pop("name", "smv"), **params)
    method.setup(model, make_context(model.modalities, lr=0.1, train_batches=_batches(xs, y),
                                     epochs_per_modality=epochs))
    return method


def _extra_items(method, xs, y):
    """[(sample index, kept modality index)] of the extra items of the next epoch's set."""
    data = method.training_data(1, ArrayDataset({m: x.numpy() for m, x in xs.items()}, y.numpy()))
    assert isinstance(data, Resampled)
    return [(int(i), int(k)) for i, k in zip(data.index, data.keep)]


# ---- parity with the authors' released code ---------------------------------------------------
# Transcription of GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation @7ed12b0:
# code/sample_level.py lines 83-122 (execute_modulation: eval mode, no grad, out / exec_drop outputs,
# softmax, np.argmax, value_all = 2.0, value_a = value_v = 1.0, contrib = (own + all - other) / 2),
# code/models/models.py lines 74-86 (exec_drop: the dropped feature replaced by zeros, then
# fusion_module(cat)), code/datasets/dataloader.py lines 154-186 (copies of each sample: drop = 2 for
# contrib_a, drop = 1 for contrib_v, by the strict thresholds), code/models/models.py lines 62-72 and
# sample_level.py lines 164-176 (a training step on a drop batch: a[i,:] = 0 / v[i,:] = 0, CE, step),
# code/modality_level.py lines 143-161 and dataloader.py lines 297-316 (modality level).
def _code_contribution(model, xs, y):
    contribution = {}
    softmax = nn.Softmax(dim=1)
    with torch.no_grad():
        model.eval()
        a = model.encoders["a"](xs["a"])
        v = model.encoders["v"](xs["v"])
        out = model.head(torch.cat((a, v), 1))
        out_v = model.head(torch.cat((torch.zeros_like(a), v), 1))       # exec_drop(drop="audio")
        out_a = model.head(torch.cat((a, torch.zeros_like(v)), 1))       # exec_drop(drop="visual")
        prediction, pred_v, pred_a = softmax(out), softmax(out_v), softmax(out_a)
        for i in range(len(y)):
            index_all = np.argmax(prediction[i].numpy())
            index_v = np.argmax(pred_v[i].numpy())
            index_a = np.argmax(pred_a[i].numpy())
            value_all = 2.0 if index_all == y[i] else 0.0
            value_v = 1.0 if index_v == y[i] else 0.0
            value_a = 1.0 if index_a == y[i] else 0.0
            contrib_a = (value_a + value_all - value_v) / 2.0
            contrib_v = (value_v + value_all - value_a) / 2.0
            contribution[i] = (contrib_a, contrib_v)
    model.train()
    return contribution


def _code_sample_level_extras(contribution):
    data, drop = [], []
    for i in range(len(contribution)):
        contrib_a, contrib_v = contribution[i]
        if 0.4 < contrib_a < 1:
            n_a = 1
        elif -0.1 < contrib_a < 0.4:
            n_a = 2
        elif contrib_a < -0.1:
            n_a = 3
        else:
            n_a = 0
        data += [i] * n_a
        drop += [2] * n_a
        if 0.4 < contrib_v < 1:
            n_v = 1
        elif -0.1 < contrib_v < 0.4:
            n_v = 2
        elif contrib_v < -0.1:
            n_v = 3
        else:
            n_v = 0
        data += [i] * n_v
        drop += [1] * n_v
    return data, drop


def _code_train_step(model, xs, y, drop, lr):
    """sample_level.py train_epoch step with models.py's drop branch, plain SGD."""
    a = model.encoders["a"](xs["a"])
    v = model.encoders["v"](xs["v"])
    for i in range(len(drop)):
        if drop[i] == 1:
            a[i, :] = 0.0
        elif drop[i] == 2:
            v[i, :] = 0.0
    out = model.head(torch.cat((a, v), 1))
    loss = nn.CrossEntropyLoss()(out, y)
    for p in model.parameters():
        p.grad = None
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return loss


def test_sample_level_parity_with_the_released_valuation_and_resampling():
    xs, y = _data()
    model = _model()
    method = _method(model, xs, y, warmup=1)
    method.end_epoch(0)                                   # warm-up over: value the training set
    contribution = _code_contribution(copy.deepcopy(model), xs, y)
    data, drop = _code_sample_level_extras(contribution)
    keep_of_drop = {2: 0, 1: 1}                           # drop visual = keep a; drop audio = keep v
    assert _extra_items(method, xs, y) == [(i, keep_of_drop[d]) for i, d in zip(data, drop)]
    phi = shapley_values(model, _batches(xs, y))
    torch.testing.assert_close(phi, torch.tensor([contribution[i] for i in range(len(y))], dtype=torch.float64))
    per_pair = Counter(zip(data, drop))                  # copies of each (sample, modality) that has any
    assert len(set(per_pair.values())) >= 2 and len(per_pair) < 2 * len(y)     # several branches taken


def test_training_step_on_a_resampled_batch_matches_the_released_drop_forward():
    xs, y = _data(n=12)
    model = _model()
    reference = copy.deepcopy(model)
    method = _method(model, xs, y)
    keep = torch.tensor([-1, 0, 1, 0, -1, 1, 1, 0, -1, -1, 0, 1])
    drop = [{-1: 0, 0: 2, 1: 1}[int(k)] for k in keep]
    logs = method.training_step(Batch(xs, y, {"keep": keep}), make_step())
    loss = _code_train_step(reference, xs, y, drop, lr=0.1)
    torch.testing.assert_close(logs["loss"], loss.detach())
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_modality_level_parity_with_the_released_rule():
    xs, y = _data(n=50)
    model = _model(seed=5)
    method = _method(model, xs, y, name="smv_modality", warmup=1, part_ratio=0.3, alpha=2.0)
    torch.manual_seed(11)
    logs = method.end_epoch(0)
    extras = _extra_items(method, xs, y)
    contribution = _code_contribution(copy.deepcopy(model), xs, y)
    # modality_level.py 143-161 and dataloader.py 297-316, numpy's np.random.choice replaced by the
    # same draws from torch's global generator (the source of randomness is ours)
    torch.manual_seed(11)
    length = len(y)
    num = int(length * 0.3)
    part_cona = part_conv = 0.0
    for i in torch.randint(length, (num,)).tolist():
        part_cona += contribution[i][0]
        part_conv += contribution[i][1]
    part_cona /= num
    part_conv /= num
    gap_a, gap_v = 1.0 - part_cona, 1.0 - part_conv
    difference = (abs(gap_a - gap_v) / 3 * 2) * 2.0
    resample_num = int(difference * length)
    sample_choice = torch.randint(length, (resample_num,)).tolist()
    expected = [(i, 0 if gap_a > gap_v else 1) for i in sample_choice]
    assert resample_num > 0 and extras == expected
    assert logs["smv_gap_a"] == pytest.approx(gap_a) and logs["smv_gap_v"] == pytest.approx(gap_v)


# ---- the mechanism --------------------------------------------------------------------------
def test_copy_counts_follow_the_thresholds_by_hand():
    phi = torch.tensor([[-0.5, 0.0], [0.5, 1.0], [1.5, 0.3], [0.4, -0.1], [0.41, -0.11], [0.99, -0.09]],
                       dtype=torch.float64)
    expected = torch.tensor([[3, 2], [1, 0], [0, 2], [0, 0], [1, 3], [1, 2]])
    assert torch.equal(sample_copies(phi), expected)


def test_three_modality_shapley_is_the_permutation_average():
    mods = ("a", "b", "c")
    xs, y = _data(mods, n=40, seed=1)
    model = _model(mods, seed=1)
    phi = shapley_values(model, _batches(xs, y))
    with torch.no_grad():
        feats = model.features(xs)

        def v(S):
            if not S:
                return torch.zeros(len(y))
            z = model.head(torch.cat([feats[m] if m in S else torch.zeros_like(feats[m]) for m in mods], 1))
            return len(S) * (z.argmax(1) == y).double()
        expected = torch.zeros(len(y), 3, dtype=torch.float64)
        for order in itertools.permutations(mods):
            for k, m in enumerate(order):
                expected[:, mods.index(m)] += (v(set(order[:k + 1])) - v(set(order[:k]))) / math.factorial(3)
    torch.testing.assert_close(phi, expected)
    full = torch.cat([feats[m] for m in mods], 1)
    torch.testing.assert_close(phi.sum(1), 3.0 * (model.head(full).argmax(1) == y).double())   # efficiency
    assert len(set(phi.flatten().tolist())) > 3


CONFIG = {"train": {"epochs": 3, "batch_size": 16}, "model": {"dim": 16, "head_hidden": [16, 8]}}


class Recorder(SMV):
    """SMV that records each step's epoch, batch size and kept modalities."""

    def setup(self, model, ctx):
        super().setup(model, ctx)
        self.seen = []

    def training_step(self, batch, step):
        self.seen.append((step.epoch, len(batch.labels), batch.extras.get("keep")))
        return super().training_step(batch, step)


def test_the_next_epoch_trains_on_the_resampled_set(monkeypatch):
    monkeypatch.setitem(mie.methods.METHODS, "smv", (Recorder, {"level": "sample"}, "SMV"))
    made = []
    original = mie.train.create_method
    monkeypatch.setattr(mie.train, "create_method", lambda name, **kw: made.append(original(name, **kw)) or made[-1])
    x, y = make_arrays(n=100)
    data = mie.MultimodalArrays(x, y)
    rows, joint_rows = [], []
    mie.fit(data, "smv", config=CONFIG, seed=0, progress=False, warmup=2, callbacks=[lambda e, r: rows.append(r)])
    mie.fit(data, "joint_concat", config=CONFIG, seed=0, progress=False, callbacks=[lambda e, r: joint_rows.append(r)])
    seen = made[0].seen
    n_train = 70
    assert "smv_phi_a" not in rows[0] and "smv_phi_a" in rows[1] and "smv_phi_a" not in rows[2]
    copies = {m: rows[1][f"smv_copies_{m}"] for m in "ab"}
    assert copies["a"] + copies["b"] > 0
    # warm-up epochs: the plain set, no extras, and training exactly joint_concat's
    for epoch in (0, 1):
        assert sum(n for e, n, _ in seen if e == epoch) == n_train
        assert all(k is None for e, _, k in seen if e == epoch)
        assert rows[epoch]["loss"] == joint_rows[epoch]["loss"]
        assert rows[epoch]["val_accuracy"] == joint_rows[epoch]["val_accuracy"]
    # epoch 2 draws every sample plus the copies valued after epoch 1, each keeping one modality
    keep = torch.cat([k for e, _, k in seen if e == 2])
    assert len(keep) == n_train + copies["a"] + copies["b"]
    assert int((keep == -1).sum()) == n_train
    assert int((keep == 0).sum()) == copies["a"] and int((keep == 1).sum()) == copies["b"]
    assert rows[2]["loss"] != joint_rows[2]["loss"]


# ---- resume, edge cases ---------------------------------------------------------------------
class Crash(Exception):
    pass


@pytest.mark.parametrize("name", ["smv", "smv_modality"])
def test_resume_rebuilds_the_resampled_set(tmp_path, name):
    x, y = make_arrays(n=90)
    data = mie.MultimodalArrays(x, y)
    whole = mie.fit(data, name, config=CONFIG, out_dir=tmp_path / "whole", seed=3, progress=False, warmup=1)

    def crash(epoch, row):
        if epoch == 1:
            raise Crash
    with pytest.raises(Crash):
        mie.fit(data, name, config=CONFIG, out_dir=tmp_path / "cut", seed=3, progress=False, warmup=1,
                callbacks=[crash])
    resumed = mie.fit(data, name, config=CONFIG, out_dir=tmp_path / "cut", seed=3, progress=False, warmup=1,
                      resume=True)
    assert resumed["val"] == whole["val"] and resumed["test"] == whole["test"]
    rows = [list(csv.DictReader((tmp_path / d / "history.csv").open())) for d in ("whole", "cut")]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [drop(r) for r in rows[0]] == [drop(r) for r in rows[1]]
    assert sum(float(rows[0][1][f"smv_copies_{m}"]) for m in "ab") > 0


def test_three_modalities_sample_level_trains_and_modality_level_refuses():
    x, y = make_arrays(n=60, shapes={"a": (6,), "b": (4,), "c": (5,)})
    data = mie.MultimodalArrays(x, y)
    rows = []
    result = mie.fit(data, "smv", config=CONFIG, seed=0, progress=False, warmup=1,
                     callbacks=[lambda e, r: rows.append(r)])
    assert set(result["test"]["per_modality"]) == {"a", "b", "c"}
    assert {f"smv_copies_{m}" for m in "abc"} <= set(rows[0])
    with pytest.raises(MieInputError, match="modality level is defined for exactly 2 modalities"):
        mie.fit(data, "smv_modality", config=CONFIG, seed=0, progress=False)


def test_single_modality_and_bad_params_are_refused():
    model = SharedHeadModel({"a": nn.Linear(3, 4)}, ClassifierHead(4, 3, hidden=()), "concat")
    with pytest.raises(MieInputError, match="use method 'unimodal'"):
        create_method("smv").setup(model, make_context(["a"]))
    for params, message in [({"warmup": 0}, "warmup must be an integer >= 1"),
                            ({"warmup": 1.5}, "warmup must be an integer >= 1"),
                            ({"fusion": "concat"}, "fusion must be one of 'model', 'average', 'weight'")]:
        with pytest.raises(MieInputError, match=message):
            create_method("smv", **params)
    with pytest.raises(MieInputError, match="part_ratio must be a number in \\(0, 1\\]"):
        create_method("smv_modality", part_ratio=0)
    with pytest.raises(MieInputError, match="alpha must be a number >= 0"):
        create_method("smv_modality", alpha=-1)
    with pytest.raises(MieInputError, match="unknown parameter"):
        create_method("smv", alpha=2.0)                  # modality-level settings are not the sample level's
    assert method_params("smv") == {"fusion": "model", "warmup": 5}
    assert method_params("smv_modality") == {"fusion": "model", "warmup": 5, "part_ratio": 0.2, "alpha": 1.0}


def test_a_warmup_beyond_the_budget_is_noticed():
    xs, y = _data()
    method = _method(_model(), xs, y, epochs=5)
    assert method.notices() == ["warmup=5 >= the 5-epoch budget: SMV never re-samples (this run is joint_concat)"]
    assert _method(_model(), xs, y, epochs=6).notices() == []


def test_cli_trains_smv(npz_file, tmp_path):
    out = tmp_path / "run"
    code = mie.cli.main(["train", "--data", str(npz_file), "--method", "smv", "--out", str(out), *TINY,
                         "method.warmup=1"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "smv" and set(metrics["test"]["per_modality"]) == {"a", "b"}
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert float(rows[0]["smv_copies_a"]) + float(rows[0]["smv_copies_b"]) > 0
