"""Fixtures shared by the teacher-API tests (test_serve, test_extraction, test_lesson04).

A module that starts servers marks itself with
``pytestmark = pytest.mark.usefixtures("no_server_left_behind")``; a module that defines its
own ``tok`` or ``teacher`` fixture overrides these.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_chat import assert_no_live_servers, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def no_server_left_behind():
    """Fail the module if any teacher API is still running at its end."""
    yield
    assert_no_live_servers()


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer (with one torch thread: these tests are latency-bound)."""
    torch.set_num_threads(1)
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    """A tiny teacher model over :func:`tok`."""
    return tiny_model(tok, hidden_size=32, seed=0)
