"""A torch Dataset over in-memory arrays: item i is ({modality: tensor}, label); a batch of indices
is fetched in one indexing per array (``__getitems__``) rather than sample by sample.

A dataset with ``only(modalities)`` gives a view of itself that loads those modalities' inputs alone
(``with_modalities``): an MIE stage that trains one modality does not read the others' files."""
import copy

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate


class Batched(list):
    """What ``ArrayDataset.__getitems__`` returns: a mini-batch already collated (``batch``)."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch


def collate(items):
    """The loaders' ``collate_fn``: a ``Batched`` as it is, anything else by torch's default_collate."""
    return items.batch if isinstance(items, Batched) else default_collate(items)


class ArrayDataset(Dataset):
    def __init__(self, x, y):
        """x: {modality: (N, ...) float32 array}; y: (N,) int labels."""
        self.x = {m: torch.from_numpy(np.ascontiguousarray(a)) for m, a in x.items()}
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {m: a[i] for m, a in self.x.items()}, self.y[i]

    def __getitems__(self, indices):
        """The items at ``indices`` collated: ({m: (B, ...)}, (B,)), equal to default_collate of them."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return Batched(({m: a[index] for m, a in self.x.items()}, self.y[index]))

    def only(self, modalities):
        """This dataset with ``modalities``' arrays alone (shared, not copied)."""
        view = copy.copy(self)
        view.x = {m: self.x[m] for m in modalities}
        return view


class Indexed(Dataset):
    """``base`` whose item i is (inputs, label, {"index": i}): a method that keeps per-sample results
    looks them up by ``batch.extras["index"]`` (B,)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        xs, y = self.base[i]
        return xs, y, {"index": torch.tensor(i)}

    def only(self, modalities):
        return Indexed(with_modalities(self.base, modalities))

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long)
        if hasattr(self.base, "__getitems__"):
            xs, y = self.base.__getitems__(indices).batch
        else:
            xs, y = default_collate([self.base[i] for i in indices])
        return Batched((xs, y, {"index": index}))


def with_modalities(dataset, modalities):
    """``dataset`` loading only ``modalities``' inputs, where it can (``only``); else ``dataset`` itself,
    whose items then hold every modality."""
    return dataset.only(list(modalities)) if hasattr(dataset, "only") else dataset


class SelectedModalities:
    """A mixin for datasets whose ``__getitem__`` loads the inputs of ``self.modalities`` only:
    ``only(modalities)`` is a shallow copy with fewer of them."""

    def only(self, modalities):
        view = copy.copy(self)
        view.modalities = tuple(modalities)
        return view
