"""Silencing library chatter so notebook outputs show only what the lesson prints."""

from __future__ import annotations

import logging
import os
import warnings


def silence_library_noise() -> None:
    """Quiet transformers, datasets, torchao and common warnings (call in a setup cell).

    stderr counts as output for nbval and for learners reading a notebook; the lesson's own
    messages should be the only thing printed.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("torchao", "torch.utils._pytree", "torch._dynamo", "torch.onnx", "onnxscript",
                 "datasets", "transformers", "accelerate", "httpx", "urllib3", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pytree.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def quiet_cpu_worker(threads: int) -> None:
    """Set up a script's worker process: offline hub, ``threads`` OpenMP and torch threads,
    quiet libraries. Call it before anything imports torch (OpenMP reads its variable once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    silence_library_noise()
    import torch

    torch.set_num_threads(threads)
