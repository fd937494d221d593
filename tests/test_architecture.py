"""The import rules of docs/ARCHITECTURE.md, enforced on every import in ``utils/``.

Every ``import`` and ``from ... import`` counts, at module level or inside a function (a lazy
import is still a dependency). Layers, lowest first: foundation -> science -> orchestration ->
teaching; a module may import its own layer and the layers below it, never above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

UTILS = Path(__file__).resolve().parent.parent / "utils"

LAYERS: dict[str, tuple[str, ...]] = {
    # where files live, how the course is quiet, generic statistics: no course concepts at all
    "foundation": ("paths", "io", "seed", "device", "quiet", "progress", "results", "stats"),
    # the concepts the lessons teach, each a small module of pure functions
    "science": ("data", "tokenizer", "models", "model_cache", "train", "distill",
                "distill_trainer", "evaluate", "extraction", "watermark", "quantize",
                "deploy", "safety", "serve", "digits", "xstest",
                "attacks", "guardrail", "multi_answer"),
    # what builds and lists the course's own models from the science modules
    "orchestration": ("recipes", "course_models", "students", "capstone"),
    # what runs the course itself: exercises' checks, notebooks, workshop tools
    "teaching": ("checks", "lessons", "doctor", "lab", "grade", "leaderboard"),
}
ORDER = list(LAYERS)
# Narrower rules on top of the layers.
FORBIDDEN = {
    # The safety harness judges any model the same way, whatever made it.
    "safety": {"distill", "distill_trainer", "quantize", "recipes"},
    # The cache stores any recipe's output; it knows nothing of the model family.
    "model_cache": {"models", "recipes"},
    # Lesson 01's losses stay light: no transformers.Trainer behind `import utils.distill`.
    "distill": {"distill_trainer", "models"},
}


def _module_of(path: Path) -> str:
    rel = path.relative_to(UTILS).with_suffix("")
    return rel.parts[0]


def _layer(module: str) -> str:
    for layer, members in LAYERS.items():
        if module in members:
            return layer
    raise AssertionError(f"utils.{module} has no layer in tests/test_architecture.py: add it "
                         "(and to docs/ARCHITECTURE.md)")


def _course_imports(path: Path) -> set[str]:
    """The top-level ``utils`` modules that a file imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                     if node.module == "utils"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "utils" and len(parts) > 1:
                found.add(parts[1])
    return found


FILES = sorted(p for p in UTILS.rglob("*.py") if p.name != "__init__.py" or p.parent != UTILS)


def test_every_module_has_a_layer():
    modules = {_module_of(p) for p in FILES}
    for m in modules:
        _layer(m)
    listed = {m for members in LAYERS.values() for m in members}
    assert listed <= modules, f"listed but missing from utils/: {sorted(listed - modules)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(UTILS)))
def test_imports_only_go_down_the_layers(path):
    me = _module_of(path)
    mine = ORDER.index(_layer(me))
    for other in sorted(_course_imports(path) - {me}):
        theirs = ORDER.index(_layer(other))
        assert theirs <= mine, (
            f"utils/{path.relative_to(UTILS)} ({ORDER[mine]}) imports utils.{other} "
            f"({ORDER[theirs]}): a module may only import its own layer or lower ones "
            "(docs/ARCHITECTURE.md)")
    bad = _course_imports(path) & FORBIDDEN.get(me, set())
    assert not bad, f"utils.{me} must not import {sorted(bad)} (docs/ARCHITECTURE.md)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(UTILS)))
def test_no_hidden_imports(path):
    """Every dependency is an import statement a reader (and this test) can see."""
    text = path.read_text(encoding="utf-8")
    for hidden in ("importlib.import_module", "__import__(", "import_module("):
        assert hidden not in text, f"utils/{path.relative_to(UTILS)} uses {hidden}"


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: a science module importing a teaching one is found."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from utils.checks import run_check\n    import utils.recipes\n")
    assert _course_imports(bad) == {"checks", "recipes"}
    assert ORDER.index(_layer("checks")) > ORDER.index(_layer("safety"))
