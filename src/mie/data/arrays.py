"""In-memory multimodal data: arrays ``x_<modality>`` with first axis N, labels ``y``, optional split.

Sample shapes: vectors (D,), sequences (C, L), images (C, H, W) or clips (C, T, H, W).
Split codes: 0 = train, 1 = validation, 2 = test.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MieInputError

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VAL: "val", TEST: "test"}


@dataclass
class MultimodalArrays:
    """x: {modality: (N, ...) float array}; y: (N,) int labels in [0, K); split: (N,) codes or None."""

    x: dict
    y: np.ndarray
    split: np.ndarray = None
    classes: list = None          # class names, index = label
    name: str = "arrays"
    source: str = ""              # where the arrays came from (a path, a package)
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    @property
    def modalities(self):
        return list(self.x)

    @property
    def num_classes(self):
        return len(self.classes) if self.classes is not None else int(self.y.max()) + 1

    def select(self, modalities):
        """Keep only ``modalities`` (in that order)."""
        missing = [m for m in modalities if m not in self.x]
        if missing:
            raise MieInputError(f"unknown modality {', '.join(repr(m) for m in missing)} in {self.name}; "
                                f"available: {', '.join(self.x)}")
        if len(set(modalities)) != len(modalities):
            raise MieInputError(f"modalities listed twice: {', '.join(modalities)}")
        return MultimodalArrays({m: self.x[m] for m in modalities}, self.y, self.split, self.classes,
                                self.name, self.source, dict(self.notes))

    def validate(self):
        if not self.x:
            raise MieInputError(f"{self.name} has no modality arrays; expected arrays named x_<modality>")
        y = np.asarray(self.y)
        if y.ndim != 1:
            raise MieInputError(f"y must have shape (N,), got {y.shape}")
        if y.dtype.kind not in "iub":
            if y.dtype.kind != "f" or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
                raise MieInputError(f"y must hold integer class labels, got dtype {y.dtype}")
        self.y = y.astype(np.int64)
        n = len(self.y)
        if n == 0:
            raise MieInputError(f"{self.name} has no samples (y is empty)")
        self.x = dict(self.x)     # the float32 copies below must not replace the caller's arrays
        for m, a in self.x.items():
            a = np.asarray(a)
            if a.ndim < 2:
                raise MieInputError(f"x_{m} must have a first axis N and at least one feature axis, got shape {a.shape}")
            if len(a) != n:
                raise MieInputError(f"x_{m} has {len(a)} samples but y has {n}; every array needs the same first axis N")
            if a.dtype.kind not in "iufb":
                raise MieInputError(f"x_{m} must be numeric, got dtype {a.dtype}")
            a = a.astype(np.float32, copy=False)
            bad = ~np.isfinite(a.reshape(n, -1)).all(axis=1)
            if bad.any():
                raise MieInputError(f"x_{m} has NaN or inf values in {int(bad.sum())} samples "
                                    f"(first: sample {int(np.argmax(bad))}); clean or impute them first")
            self.x[m] = a
        k = self.num_classes
        if self.y.min() < 0 or self.y.max() >= k:
            raise MieInputError(f"labels must be integers in [0, {k}), found {int(self.y.min())}..{int(self.y.max())}")
        if self.split is not None:
            s = np.asarray(self.split)
            if s.shape != (n,):
                raise MieInputError(f"split must have shape ({n},), got {s.shape}")
            if not np.isin(s, [TRAIN, VAL, TEST]).all():
                raise MieInputError("split values must be 0 (train), 1 (validation) or 2 (test), "
                                    f"found {sorted(set(np.unique(s).tolist()) - {0, 1, 2})}")
            self.split = s.astype(np.int64)


def load_npz(path):
    """Read a user's ``.npz``: arrays x_<modality>, y, and optionally split and classes."""
    path = Path(path)
    if not path.is_file():
        raise MieInputError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # corrupt zip, not an npz, pickled object arrays
        raise MieInputError(f"cannot read {path} as an .npz file ({type(e).__name__}: {e})") from None
    if "y" not in arrays:
        raise MieInputError(f"{path} has no array 'y' (integer class labels of shape (N,)); "
                            f"found: {', '.join(arrays) or 'nothing'}")
    x = {k[2:]: v for k, v in arrays.items() if k.startswith("x_") and len(k) > 2}
    if not x:
        raise MieInputError(f"{path} has no x_<modality> arrays; found: {', '.join(arrays)}")
    unknown = sorted(set(arrays) - {"y", "split", "classes"} - {f"x_{m}" for m in x})
    if unknown:
        raise MieInputError(f"{path} has unexpected arrays {', '.join(unknown)}; "
                            "expected x_<modality>, y, and optionally split and classes")
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    return MultimodalArrays(x, arrays["y"], arrays.get("split"), classes, name=path.name, source=str(path))
