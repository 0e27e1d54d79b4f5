"""A torch Dataset over in-memory arrays: item i is ({modality: tensor}, label)."""
import numpy as np
import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    def __init__(self, x, y):
        """x: {modality: (N, ...) float32 array}; y: (N,) int labels."""
        self.x = {m: torch.from_numpy(np.ascontiguousarray(a)) for m, a in x.items()}
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {m: a[i] for m, a in self.x.items()}, self.y[i]
