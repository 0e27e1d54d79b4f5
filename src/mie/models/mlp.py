"""MLP encoder for feature vectors: (B, D) → (B, dim)."""
from torch import nn


class MLPEncoder(nn.Module):
    """Linear → BatchNorm → ReLU → Dropout, ``len(hidden)`` times, then Linear → ReLU to ``dim``."""

    def __init__(self, in_features, dim=256, hidden=(512,), dropout=0.1):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers += [nn.Linear(width, dim), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, x):
        return self.net(x.flatten(1))
