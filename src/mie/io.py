"""Atomic writes: a result file is either complete or absent, never half-written."""
import csv
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(path, obj):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def csv_text(rows):
    """CSV of dict rows; the columns are every key, in order of first appearance."""
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_torch(path, map_location, what):
    """``torch.load`` of a file this library wrote; a missing or damaged file is one ``MieInputError``
    naming ``what`` it should have been."""
    from .errors import MieInputError
    path = Path(path)
    if not path.is_file():
        raise MieInputError(f"no such file: {path} ({what})")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:   # truncated or overwritten files fail in pickle, zipfile or torch itself
        raise MieInputError(f"cannot read {path} ({what}): the file is damaged or not a mie checkpoint "
                            f"({type(e).__name__})") from None
