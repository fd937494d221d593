"""scripts/distill_lm.py under torchrun: two CPU processes (gloo), both finish, the loss falls.

The DistillationTrainer is a transformers.Trainer, so the multi-device path is the Trainer's
own (DDP through accelerate). Here it runs on 2 CPU processes with the gloo backend and a
random-tiny teacher: about 20 steps, well under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_process_distillation(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "scripts" / "distill_lm.py"), "--teacher", "random-tiny",
           "--student-size", "tiny", "--steps", "20", "--batch-size", "8", "--lr", "1e-2",
           "--loss", "forward_kl", "--alpha", "1.0", "--lmbda", "0.5", "--max-new-tokens", "6",
           "--out", str(out), "--cpu", "--no-progress", "--save"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, rec in enumerate(ranks):
        assert rec["rank"] == rank and rec["world_size"] == 2 and rec["backend"] == "gloo"
        assert rec["steps"] == 20 and len(rec["losses"]) == 20
        # each process's own loss falls clearly (random-tiny teacher: about 4.9 -> 1), compared
        # on the dataset's (off-policy) batches; some batches were the student's own samples
        assert 0 < rec["on_policy_steps"] < 20
        off = [loss for loss, on in zip(rec["losses"], rec["on_policy"], strict=True) if not on]
        assert sum(off[-3:]) < 0.6 * sum(off[:3]), rec
    # same teacher/tokenizer on both processes, different shards of the data
    assert ranks[0]["tokenizer_vocab_sha256"] == ranks[1]["tokenizer_vocab_sha256"]
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert ranks[0]["on_policy_steps"] == ranks[1]["on_policy_steps"]  # same coin flips
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert any("eval_loss" in h for h in summary["log_history"])
    assert (out / "student" / "model.safetensors").is_file()
