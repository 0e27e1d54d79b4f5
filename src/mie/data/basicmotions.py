"""UEA BasicMotions (Clements, UEA archive): 80 smart-watch recordings of 4 activities
(badminton, running, standing, walking), 10 s at 10 Hz; two modalities, each (3, 100):
``acc`` = accelerometer x/y/z, ``gyro`` = gyroscope x/y/z. The archive's own 40/40 train/test
split is kept. Read from the copy that ships inside ``aeon`` (``pip install aeon``).
"""
import numpy as np

from ..errors import MieInputError
from .arrays import TEST, TRAIN, MultimodalArrays


def load_basicmotions():
    try:
        from aeon.datasets import load_basic_motions
    except ImportError:
        raise MieInputError("dataset 'basicmotions' needs the aeon package: pip install aeon") from None
    (xtr, ytr), (xte, yte) = (load_basic_motions(split=s) for s in ("train", "test"))
    x = np.concatenate([xtr, xte]).astype(np.float32)
    names = np.concatenate([ytr, yte]).astype(str)
    classes = sorted(set(names.tolist()))
    y = np.array([classes.index(n) for n in names], dtype=np.int64)
    split = np.array([TRAIN] * len(xtr) + [TEST] * len(xte), dtype=np.int64)
    return MultimodalArrays({"acc": x[:, :3], "gyro": x[:, 3:]}, y, split, classes, name="basicmotions",
                            source="aeon.datasets.load_basic_motions")
