"""The step learning-rate schedule (train.lr_step, train.lr_gamma) and MIE's per-modality stages."""
import csv

import pytest
import torch

import mie
from conftest import make_arrays, make_context
from mie.methods import Method, create_method
from mie.train import Optimizers

CONFIG = {"train": {"epochs": 4, "batch_size": 32, "lr_step": 2, "lr_gamma": 0.5},
          "model": {"dim": 16, "head_hidden": [16, 8]}}


def _history(path):
    return list(csv.DictReader((path / "history.csv").open()))


def test_group_rate_is_initial_times_schedule_times_the_methods_scale():
    class Scaled(Method):
        def lr_scale(self, group):
            return {"a": 3.0, "b": 0.0}.get(group, 1.0)
    p, q, r = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    optimizers = Optimizers(mie.config.default_config()["train"])
    opt = optimizers.make([{"params": [p], "name": "a"}, {"params": [q], "name": "b", "lr": 0.5}, {"params": [r]}])
    optimizers.apply(0.25, Scaled())
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * 0.25 * 3.0, 0.0, 1e-3 * 0.25])
    opt.load_state_dict(opt.state_dict())          # new group dicts: the loop still finds the groups
    optimizers.apply(1.0, Scaled())
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-3, 0.0, 1e-3])
    assert "lr_factor" not in opt.param_groups[0]


def test_joint_steps_down_every_lr_step_epochs(tmp_path):
    x, y = make_arrays(n=60)
    mie.fit(mie.MultimodalArrays(x, y), "joint", config=CONFIG, out_dir=tmp_path, progress=False)
    assert [float(r["lr_factor"]) for r in _history(tmp_path)] == [1.0, 1.0, 0.5, 0.5]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["method"]["optimizer"]
    assert state["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5)


def test_mie_stages_of_their_own_lengths_keep_the_budget_and_each_modalitys_schedule(tmp_path):
    x, y = make_arrays(n=60)
    mie.fit(mie.MultimodalArrays(x, y), "mie", config=CONFIG, out_dir=tmp_path, progress=False,
            epochs_per_stage={"a": 1, "b": 3}, order=["b", "a"])
    rows = _history(tmp_path)
    # exactly 4 epochs each: b b b a, then b's last epoch, then a alone
    assert [r["active"] for r in rows] == ["b", "b", "b", "a", "b", "a", "a", "a"]
    # lr_step 2 counts each modality's own epochs: b 0 1 2 · a 0 · b 3 · a 1 2 3
    assert [float(r["lr_factor"]) for r in rows] == [1.0, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 0.5]


def test_mie_can_restart_the_schedule_every_stage_as_the_authors_code(tmp_path):
    x, y = make_arrays(n=60)
    mie.fit(mie.MultimodalArrays(x, y), "mie", config=CONFIG, out_dir=tmp_path, progress=False,
            epochs_per_stage={"a": 1, "b": 3}, order=["b", "a"], schedule="stage")
    assert [float(r["lr_factor"]) for r in _history(tmp_path)] == [1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_stage_lengths_must_name_every_modality():
    method = create_method("mie", epochs_per_stage={"a": 2})
    model = method.build_model(mie.models.ModelSpec(["a", "b"], {"a": (3,), "b": (3,)}, {"a": "mlp", "b": "mlp"}, 2))
    with pytest.raises(mie.MieInputError, match="one length for each modality"):
        method.setup(model, make_context(["a", "b"]))
    with pytest.raises(mie.MieInputError, match="epochs_per_stage must be an integer >= 1 or a mapping"):
        create_method("mie", epochs_per_stage={"a": 0})


def test_resume_keeps_the_schedule(tmp_path):
    x, y = make_arrays(n=60)
    data = mie.MultimodalArrays(x, y)

    class Crash(Exception):
        pass

    def crash(epoch, row):
        if epoch == 2:
            raise Crash
    whole = mie.fit(data, "mslr", config=CONFIG, out_dir=tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        mie.fit(data, "mslr", config=CONFIG, out_dir=tmp_path / "cut", progress=False, callbacks=[crash])
    resumed = mie.fit(data, "mslr", config=CONFIG, out_dir=tmp_path / "cut", progress=False, resume=True)
    assert resumed["test"] == whole["test"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(_history(tmp_path / "whole")) == drop(_history(tmp_path / "cut"))
    assert [float(r["mslr_lr_a"]) for r in _history(tmp_path / "whole")][2] < 1e-3   # MSLR's rate × schedule


def test_bad_schedule_is_refused():
    with pytest.raises(mie.MieInputError, match="train.lr_step must be a positive integer"):
        mie.config.build_config(None, ["train.lr_step=0"])
    with pytest.raises(mie.MieInputError, match="lr_gamma must be in"):
        mie.config.build_config(None, ["train.lr_gamma=1.5"])
