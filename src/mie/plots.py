"""Figures: matplotlib (the optional extra ``mie[plot]``) without a display, PNGs written atomically."""
from .errors import MieInputError
from .io import atomic_path

INSTALL = "pip install 'mie[plot]'"


def missing_extra():
    """None when matplotlib can be imported, else one line saying what to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"no plot drawn: matplotlib is not installed ({INSTALL})"
    return None


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    note = missing_extra()
    if note:
        raise MieInputError(note)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write ``fig`` as a PNG at ``path`` (complete or absent, never half-written) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    pyplot().close(fig)
