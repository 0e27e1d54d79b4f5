"""HTAD, the Home-Tasks Activities Dataset (Garcia-Ceja et al., MMM 2021): 1,386 windows of 7 home
tasks (brush teeth, eat chips, mop floor, sweep, type on keyboard, wash hands, watch TV) recorded
with a wrist accelerometer and a microphone. Two modalities of features, as the release gives them:
``audio`` 36 MFCC features (the columns v1_*), ``acc`` 16 accelerometer features (v2_*: per-axis
mean, sd and max, axis correlations, magnitude mean and sd, area under the curve, mean difference).

Read from the CSV that ships inside the ``multiviewstacking`` package (``pip install
multiviewstacking``, MIT licence), without importing it; nothing is downloaded. No split ships
with the data: a stratified split is made from the run's seed. The CSV holds no participant ids,
so windows of one person's session can fall on both sides of a split.
"""
import csv

import numpy as np

from ..errors import MieInputError
from .arrays import MultimodalArrays
from .packaged import package_path

VIEW_PREFIXES = {"audio": "v1_", "acc": "v2_"}


def htad_file():
    """The path of multiviewstacking's htad.csv."""
    return package_path("multiviewstacking", "data/htad.csv", "htad", "pip install multiviewstacking")


def load_htad():
    """``audio`` (1386, 36) and ``acc`` (1386, 16) float arrays, labels 0..6 (classes sorted by name)."""
    path = htad_file()
    with path.open(newline="", encoding="latin-1") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    names = np.array([r[0] for r in rows])
    values = np.array([r[1:] for r in rows], dtype=np.float64)
    x = {}
    for view, prefix in VIEW_PREFIXES.items():
        columns = [i for i, c in enumerate(header[1:]) if c.startswith(prefix)]
        if not columns:
            raise MieInputError(f"{path} has no {prefix}* columns; expected the HTAD release's layout")
        x[view] = values[:, columns].astype(np.float32)
    classes = sorted(set(names.tolist()))
    y = np.array([classes.index(n) for n in names], dtype=np.int64)
    return MultimodalArrays(x, y, None, classes, name="htad", source=str(path))
