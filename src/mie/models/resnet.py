"""ResNet encoders (He et al., CVPR 2016) for images or spectrograms: (B, C, H, W) → (B, dim).

``resnet18`` is the standard 4-stage [2, 2, 2, 2] network with widths 64…512 (the encoder used
for CREMA-D and Kinetics-Sounds); ``resnet50`` the [3, 4, 6, 3] bottleneck network (output 2048,
the image encoder of Twitter2015 and Sarcasm); ``resnet_small`` keeps basic blocks with widths
16…128 for small images. A clip of frames (B, C, T, H, W) is encoded frame by frame and
average-pooled over T.

Pretrained weights in torchvision's naming (``conv1``, ``layer2.1.bn1``, ``downsample``, ``fc``)
load directly; for inputs with other than 3 channels the first convolution's RGB kernel is
summed over colours (1 channel) or its mean repeated.
"""
import re

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)   # stride on the 3×3, as torchvision
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet trunk + global average pooling + (if needed) a Linear projection to ``dim``."""

    not_pretrained = ("proj",)   # what a pretrained trunk's file cannot hold

    def __init__(self, in_channels, dim=512, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2),
                 stem="imagenet", block=BasicBlock):
        super().__init__()
        w0 = widths[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0),
                                      nn.ReLU(inplace=True))
        stages, in_planes = [], w0
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                stages.append(block(in_planes, w, stride=2 if (b == 0 and i > 0) else 1))
                in_planes = w * block.expansion
        self.stages = nn.Sequential(*stages)
        self.blocks, self.in_channels = tuple(blocks), in_channels
        self.proj = nn.Identity() if in_planes == dim else nn.Sequential(nn.Linear(in_planes, dim),
                                                                         nn.ReLU(inplace=True))
        self.dim = dim
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        frames = None
        if x.ndim == 5:  # (B, C, T, H, W): encode each frame, average over T
            frames = x.shape[2]
            x = x.transpose(1, 2).flatten(0, 1)
        h = self.stages(self.stem(x)).mean(dim=(2, 3))
        if frames is not None:
            h = h.view(-1, frames, h.shape[-1]).mean(dim=1)
        return self.proj(h)

    def map_pretrained_keys(self, state):
        """torchvision ResNet names → ours; the classifier ``fc`` is dropped."""
        starts = [sum(self.blocks[:i]) for i in range(len(self.blocks))]
        out = {}
        for key, value in state.items():
            if key.startswith("fc."):
                continue
            key = re.sub(r"^conv1\.", "stem.0.", key)
            key = re.sub(r"^bn1\.", "stem.1.", key)
            key = re.sub(r"^layer(\d)\.(\d+)\.", lambda m: f"stages.{starts[int(m[1]) - 1] + int(m[2])}.", key)
            key = key.replace(".downsample.", ".shortcut.")
            if key == "stem.0.weight" and value.shape[1] == 3 and self.in_channels != 3:
                value = (value.sum(dim=1, keepdim=True) if self.in_channels == 1
                         else value.mean(dim=1, keepdim=True).repeat(1, self.in_channels, 1, 1))
            out[key] = value
        return out


def resnet18(in_channels, dim=512):
    return ResNetEncoder(in_channels, dim, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))


def resnet50(in_channels, dim=2048):
    return ResNetEncoder(in_channels, dim, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), block=Bottleneck)


def resnet_small(in_channels, dim=256):
    return ResNetEncoder(in_channels, dim, widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1), stem="cifar")
