"""What every ``mie prepare`` shares: one job per raw item, run on all cores with a progress bar,
finished files skipped on a re-run, bad items either an error or a report, and atomic writes.

A dataset module writes ``prepare_one(job) → (key, status)`` (status "done", "skipped" or the
reason the item is bad, as text) and hands its jobs to ``run_jobs``; ``finish`` then raises on
bad items or lists them in OUT/bad_files.txt.
"""
import os
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import MieInputError
from ..io import atomic_path

BAD_REPORT = "bad_files.txt"


@dataclass
class PrepareSummary:
    done: int = 0
    skipped: int = 0
    bad: dict = field(default_factory=dict)   # item → why


def save_npy(path, array):
    """np.save that leaves either the whole file or none."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def run_jobs(prepare_one, jobs, summary, workers=None, desc="prepare", progress=None):
    """Run ``prepare_one`` (a module-level function) over ``jobs`` in ``workers`` processes
    (default: all cores), counting results into ``summary``."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    bar = tqdm(total=len(jobs), desc=desc, disable=None if progress is None else not progress)

    def count(results):
        for key, status in results:
            if status == "done":
                summary.done += 1
            elif status == "skipped":
                summary.skipped += 1
            else:
                summary.bad[key] = status
            bar.update()

    try:
        if workers == 1:
            count(map(prepare_one, jobs))
        else:
            # spawn, not fork: a forked child deadlocks in torch's OpenMP pool once the parent has used it
            with get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                count(pool.imap_unordered(prepare_one, jobs, chunksize=4))
    finally:
        bar.close()
    return summary


def finish(summary, out, skip_bad, noun="file"):
    """Bad items: an error naming the first ones (default), or with ``skip_bad`` a report file."""
    if not summary.bad:
        return summary
    names = sorted(summary.bad)
    if not skip_bad:
        raise MieInputError(f"{len(names)} bad {noun}(s), first: {', '.join(names[:3])} "
                            f"({summary.bad[names[0]]}); pass --skip-bad to leave them out")
    with atomic_path(os.path.join(out, BAD_REPORT)) as tmp:
        tmp.write_text("".join(f"{k}\t{summary.bad[k]}\n" for k in names))
    return summary

