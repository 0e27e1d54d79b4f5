"""A run stopped after epoch k and resumed ends exactly like the run that was never stopped."""
import csv
import json

import numpy as np
import pytest

import mie
from conftest import make_arrays
from mie.methods import METHODS
from mie.io import atomic_path, write_text

CONFIG = {"train": {"epochs": 3, "batch_size": 16}, "model": {"dim": 16, "head_hidden": [16, 8]}}


class Crash(Exception):
    pass


def crash_after(k):
    def callback(epoch, row):
        if epoch + 1 == k:
            raise Crash
    return callback


# Settings under which each method's state changes within the first epochs (so resume is tested on it).
PARAMS = {"mses": {"patience": 1, "monitor": "accuracy"}, "ogr_gb": {"blend_every": 1},
          "smv": {"warmup": 1}, "smv_modality": {"warmup": 1},
          "miles": {"tau": 0.0, "fusion": "average"}, "miles_sum": {"tau": 0.0, "fusion": "average"}}
TWO_ONLY = ["pmr", "pmr_per", "mnl", "mnl_released", "smv_modality", "miles", "miles_sum"]   # methods defined for two modalities only
CASES = [(name, PARAMS.get(name, {})) for name in METHODS] + [("mie", {"alternation": "iteration", "adaptive": True})]


@pytest.mark.parametrize("method, params", CASES, ids=[f"{m}-{'-'.join(p)}" if p else m for m, p in CASES])
def test_resumed_run_matches_uninterrupted_run(tmp_path, method, params):
    """For every registered method: optimizers, method state and RNG streams survive a restart."""
    two = {"a": (8,), "b": (5,)}
    shapes = {"unimodal": {"a": (8,)}, **{name: two for name in TWO_ONLY}}.get(method, {"a": (8,), "b": (5,), "c": (3,)})
    x, y = make_arrays(n=90, shapes=shapes)
    data = mie.MultimodalArrays(x, y)
    whole = mie.fit(data, method, config=CONFIG, out_dir=tmp_path / "whole", seed=3, progress=False, **params)
    with pytest.raises(Crash):
        mie.fit(data, method, config=CONFIG, out_dir=tmp_path / "cut", seed=3, progress=False,
                callbacks=[crash_after(2)], **params)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    with pytest.raises(mie.MieInputError, match="already holds a run"):
        mie.fit(data, method, config=CONFIG, out_dir=tmp_path / "cut", seed=3, progress=False, **params)
    resumed = mie.fit(data, method, config=CONFIG, out_dir=tmp_path / "cut", seed=3, progress=False,
                      resume=True, **params)
    for key in ("val", "test", "best_epoch"):
        assert resumed[key] == whole[key]
    rows = [list(csv.DictReader((tmp_path / d / "history.csv").open())) for d in ("whole", "cut")]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [drop(r) for r in rows[0]] == [drop(r) for r in rows[1]]


def test_resume_with_another_config_is_refused(tmp_path):
    x, y = make_arrays(n=60)
    data = mie.MultimodalArrays(x, y)
    with pytest.raises(Crash):
        mie.fit(data, "joint", config=CONFIG, out_dir=tmp_path, progress=False, callbacks=[crash_after(1)])
    with pytest.raises(mie.MieInputError, match="another config"):
        mie.fit(data, "joint", config=CONFIG, out_dir=tmp_path, seed=9, progress=False, resume=True)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    write_text(path, json.dumps({"ok": 1}))
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_fit_accepts_torch_datasets(tmp_path):
    from mie.data import ArrayDataset
    x, y = make_arrays(n=90)
    parts = np.array_split(np.random.default_rng(0).permutation(90), [60, 75])
    datasets = {s: ArrayDataset({m: a[i] for m, a in x.items()}, y[i]) for s, i in zip(("train", "val", "test"), parts)}
    result = mie.fit(datasets, "mie", config=CONFIG, epochs=15, progress=False)
    assert result["split"]["sizes"] == {"train": 60, "val": 15, "test": 15}
    assert result["test"]["accuracy"] > 0.7 and set(result["test"]["per_modality"]) == {"a", "b"}
