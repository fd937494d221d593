"""ExecuTorch export and run (the optional `mobile` extra, lesson 06).

Skipped with a message when executorch is not installed (`pip install executorch==1.5.1`).
Lowering to XNNPACK takes tens of seconds, so the program is built once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.runtime", reason="ExecuTorch is the optional `mobile` extra: "
                    "install it with `.venv/bin/pip install executorch==1.5.1`")

from utils.deploy import (  # noqa: E402 - after the skip
    ExecuTorchLM,
    benchmark_runtime,
    export_executorch,
    max_abs_logit_diff,
    reference_outputs,
)
from utils.models import ModelConfig, build_model  # noqa: E402

pytestmark = pytest.mark.slow

VOCAB = 512
CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return build_model(CONFIG, seed=0).eval()


@pytest.fixture(scope="module")
def pte(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("executorch") / "model.pte"
    return export_executorch(model, path, max_seq_len=64)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))


def test_pte_written_atomically(pte):
    assert pte.stat().st_size > 100_000
    assert [p.name for p in pte.parent.iterdir()] == ["model.pte"]


def test_logits_match_pytorch(model, pte, prompt):
    lm = ExecuTorchLM(pte)
    with torch.no_grad():
        ref = model(input_ids=prompt).logits
    diff = max_abs_logit_diff(lm.logits(prompt), ref)
    print(f"ExecuTorch vs PyTorch: max |dlogit| = {diff:.2e}")
    assert diff < 1e-4


def test_cached_generate_matches_pytorch(model, pte, prompt):
    lm = ExecuTorchLM(pte)
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=16, eos_token_id=None, pad_token_id=0).numpy()
    assert np.array_equal(lm.generate(prompt, 16), want)
    new = want[0, 7:].tolist()  # a random model repeats itself: stop at a token's first use
    k = next((i for i in range(1, len(new)) if new[i] not in new[:i]), 0)
    assert np.array_equal(lm.generate(prompt, 16, new[k]), want[:, : 7 + k + 1])


def test_missing_and_corrupt_pte_give_clear_errors(pte, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pte.*export_executorch"):
        ExecuTorchLM(tmp_path / "nope.pte")
    bad = tmp_path / "bad.pte"
    bad.write_bytes(pte.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"bad\.pte.*export again"):
        ExecuTorchLM(bad)
    with pytest.raises(ValueError, match="batch 1"):
        ExecuTorchLM(pte).generate(np.ones((2, 3), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="max_seq_len"):
        ExecuTorchLM(pte).generate(np.ones((1, 60), dtype=np.int64), 10)


def test_benchmark_executorch_in_subprocess(model, pte, prompt):
    row = benchmark_runtime("executorch", "executorch", pte, prompt, max_new_tokens=8,
                            reference=reference_outputs(model, prompt, 8), repeats=1)
    print(row)
    assert row["bytes"] == pte.stat().st_size
    assert row["max_abs_logit_diff"] < 1e-4 and row["greedy_agreement"] == 1.0
    assert row["tokens_per_s_1thread"] > 0 and row["peak_rss_mb"] > 0
