"""Distil a teacher LM into a student from the command line (lesson 03), on one or many devices.

    python scripts/distill_lm.py --teacher teacher --student-size student-xs --steps 300 \\
        --loss forward_kl --out runs/xs-fkl                       # one process (CPU or 1 GPU)
    torchrun --nproc_per_node 2 scripts/distill_lm.py --teacher teacher ...   # 2 processes (DDP)
    accelerate launch --num_processes 2 scripts/distill_lm.py --teacher teacher ...

``--teacher`` is ``teacher`` (the shipped model), a folder written by ``save_pretrained``, or
``random-tiny``: a randomly initialised tiny Llama with sharpened (large) embeddings, so its
next-token distributions are far from uniform, with a small byte-level BPE trained here on a
toy chat set; it needs no files and is what the tests use. The student is a fresh model of
``--student-size`` (``tiny``, ``small`` or a zoo size such as ``student-xs``) with the
teacher's vocabulary.

The work is :func:`utils.distill_trainer.distill_lm`, a ``transformers.Trainer``: under
``torchrun`` or ``accelerate launch`` every process builds the same teacher and student (same
seed), the Trainer shards the batches and averages the gradients (DDP; gloo on CPU, NCCL on GPUs).
``--batch-size`` is per process. Every process writes ``<out>/rank<r>.json`` (its own first
and last losses, world size, device); process 0 also writes ``summary.json`` with the
Trainer's log history and, with ``--save``, the student in ``<out>/student/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script, from any folder
    sys.path.insert(0, str(ROOT))

STUDENT_SIZES = ("tiny", "small", "student-s", "student-xs", "student-xxs")


def toy_records(n: int = 256, seed: int = 0) -> list[dict]:
    """Small chat records (``messages``) a tiny model can learn: echo and add two digits."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        if rng.random() < 0.5:
            q, r = f"What is {a} + {b}?", f"Answer: {a + b}"
        else:
            q, r = f"Repeat {a} {b} {a}.", f"{a} {b} {a}"
        out.append({"messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": r}]})
    return out


def random_tiny_teacher(seed: int):
    """``(teacher, tokenizer)``: a tiny random Llama whose distributions are far from uniform."""
    import torch

    from utils.models import ModelConfig, build_model
    from utils.tokenizer import train_tokenizer, world_texts

    tokenizer = train_tokenizer(world_texts(toy_records(512, seed=12345)), vocab_size=300)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=48, num_layers=2, num_heads=2,
                      max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    teacher = build_model(cfg, seed=seed + 1000)
    with torch.no_grad():  # tied embeddings: large rows give peaked next-token distributions
        gen = torch.Generator().manual_seed(seed + 1000)
        emb = teacher.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=gen) * 0.5)
    return teacher.eval(), tokenizer


def student_for(size: str, teacher, seed: int):
    from utils.models import ModelConfig, build_model, zoo_config

    t = ModelConfig.from_hf_config(teacher.config)
    if size == "tiny":
        cfg = ModelConfig(vocab_size=t.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                          max_position_embeddings=t.max_position_embeddings,
                          pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id,
                          eos_token_id=t.eos_token_id)
    elif size == "small":
        cfg = ModelConfig(vocab_size=t.vocab_size, hidden_size=64, num_layers=2, num_heads=2,
                          max_position_embeddings=t.max_position_embeddings,
                          pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id,
                          eos_token_id=t.eos_token_id)
    else:
        cfg = zoo_config(size, teacher=t)
    return build_model(cfg, seed=seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/distill_lm.py", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="teacher",
                   help="'teacher' (shipped), a save_pretrained folder, or 'random-tiny' (tests)")
    p.add_argument("--student-size", default="student-xs", choices=STUDENT_SIZES)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of KD vs hard-label CE")
    p.add_argument("--beta", type=float, default=0.5, help="GKD's beta (loss jsd)")
    p.add_argument("--lmbda", type=float, default=0.0, help="share of on-policy batches (GKD)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="on-policy sample length")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, choices=["world", "toy"],
                   help="training data (default: toy for random-tiny, else the world)")
    p.add_argument("--max-examples", type=int, default=None, help="use the first N examples")
    p.add_argument("--out", "--output-dir", dest="out", required=True, help="output folder")
    p.add_argument("--save", action="store_true", help="process 0 saves the student")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if CUDA is there")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from utils.quiet import silence_library_noise

    silence_library_noise()
    args = parse_args(argv)
    import torch
    from datasets import Dataset

    from utils.distill_trainer import distill_lm
    from utils.io import atomic_write_json
    from utils.models import load_model

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.teacher == "random-tiny":
        teacher, tokenizer = random_tiny_teacher(args.seed)
    else:
        teacher, tokenizer = load_model(args.teacher, verbose=rank == 0)
    student = student_for(args.student_size, teacher, args.seed)
    data = args.data or ("toy" if args.teacher == "random-tiny" else "world")
    if data == "toy":
        train_ds = Dataset.from_list(toy_records(512, seed=args.seed))
        eval_ds = Dataset.from_list(toy_records(32, seed=args.seed + 1))
    else:
        from utils.data import load_world

        train_ds, eval_ds = load_world("train"), load_world("validation").select(range(128))
    if args.max_examples:
        train_ds = train_ds.select(range(min(args.max_examples, len(train_ds))))

    start = time.perf_counter()
    result = distill_lm(
        student, teacher, tokenizer, train_ds, eval_ds, max_steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, loss_type=args.loss,
        temperature=args.temperature, alpha=args.alpha, beta=args.beta, lmbda=args.lmbda,
        max_new_tokens=args.max_new_tokens, gradient_accumulation_steps=args.grad_accum,
        eval_steps=max(1, args.steps // 2), logging_steps=1, progress=not args.no_progress,
        use_cpu=True if args.cpu else None, output_dir=str(out / "trainer"))
    seconds = time.perf_counter() - start
    losses = [s["loss"] for s in result.step_log]
    k = max(1, min(3, len(losses) // 4))
    vocab_sha = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items()))
                               .encode()).hexdigest()
    record = {
        "rank": rank, "world_size": world, "device": str(next(student.parameters()).device),
        "backend": (torch.distributed.get_backend() if torch.distributed.is_available()
                    and torch.distributed.is_initialized() else None),
        "steps": result.steps, "loss_type": args.loss, "teacher": args.teacher,
        "student_size": args.student_size, "seconds": round(seconds, 2),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "first_mean": sum(losses[:k]) / k if losses else None,
        "last_mean": sum(losses[-k:]) / k if losses else None,
        "losses": losses, "on_policy": [bool(s["on_policy"]) for s in result.step_log],
        "on_policy_steps": result.on_policy_steps,
        "tokenizer_vocab_sha256": vocab_sha,
    }
    atomic_write_json(out / f"rank{rank}.json", record)
    if rank == 0:
        atomic_write_json(out / "summary.json", {
            "command": " ".join(sys.argv), "world_size": world,
            "train_seconds": result.train_seconds,
            "final_eval_loss": result.final_eval_loss, "log_history": result.log_history})
        if args.save:
            student.save_pretrained(out / "student")
            tokenizer.save_pretrained(out / "student")
        print(f"distilled {args.student_size} from {args.teacher} ({args.loss}) in "
              f"{result.steps} steps on {world} process(es): loss {record['first_mean']:.4f} -> "
              f"{record['last_mean']:.4f}; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
