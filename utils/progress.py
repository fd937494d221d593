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

from collections.abc import Iterable
from typing import Any

MIN_INTERVAL_S = 2.0  # seconds between redraws of a bar


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, **kwargs)`` that redraws at most every ``MIN_INTERVAL_S`` s."""
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", MIN_INTERVAL_S)
    return tqdm(iterable, **kwargs)
