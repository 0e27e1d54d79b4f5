"""Train / validation / test indices: from the data's own split, or stratified from the run's seed."""
import numpy as np

from ..errors import MieInputError
from .arrays import SPLIT_NAMES, TEST, TRAIN, VAL


def stratified_split(y, fractions, seed):
    """Per class, shuffle with ``seed`` and cut into len(fractions) parts of those sizes.

    y (N,) int; fractions sum to 1, the first part (train) gets what rounding leaves and at least
    one sample of every class. Returns a list of sorted index arrays.
    """
    rng = np.random.default_rng(seed)
    parts = [[] for _ in fractions]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        sizes = [int(round(f * len(idx))) for f in fractions[1:]]
        while sum(sizes) >= len(idx) and any(sizes):   # keep at least one training sample
            sizes[int(np.argmax(sizes))] -= 1
        start = len(idx) - sum(sizes)
        parts[0].append(idx[:start])
        for p, size in enumerate(sizes, start=1):
            parts[p].append(idx[start:start + size])
            start += size
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=np.int64) for p in parts]


def carve_validation(labels, carve_val, seed):
    """(keep, carved): indices into a train split's ``labels``, with ``carve_val`` of them
    (stratified by label, from ``seed``) carved out as validation."""
    if not 0 < carve_val < 1:
        raise MieInputError(f"carve_val must be in (0, 1), got {carve_val}")
    keep, carved = stratified_split(np.asarray(labels), [1 - carve_val, carve_val], seed)
    return keep, carved


def resolve_split(data, seed, val_fraction=0.15, test_fraction=0.15, carve_val=0.2):
    """Indices {"train", "val", "test"} and a sentence saying how they were made.

    - no ``split`` array: stratified (1 − val − test) / val / test from ``seed``;
    - a ``split`` without validation samples: ``carve_val`` of train becomes validation (stratified);
    - otherwise the given split as it is.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise MieInputError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) "
                            "with a sum below 1")
    y = data.y
    if data.split is None:
        train, val, test = stratified_split(y, [1 - val_fraction - test_fraction, val_fraction, test_fraction], seed)
        how = (f"stratified {1 - val_fraction - test_fraction:.0%}/{val_fraction:.0%}/{test_fraction:.0%} "
               f"split from seed {seed}")
    else:
        train, val, test = (np.flatnonzero(data.split == s) for s in (TRAIN, VAL, TEST))
        how = "the data's own split"
        if len(val) == 0 and len(train) > 0:
            keep, carved = carve_validation(y[train], carve_val, seed)
            train, val = train[keep], train[carved]
            how = f"the data's own train/test split; {carve_val:.0%} of train (stratified, seed {seed}) as validation"
    indices = {"train": train, "val": val, "test": test}
    for name, idx in indices.items():
        if len(idx) == 0:
            raise MieInputError(f"the {name} split is empty; every run needs train, validation and test samples "
                                f"(split codes {', '.join(f'{k}={v}' for k, v in SPLIT_NAMES.items())})")
    missing = sorted(set(range(data.num_classes)) - set(np.unique(y[train]).tolist()))
    if missing:
        raise MieInputError(f"class(es) {', '.join(map(str, missing))} have no training samples; "
                            f"labels must cover [0, {data.num_classes}) in train")
    return indices, how
