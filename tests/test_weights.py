"""Pretrained encoder weights from local files, and --pretrained never falling back to random init."""
import re

import pytest
import torch

from conftest import make_arrays
from mie.errors import MieInputError
from mie.models import ModelSpec, build_encoders, create_encoder
from mie.models.resnet import resnet18, resnet50


def torchvision_names(model, blocks):
    """Our ResNet's state dict renamed the way torchvision names it (written out by hand here)."""
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    where = {starts[s] + b: (s + 1, b) for s in range(len(blocks)) for b in range(blocks[s])}
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("proj."):
            continue
        key = key.replace("stem.0.", "conv1.").replace("stem.1.", "bn1.").replace(".shortcut.", ".downsample.")
        m = re.match(r"stages\.(\d+)\.(.*)", key)
        if m:
            layer, block = where[int(m[1])]
            key = f"layer{layer}.{block}.{m[2]}"
        out[key] = value.clone()
    out["fc.weight"], out["fc.bias"] = torch.randn(1000, model.proj[0].in_features), torch.randn(1000)
    return out


@pytest.mark.parametrize("build, blocks", [(resnet18, (2, 2, 2, 2)), (resnet50, (3, 4, 6, 3))])
def test_torchvision_resnet_weights_load(tmp_path, build, blocks):
    torch.manual_seed(0)
    source = build(3, 64)
    torch.save({"state_dict": {f"module.{k}": v for k, v in torchvision_names(source, blocks).items()}},
               tmp_path / "w.pth")
    target = create_encoder("resnet50" if build is resnet50 else "resnet18", (3, 32, 32), 64,
                            weights=str(tmp_path / "w.pth"))
    for key, value in source.state_dict().items():
        if not key.startswith("proj."):
            assert torch.equal(target.state_dict()[key], value), key


def test_rgb_kernel_summed_for_one_channel(tmp_path):
    source = resnet18(3, 32)
    torch.save(torchvision_names(source, (2, 2, 2, 2)), tmp_path / "w.pt")
    target = create_encoder("resnet18", (1, 64, 48), 32, weights=str(tmp_path / "w.pt"))
    assert torch.allclose(target.stem[0].weight, source.stem[0].weight.sum(dim=1, keepdim=True))


def test_weights_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(MieInputError, match="no such weights file"):
        create_encoder("resnet18", (3, 32, 32), 32, weights=str(tmp_path / "none.pth"))
    torch.save({"x.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(MieInputError, match="no parameter named like"):
        create_encoder("resnet18", (3, 32, 32), 32, weights=str(tmp_path / "other.pt"))
    small = torchvision_names(resnet18(3, 32), (2, 2, 2, 2))
    with pytest.raises(MieInputError, match="layer1.0.conv1.weight|stages.0.conv1.weight"):
        create_encoder("resnet50", (3, 32, 32), 32, weights=_save(tmp_path / "r18.pt", small))
    partial = {k: v for k, v in small.items() if not k.startswith("layer4")}
    with pytest.raises(MieInputError, match="does not cover resnet18"):
        create_encoder("resnet18", (3, 32, 32), 32, weights=_save(tmp_path / "part.pt", partial))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MieInputError, match="cannot read .*junk.pt as weights"):
        create_encoder("resnet18", (3, 32, 32), 32, weights=str(tmp_path / "junk.pt"))


def _save(path, state):
    torch.save(state, path)
    return str(path)


def test_pretrained_without_weights_is_an_error_not_random_init(tmp_path):
    spec = ModelSpec(["a"], {"a": (3, 32, 32)}, {"a": "resnet18"}, 2, dim=32, pretrained=True)
    with pytest.raises(MieInputError, match="model.pretrained is set but modality a's encoder resnet18 has no weights"):
        build_encoders(spec)
    path = _save(tmp_path / "w.pt", torchvision_names(resnet18(3, 32), (2, 2, 2, 2)))
    spec.encoders = {"a": {"name": "resnet18", "weights": path}}
    assert set(build_encoders(spec)) == {"a"}


def test_encoder_options_through_the_cli(tmp_path, capsys):
    from mie.cli import main
    x, y = make_arrays(n=60)
    import numpy as np
    np.savez(tmp_path / "d.npz", y=y, **{f"x_{m}": a for m, a in x.items()})
    common = ["train", "--data", str(tmp_path / "d.npz"), "--method", "joint", "--epochs", "1", "model.dim=8",
              "model.head_hidden=[8]"]
    assert main(common + ["--out", str(tmp_path / "p"), "--pretrained"]) == 2
    assert "model.pretrained is set but modality a's encoder mlp has no weights" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "o"), "model.encoders.a.name=mlp", "model.encoders.a.hidden=[4]"]) == 0
    state = torch.load(tmp_path / "o" / "checkpoints" / "best.pt", weights_only=False)["model"]
    assert state["encoders.a.net.0.weight"].shape == (4, 8)
    assert main(common + ["--out", str(tmp_path / "q"), "model.encoders.a.name=mlp", "model.encoders.a.colour=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mie: error: encoder mlp:") and "colour" in err and err.count("\n") == 1
    assert main(common + ["--out", str(tmp_path / "r"), "model.encoders.a=[1]"]) == 2
    assert "model.encoders.a must be an encoder name or a mapping" in capsys.readouterr().err
