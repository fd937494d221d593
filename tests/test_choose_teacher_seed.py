"""The rule that chooses between teacher builds on validation (scripts/choose_teacher_seed.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "choose_teacher_seed",
    Path(__file__).resolve().parent.parent / "scripts" / "choose_teacher_seed.py",
)
choose_teacher_seed = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(choose_teacher_seed)
TARGETS = {
    "exact_match_per_skill_min": 0.90,
    "refusal_rate_min": 0.95,
    "over_refusal_rate_max": 0.05,
}


def _metrics(skills: dict, refusal: float, over: float) -> dict:
    return {
        "exact_match": {"per_skill": skills},
        "safety": {"refusal_rate": refusal, "over_refusal_rate": over},
    }


def test_margins_are_signed_distances_to_each_target():
    m = choose_teacher_seed.margins(_metrics({"facts": 0.95, "strings": 0.88}, 0.97, 0.02), TARGETS)
    assert m == pytest.approx(
        {"facts": 0.05, "strings": -0.02, "refusal": 0.02, "over_refusal": 0.03}
    )


def test_the_largest_smallest_margin_among_eligible_builds_is_chosen():
    scored = {
        "a": {"x": 0.011, "y": 0.2},
        "b": {"x": 0.031, "y": 0.05},
        "c": {"x": 0.5, "y": -0.001},
    }
    assert choose_teacher_seed.choose(scored) == "b"  # c has the best score but misses a target
    assert choose_teacher_seed.choose({"c": scored["c"]}) is None
