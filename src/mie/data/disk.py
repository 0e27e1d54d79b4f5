"""Benchmarks read from a user's disk: ``mie prepare NAME --root RAW --out DIR`` once, then
``mie train --dataset NAME --root DIR``.

Each benchmark module offers two functions:

    prepare(root, out, *, workers, skip_bad, progress, **options) → PrepareSummary
    datasets(prepared, seed, *, carve_val, **options) → {"train", "val", "test"} Datasets
        yielding ({modality: tensor}, label); a ``datasets`` that takes ``modalities`` is told the
        run's ``data.modalities`` (None: all), so it need not read the others

``options`` are the benchmark's own keyword arguments: ``key=value`` words on the ``mie prepare``
line, and ``data.options`` in a config for training.
"""
import inspect
from dataclasses import dataclass

from ..errors import MieInputError


@dataclass(frozen=True)
class DiskBenchmark:
    name: str
    description: str
    modalities: tuple
    prepare: callable
    datasets: callable


GENERIC = {"root", "out", "prepared", "seed", "workers", "skip_bad", "progress", "carve_val", "modalities"}


def options_of(fn):
    """{option: default} of a benchmark function, without the arguments every benchmark has."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if k not in GENERIC and p.default is not p.empty}


def call_with_options(fn, what, options, *args, **kwargs):
    """``fn(*args, **kwargs, **options)``, refusing options ``fn`` does not take in one clear line."""
    if not isinstance(options, dict):
        raise MieInputError(f"{what} options must be a mapping of name → value, got {options!r}")
    known = options_of(fn)
    unknown = sorted(set(options) - set(known))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "(none)"
        raise MieInputError(f"{what} has no option {', '.join(unknown)}; its options are: {listing}")
    return fn(*args, **kwargs, **options)
