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

import argparse
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


def paired_grid_parser(prog: str, description: str, out: str) -> argparse.ArgumentParser:
    """The options every seed-paired grid script shares: ``--out``, ``--seeds``, ``--threads``
    and ``--jobs``. The script adds its own (``--quick`` among them) and then calls
    :func:`parse_paired_grid_args`."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", default=out, help="JSON to write")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0-4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one process each)")
    return p


def parse_paired_grid_args(p: argparse.ArgumentParser,
                           argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, fill the default seeds (0-4; ``--quick``: 0 1) and refuse what the paired tests
    cannot use: fewer than two different seeds, no threads or jobs."""
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2, 3, 4]
    if len(set(args.seeds)) < 2:
        p.error("give at least two different seeds: the paired test compares seed by seed")
    if args.jobs <= 0 or args.threads <= 0:
        p.error("--jobs and --threads must be positive")
    return args
