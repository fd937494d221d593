"""Choosing where tensors live. Introduced in lesson 00 (d2l's ``try_gpu``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU.

    ``prefer`` (or the ``DD_DEVICE`` environment variable) forces one, e.g. ``"cpu"`` to
    compare timings; asking for a device that is not there raises with the fix.
    """
    choice = prefer or os.environ.get("DD_DEVICE")
    if choice:
        device = torch.device(choice)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {choice!r} was asked for but CUDA is not available; "
                "unset DD_DEVICE or use 'cpu'"
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(
                f"device {choice!r} was asked for but MPS is not available; "
                "unset DD_DEVICE or use 'cpu'"
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """One human line: which device and, on CPU, how many threads torch uses."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, then restore the previous count.

    The experiments pin their thread count so a measured outcome is the same number in the
    notebook (which may use 1 or 2 threads) and in the tests: float sums in another order can
    move a test error or two, and a bar is only meaningful on a reproducible measurement.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
