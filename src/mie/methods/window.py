"""The modulation window shared by the on-the-fly methods: a method's balancing acts only in loop
epochs ``modulation_starts <= epoch < modulation_ends`` (0-based; ``modulation_ends=None``: to the
end of the budget). Outside it, a step is the method's plain training step."""
from ..errors import MieInputError
from .params import Param, number

WINDOW_PARAMS = {
    "modulation_starts": Param(0, number(at_least=0, integer=True), "first loop epoch (0-based) that modulates"),
    "modulation_ends": Param(None, number(at_least=1, integer=True, optional=True),
                             "first loop epoch that no longer modulates (None: to the end)"),
}


def check_window(values):
    """Refuse a window that ends before it starts (``values``: a method's parameters)."""
    starts, ends = values.get("modulation_starts", 0), values.get("modulation_ends")
    if ends is not None and ends <= starts:
        raise MieInputError(f"modulation_ends must be None or an epoch index > modulation_starts ({starts}), "
                            f"got {ends}")


def in_window(epoch, starts, ends):
    """Whether loop epoch ``epoch`` lies in [starts, ends)."""
    return starts <= epoch and (ends is None or epoch < ends)
