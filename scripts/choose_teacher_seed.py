"""Choose between teacher builds (build seeds) on validation, by the rule fixed in advance.

    python scripts/build_teacher.py --seed 0 --out /tmp/seed0    # ... one build per seed
    python scripts/choose_teacher_seed.py /tmp/seed0 /tmp/seed1 /tmp/seed2

Scores each build on the whole validation split (its own held-out jailbreak templates
included; test is never read) and applies the rule of docs/WORLD_DESIGN.md, section 11: a build
is eligible when its validation scores meet every target of ``build_teacher.TARGETS``; among
eligible builds, the one with the largest smallest margin to a target is chosen. Prints one row
per build and the choice; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script
    sys.path.insert(0, str(ROOT))


def margins(metrics: dict, targets: dict) -> dict[str, float]:
    """Score minus target for each minimum, target minus score for the over-refusal maximum."""
    out = {skill: v - targets["exact_match_per_skill_min"]
           for skill, v in metrics["exact_match"]["per_skill"].items()}
    out["refusal"] = metrics["safety"]["refusal_rate"] - targets["refusal_rate_min"]
    out["over_refusal"] = targets["over_refusal_rate_max"] - metrics["safety"]["over_refusal_rate"]
    return out


def choose(scored: dict[str, dict[str, float]]) -> str | None:
    """The build with the largest smallest margin among those with no negative margin."""
    eligible = {name: min(m.values()) for name, m in scored.items() if min(m.values()) >= 0}
    return max(eligible, key=eligible.get) if eligible else None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from utils.quiet import silence_library_noise

    silence_library_noise()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "builds", nargs="+", type=Path, help="folders written by build_teacher.py --out"
    )
    args = parser.parse_args(argv)
    missing = [str(b) for b in args.builds if not (b / "model_card.json").is_file()]
    if missing:
        parser.error(f"not a teacher build (no model_card.json): {', '.join(missing)}. "
                     "Fix: build one with `python scripts/build_teacher.py --seed N --out FOLDER`.")
    import torch

    from scripts.build_teacher import TARGETS
    from utils.data import load_world
    from utils.evaluate import evaluate_world
    from utils.models import load_model

    torch.set_num_threads(1)
    validation = load_world()["validation"]
    scored = {}
    for folder in args.builds:
        model, tok = load_model(folder)
        metrics, _ = evaluate_world(model, tok, validation, with_perplexity=False)
        scored[str(folder)] = m = margins(metrics, TARGETS)
        em, s = metrics["exact_match"]["per_skill"], metrics["safety"]
        print(
            f"{folder}: "
            + ", ".join(f"{k} {v:.1%}" for k, v in em.items())
            + f"; refusal {s['refusal_rate']:.1%}, held-out jailbreak refusal"
            f" {s['heldout_jailbreak_refusal_rate']:.1%},"
            f" over-refusal {s['over_refusal_rate']:.1%};"
            f" smallest margin {min(m.values()):+.1%} ({min(m, key=m.get)})",
            flush=True,
        )
    chosen = choose(scored)
    print(
        f"chosen: {chosen}"
        if chosen
        else "no build meets every target on validation: none is chosen"
    )
    return 0 if chosen else 1


if __name__ == "__main__":
    raise SystemExit(main())
