"""HTAD (audio + wrist accelerometer), read from the CSV inside multiviewstacking."""
import importlib.util
import json

import numpy as np
import pytest

from mie.cli import main
from mie.data import load_dataset

pytestmark = pytest.mark.skipif(importlib.util.find_spec("multiviewstacking") is None,
                                reason="dataset 'htad' ships in multiviewstacking: pip install 'mie[htad]'")


def test_htad_modalities_labels_and_no_split():
    data = load_dataset("htad")
    assert data.modalities == ["audio", "acc"]
    assert data.x["audio"].shape == (1386, 36) and data.x["acc"].shape == (1386, 16)
    assert data.classes == ["brush_teeth", "eat_chips", "mop_floor", "sweep", "type_on_keyboard",
                            "wash_hands", "watch_tv"]
    assert np.bincount(data.y).tolist() == [180, 282, 181, 178, 179, 180, 206]
    assert data.split is None


def test_htad_trains_one_epoch(capsys, tmp_path):
    code = main(["train", "--dataset", "htad", "--method", "joint", "--out", str(tmp_path / "run"),
                 "train.epochs=1", "train.threads=1", "model.dim=16", "model.head_hidden=[16,8]"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["split"]["sizes"] == {"train": 970, "val": 208, "test": 208}
    assert set(metrics["test"]["per_modality"]) == {"audio", "acc"}
