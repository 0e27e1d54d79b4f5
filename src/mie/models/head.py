"""Per-modality classification head; the paper's is FC(d,256) → ReLU → FC(256,64) → FC(64,K)."""
from torch import nn


class ClassifierHead(nn.Module):
    """Linear layers d → hidden[0] → … → K; ReLU after the layers listed in ``relu_after``.

    The default reproduces MIE's head: ReLU after the first Linear only.
    """

    def __init__(self, dim, num_classes, hidden=(256, 64), relu_after=(0,)):
        super().__init__()
        widths = [dim, *hidden, num_classes]
        layers = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i in relu_after and i < len(widths) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    @property
    def linears(self):
        """The head's Linear layers, input side first (the layers GM acts on)."""
        return [m for m in self.net if isinstance(m, nn.Linear)]

    def forward(self, h):
        return self.net(h)
