"""UCI Image Segmentation (shape + rgb views), read from the zipped CSV inside river."""
import importlib.util
import json

import numpy as np
import pytest

from mie.cli import main
from mie.data import load_dataset

pytestmark = pytest.mark.skipif(importlib.util.find_spec("river") is None,
                                reason="dataset 'segment' ships in river: pip install 'mie[segment]'")


def test_segment_views_labels_and_no_split():
    data = load_dataset("segment")
    assert data.modalities == ["shape", "rgb"]
    assert data.x["shape"].shape == (2310, 8) and data.x["rgb"].shape == (2310, 10)
    assert data.classes == ["brickface", "cement", "foliage", "grass", "path", "sky", "window"]
    assert np.all(np.bincount(data.y) == 330) and data.split is None
    rgb = data.x["rgb"]   # intensity-mean is the mean of the raw red, green and blue means
    assert np.allclose(rgb[:, 0], rgb[:, 1:4].mean(axis=1), atol=1e-3)


def test_segment_trains_one_epoch(capsys, tmp_path):
    code = main(["train", "--dataset", "segment", "--method", "joint", "--out", str(tmp_path / "run"),
                 "train.epochs=1", "train.threads=1", "model.dim=16", "model.head_hidden=[16,8]"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["split"]["sizes"] == {"train": 1610, "val": 350, "test": 350}   # 230 + 50 + 50 per class
    assert set(metrics["test"]["per_modality"]) == {"shape", "rgb"}
