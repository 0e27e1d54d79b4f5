"""Shipped configs validate, and config files / overrides combine as documented."""
from pathlib import Path

import pytest

from mie.config import build_config
from mie.errors import MieInputError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path):
    cfg = build_config(path)
    assert cfg["data"]["dataset"] and cfg["method"]["name"]


def test_precedence_file_then_sections_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 0.1, epochs: 4}\nmethod: {name: mie, tau: 0.9}\n")
    cfg = build_config(path, ["train.lr=0.5"], train={"epochs": 7, "seed": None})
    assert cfg["train"]["lr"] == 0.5 and cfg["train"]["epochs"] == 7 and cfg["train"]["seed"] == 0
    assert cfg["method"]["tau"] == 0.9 and cfg["method"]["rho"] == 0.05
    # switching method drops the other method's parameters instead of failing on them
    joint = build_config(path, (), method={"name": "joint"})["method"]
    assert joint["name"] == "joint" and "tau" not in joint


def test_numbers_are_coerced_and_types_checked():
    assert build_config(None, ["train.lr=1"])["train"]["lr"] == 1.0
    with pytest.raises(MieInputError, match="must be true or false"):
        build_config(None, ["data.standardize=3"])
    with pytest.raises(MieInputError, match="train.threads must be a positive integer"):
        build_config(None, ["train.threads=two"])
    with pytest.raises(MieInputError, match="expected section.key=value"):
        build_config(None, ["lr"])


def test_ablations_do_not_offer_switched_off_parameters():
    from mie.methods import method_params
    assert {"tau", "rho"} <= set(method_params("mie"))
    assert "tau" not in method_params("mie_sam_only") and "rho" in method_params("mie_sam_only")
    assert "rho" not in method_params("mie_gm_only") and "tau" in method_params("mie_gm_only")
    assert not {"tau", "rho", "adaptive"} & set(method_params("alternating"))
    with pytest.raises(MieInputError, match="unknown config key 'method.tau' for method 'alternating'"):
        build_config(None, ["method.name=alternating", "method.tau=0.8"])


def test_adam_betas_reach_the_optimizer():
    import torch

    from mie.train import Optimizers
    cfg = build_config(None, ["train.betas=[0.9, 0.99]"])
    opt = Optimizers(cfg["train"]).make([torch.nn.Parameter(torch.zeros(1))])
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(MieInputError, match="train.betas must be two numbers"):
        build_config(None, ["train.betas=[0.9]"])


def test_exponent_without_a_dot_is_a_number():
    assert build_config(None, ["train.lr=1e-3"])["train"]["lr"] == 1e-3          # YAML 1.1 reads it as text
    assert build_config(None, ["method.rho=5e-2"])["method"]["rho"] == 0.05
    with pytest.raises(MieInputError, match="train.lr must be a number, got 'fast'"):
        build_config(None, ["train.lr=fast"])


@pytest.mark.parametrize("override, message", [
    ("train.weight_decay=-1", "train.weight_decay must be >= 0, got -1.0"),
    ("train.momentum=2", r"train.momentum must be in \[0, 1\), got 2.0"),
    ("train.num_workers=-1", "train.num_workers must be >= 0, got -1"),
    ("data.carve_val=-0.2", r"data.carve_val must be in \(0, 1\), got -0.2"),
    ("model.dim=0", "model.dim must be >= 1, got 0"),
    ("model.head_hidden=5", "model.head_hidden must be a list of layer widths >= 1"),
    ("model.head_hidden=[256, 0]", r"model.head_hidden must be a list of layer widths >= 1, .* got \[256, 0\]"),
])
def test_impossible_values_are_refused_in_one_line(override, message):
    with pytest.raises(MieInputError, match=message):
        build_config(None, [override])
    assert build_config(None, ["model.head_hidden=[]"])["model"]["head_hidden"] == []
