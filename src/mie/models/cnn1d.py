"""1-D CNN encoder for multichannel sequences: (B, C, L) → (B, dim)."""
from torch import nn


class CNN1DEncoder(nn.Module):
    """Conv1d–BatchNorm–ReLU blocks (the second and later stride 2), then global average pooling."""

    def __init__(self, in_channels, dim=256, channels=(64, 128, 128), kernel_size=5):
        super().__init__()
        layers, width = [], in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv1d(width, c, kernel_size, stride=1 if i == 0 else 2,
                                 padding=kernel_size // 2, bias=False),
                       nn.BatchNorm1d(c), nn.ReLU(inplace=True)]
            width = c
        self.features = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Linear(width, dim), nn.ReLU(inplace=True))
        self.dim = dim

    def forward(self, x):
        return self.proj(self.features(x).mean(dim=-1))
