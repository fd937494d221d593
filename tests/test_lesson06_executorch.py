"""The cached ExecuTorch program of lesson 06 (the optional `mobile` extra; slow: lowering)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.runtime", reason="ExecuTorch is the optional `mobile` extra: "
                    "install it with `.venv/bin/pip install executorch==1.5.1`")

from utils.deploy import ExecuTorchLM, cached_executorch  # noqa: E402 - after the skip
from utils.models import ModelConfig, build_model  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = ModelConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2,
                     num_kv_heads=1, intermediate_size=64)


def test_cached_executorch_builds_once_and_rebuilds_when_corrupt(tmp_path):
    torch.set_num_threads(2)
    model = build_model(CONFIG, seed=0).eval()
    path, built = cached_executorch(model, max_seq_len=32, cache=tmp_path)
    assert built and path.is_file() and path.parent.parent == tmp_path / "deploy"
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["max_seq_len"] == 32 and len(manifest["sha256"]) == 64
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json", "model.pte"]

    again, built = cached_executorch(model, max_seq_len=32, cache=tmp_path)
    assert again == path and not built  # the second call loads the cached program

    other = build_model(CONFIG, seed=1).eval()  # other weights: another entry
    other_path, built = cached_executorch(other, max_seq_len=32, cache=tmp_path)
    assert built and other_path != path

    good = path.read_bytes()
    path.write_bytes(good[:1000])  # truncated: the sha256 no longer matches, so export again
    again, built = cached_executorch(model, max_seq_len=32, cache=tmp_path)
    assert built and again.read_bytes() == good
    ids = np.array([[3, 1, 4, 1, 5]], dtype=np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    assert np.abs(ExecuTorchLM(again).logits(ids) - ref).max() < 1e-4
