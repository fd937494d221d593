"""Progress bars that a notebook runner can keep up with.

A notebook progress bar (``tqdm.auto`` in Jupyter) is an ipywidget: every redraw is a few
messages on the kernel's IOPub channel. ZeroMQ keeps at most 1000 unread messages per socket
(its default high-water mark) and *drops* the rest; nbval reads IOPub only after a cell
finishes, so a long cell that redraws ten times a second (tqdm's default) overflows it, the
kernel's final "idle" message is lost and nbval fails the cell with "Timeout of 5 seconds
exceeded waiting for output". Redrawing at most every :data:`MIN_INTERVAL_S` seconds keeps a
ten-minute cell under 1000 messages and looks the same to a learner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

MIN_INTERVAL_S = 2.0  # seconds between redraws of a bar


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, **kwargs)`` that redraws at most every ``MIN_INTERVAL_S`` s."""
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", MIN_INTERVAL_S)
    return tqdm(iterable, **kwargs)


def run_jobs(fn: Callable[..., T], jobs: Sequence[tuple], *, workers: int = 1, desc: str = "",
             extra: tuple = ()) -> list[T]:
    """``[fn(*job, *extra) for job in jobs]``, in order, with a bar on a terminal.

    ``workers=1`` runs them in this process; more runs them in that many fresh processes
    (``spawn``: each imports torch itself, so ``fn`` must be importable, and it should pin its
    own threads, e.g. :func:`utils.quiet.quiet_cpu_worker`). The experiment scripts' grids.
    """
    import sys

    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out: list[T] = []
    bar = tqdm(total=len(jobs), desc=desc, disable=not sys.stderr.isatty())
    try:
        if workers == 1:
            for job in jobs:
                out.append(fn(*job, *extra))
                bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(fn, *job, *extra) for job in jobs]
                for f in futures:
                    out.append(f.result())
                    bar.update(1)
    finally:
        bar.close()
    return out
