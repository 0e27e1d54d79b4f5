"""UCI Image Segmentation (Brodley, 1990): 2,310 3×3 regions of seven outdoor images, 7 classes
(brickface, cement, foliage, grass, path, sky, window), 330 each. Two views, the split that
multi-view learning uses for this data: ``shape`` 8 features (region centroid row and column,
two line densities, mean and sd of the vertical and horizontal edge contrast) and ``rgb`` 10 colour
features (intensity, raw and excess red / green / blue means, value, saturation and hue means).
The constant region-pixel-count column is not in the file.

Read from the zipped CSV that ships inside the ``river`` package (``pip install river``, BSD-3),
without importing it; nothing is downloaded. No split ships with this copy: a stratified split is
made from the run's seed.
"""
import csv
import io
import zipfile

import numpy as np

from ..errors import MieInputError
from .arrays import MultimodalArrays
from .packaged import package_path

VIEWS = {
    "shape": ("region-centroid-col", "region-centroid-row", "short-line-density-5", "short-line-density-2",
              "vedge-mean", "vegde-sd", "hedge-mean", "hedge-sd"),
    "rgb": ("intensity-mean", "rawred-mean", "rawblue-mean", "rawgreen-mean", "exred-mean", "exblue-mean",
            "exgreen-mean", "value-mean", "saturation-mean", "hue-mean"),
}


def segment_file():
    """The path of river's segment.csv.zip."""
    return package_path("river", "datasets/segment.csv.zip", "segment", "pip install river")


def load_segment():
    """``shape`` (2310, 8) and ``rgb`` (2310, 10) float arrays, labels 0..6 (classes sorted by name)."""
    path = segment_file()
    with zipfile.ZipFile(path) as z, z.open(z.namelist()[0]) as f:
        rows = list(csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline="")))
    header, rows = rows[0], rows[1:]
    missing = [c for cols in VIEWS.values() for c in cols + ("category",) if c not in header]
    if missing:
        raise MieInputError(f"{path} lacks the columns {', '.join(sorted(set(missing)))}")
    table = np.array(rows)
    x = {view: table[:, [header.index(c) for c in cols]].astype(np.float32) for view, cols in VIEWS.items()}
    names = table[:, header.index("category")]
    classes = sorted(set(names.tolist()))
    y = np.array([classes.index(n) for n in names], dtype=np.int64)
    return MultimodalArrays(x, y, None, classes, name="segment", source=str(path))
