"""utils.io (atomic writes), utils.seed (reproducibility), utils.device (device choice)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

import utils.io as uio
from utils.device import describe_device, pick_device
from utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from utils.seed import seed_everything

# --- io ---------------------------------------------------------------------------------------


def test_atomic_writes_create_parents_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "a" / "b" / "x.bin"
    assert atomic_write_bytes(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode()
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1.5, None]})
    text = (tmp_path / "j.json").read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')  # sorted keys
    assert json.loads(text) == {"a": [1.5, None], "b": 1}
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_atomic_write_replaces_existing_file(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(uio.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_json_that_cannot_be_serialised_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


# --- seed -------------------------------------------------------------------------------------


def _draw():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_reproduces_python_numpy_and_torch():
    assert seed_everything(123) == 123
    first = _draw()
    seed_everything(123)
    assert _draw() == first
    seed_everything(124)
    assert _draw() != first
    assert os.environ["PYTHONHASHSEED"] == "124"


def test_seed_everything_large_seed_wraps_for_numpy():
    seed_everything(2**40 + 5)
    a = float(np.random.rand())
    seed_everything(2**40 + 5)
    assert float(np.random.rand()) == a


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True, None])
def test_seed_everything_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="non-negative int"):
        seed_everything(bad)


def test_seed_everything_deterministic_flag():
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


# --- device -----------------------------------------------------------------------------------


def test_pick_device_default_and_forced(monkeypatch):
    monkeypatch.delenv("DD_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("DD_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")


def test_pick_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.delenv("DD_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device() == torch.device("mps")


@pytest.mark.parametrize("asked", ["cuda", "cuda:0", "mps"])
def test_asking_for_a_missing_device_names_the_fix(monkeypatch, asked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="unset DD_DEVICE or use 'cpu'"):
        pick_device(asked)
    monkeypatch.setenv("DD_DEVICE", asked)
    with pytest.raises(RuntimeError, match="not available"):
        pick_device()


def test_describe_cpu():
    text = describe_device(torch.device("cpu"))
    assert text.startswith("cpu (") and f"{torch.get_num_threads()} torch threads" in text


def test_replace_dir_swaps_whole_folders(tmp_path):
    from utils.io import replace_dir

    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new = tmp_path / ".model.tmp"
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert not new.exists() and not (tmp_path / ".model.old").exists()
