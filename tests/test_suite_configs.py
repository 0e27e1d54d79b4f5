"""The development suite (configs/suite/): every task validates, names a built-in dataset and no
method (the method is what a comparison or a tuning varies), and is listed in the suite's README."""
from pathlib import Path

import pytest

from mie.config import build_config, read_yaml
from mie.data import DATASETS

SUITE = Path(__file__).parent.parent / "configs" / "suite"
TASKS = sorted(SUITE.glob("*.yaml"))


def test_suite_has_at_least_five_tasks():
    assert len(TASKS) >= 5


@pytest.mark.parametrize("path", TASKS, ids=[p.stem for p in TASKS])
def test_suite_task_validates_and_is_documented(path):
    assert "method" not in read_yaml(path)
    cfg = build_config(path)
    assert cfg["data"]["dataset"] in DATASETS and cfg["data"]["modalities"]
    assert cfg["train"]["threads"] == 1
    assert f"`{path.name}`" in (SUITE / "README.md").read_text()
