"""Hyper-parameters, declared next to each method: a default, the values it accepts, one line of help.

    class MIE(Method):
        params = {**Method.params,
                  "tau": Param(0.4, number(above=0), "GM temperature τ")}

``create_method`` checks every given value once, against its ``check``; a check returns None for
a good value and otherwise what it expected ("a number > 0"), which becomes the one-line error.
A ``Param``'s ``space`` is the range ``mie tune`` searches by default (None: not tuned):

    "tau": Param(0.4, number(above=0), "GM temperature τ", Space("log", 0.05, 5))
"""
from typing import Callable, NamedTuple

from ..errors import MieInputError


class Space(NamedTuple):
    """A search range: ``kind`` "log" (log-uniform in [low, high]), "float" (uniform), "int"
    (integers in [low, high]) or "choice" (one of ``choices``)."""
    kind: str
    low: float = None
    high: float = None
    choices: tuple = ()


class Param(NamedTuple):
    default: object
    check: Callable = None     # value → None (accepted) or a description of what is expected
    help: str = ""
    space: Space = None        # what ``mie tune`` searches by default (None: not tuned)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(at_least=None, above=None, at_most=None, below=None, integer=False, optional=False):
    """A number (an ``int`` when ``integer``) within the given bounds; None too when ``optional``."""
    low = f"[{at_least}" if at_least is not None else f"({above}" if above is not None else None
    high = f"{at_most}]" if at_most is not None else f"{below})" if below is not None else None
    if low and high:
        bounds = f" in {low}, {high}"
    elif low:
        bounds = f" >= {at_least}" if at_least is not None else f" > {above}"
    elif high:
        bounds = f" <= {at_most}" if at_most is not None else f" < {below}"
    else:
        bounds = ""
    expected = ("None or " if optional else "") + ("an integer" if integer else "a number") + bounds

    def check(v):
        if v is None and optional:
            return None
        ok = _is_number(v) and (isinstance(v, int) or not integer)
        ok = ok and (at_least is None or v >= at_least) and (above is None or v > above)
        ok = ok and (at_most is None or v <= at_most) and (below is None or v < below)
        return None if ok else expected
    return check


def one_of(*choices):
    expected = "one of " + ", ".join(repr(c) for c in choices)
    return lambda v: None if v in choices else expected


def boolean(v):
    return None if isinstance(v, bool) else "true or false"


def modality_list(v):
    ok = v is None or (isinstance(v, (list, tuple)) and all(isinstance(m, str) for m in v))
    return None if ok else "None or a list of modality names"


def check_params(method_name, params, values):
    """Raise ``MieInputError`` for the first value in ``values`` that its ``Param`` refuses."""
    for key, value in values.items():
        check = params[key].check
        expected = check(value) if check is not None else None
        if expected is not None:
            raise MieInputError(f"method '{method_name}': {key} must be {expected}, got {value!r}")
