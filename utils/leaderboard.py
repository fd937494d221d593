"""A workshop leaderboard from participants' capstone cards (lesson 08).

    python -m utils.leaderboard cards/*.json --out leaderboard   # or: make leaderboard
    python -m utils.leaderboard cards/ --bars bars.json          # a folder: every *.json in it

Each card is the JSON twin that ``utils.capstone.write_card`` writes. Every card is validated
(:func:`utils.capstone.validate_card`); a bad one stops the run with the file, the field and
the fix, unless ``--skip-invalid`` lists it instead. The bars are the *workshop's* (the
defaults of :class:`utils.capstone.Bars`, or ``--bars FILE``), re-applied to each card's
numbers: a card cannot pass by declaring looser bars of its own.

Ranking rule, for the cards that meet every bar: higher exact match first (the utility the
device keeps), then the smaller file, then the lower held-out jailbreak success, then the
participant's name. Cards that miss a bar follow, with the bars they miss. Writes
``<out>/leaderboard.md`` and ``<out>/leaderboard.csv`` atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.capstone import BAR_SPECS, Bars, evaluate_bars, failed_bars, validate_card
from utils.io import atomic_write_text

RANKING_RULE = ("cards meeting every bar, by exact match (higher first), then file size "
                "(smaller first), then held-out jailbreak success (lower first), then name")


class CardError(ValueError):
    """A card that cannot be ranked: the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Entry:
    """One participant's card as the leaderboard sees it."""

    path: Path
    participant: str
    choice: str
    exact_match: float
    file_bytes: int
    heldout_jailbreak: float
    failed: tuple[str, ...]
    card: dict

    @property
    def meets_all(self) -> bool:
        return not self.failed


def read_card(path: str | os.PathLike, bars: Bars) -> Entry:
    """Read and validate one card, re-applying ``bars`` to its numbers."""
    path = Path(path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"{path}: no such file (pass the JSON card that write_card wrote)") \
            from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"{path}: not valid JSON ({exc}); pass the .json twin that "
                        "utils.capstone.write_card wrote, not the markdown") from None
    problems = validate_card(card)
    if problems:
        raise CardError(f"{path}: " + "; ".join(problems))
    verdicts = evaluate_bars(card["metrics"], bars)
    c = card["choice"]
    return Entry(path=path, participant=card["participant"],
                 choice=f"{c['student']} / {c['quantization']} / {c['runtime']}",
                 exact_match=float(card["metrics"]["exact_match"]["value"]),
                 file_bytes=int(card["metrics"]["file_bytes"]["value"]),
                 heldout_jailbreak=float(
                     card["metrics"]["heldout_jailbreak_success_rate"]["value"]),
                 failed=tuple(failed_bars(verdicts)), card=card)


def expand(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder stands for every ``*.json`` in it (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not out:
        raise CardError("no cards: pass JSON card files or a folder holding them")
    return out


def rank(entries: Sequence[Entry]) -> tuple[list[Entry], list[Entry]]:
    """``(ranked, failing)``: cards meeting every bar in :data:`RANKING_RULE` order, then the
    others by the number of bars missed and name."""
    ranked = sorted((e for e in entries if e.meets_all),
                    key=lambda e: (-e.exact_match, e.file_bytes, e.heldout_jailbreak,
                                   e.participant))
    failing = sorted((e for e in entries if not e.meets_all),
                     key=lambda e: (len(e.failed), e.participant))
    return ranked, failing


def _miss(entry: Entry, name: str) -> str:
    _, direction, _, label, unit = BAR_SPECS[name]
    m = entry.card["metrics"][name]
    end = m["ci"][0] if direction == "min" else m["ci"][1]
    shown = f"{end:.1%}" if unit == "rate" else f"{end:,.0f} {unit}"
    return f"{label} ({'low' if direction == 'min' else 'high'} end {shown})"


def markdown(ranked: Sequence[Entry], failing: Sequence[Entry], bars: Bars,
             invalid: Sequence[str] = ()) -> str:
    """The leaderboard as markdown."""
    lines = ["# Capstone leaderboard", "", f"Ranking: {RANKING_RULE}. A bar is met when the "
             "whole 95% interval is on the right side of it.", "",
             "Bars: " + ", ".join(f"{BAR_SPECS[k][3]} {'>=' if BAR_SPECS[k][1] == 'min' else '<='}"
                                  f" {getattr(bars, BAR_SPECS[k][0]):g}" for k in BAR_SPECS), "",
             "| rank | participant | choice | exact match | file bytes | held-out jailbreak |",
             "|---|---|---|---|---|---|"]
    for i, e in enumerate(ranked, 1):
        lines.append(f"| {i} | {e.participant} | {e.choice} | {e.exact_match:.1%} | "
                     f"{e.file_bytes:,} | {e.heldout_jailbreak:.1%} |")
    if not ranked:
        lines.append("| - | no card meets every bar yet | | | | |")
    lines += ["", "## Missing a bar", ""]
    lines += [f"- {e.participant} ({e.choice}): " + "; ".join(_miss(e, n) for n in e.failed)
              for e in failing] or ["- none"]
    if invalid:
        lines += ["", "## Invalid cards (not ranked)", ""] + [f"- {p}" for p in invalid]
    return "\n".join(lines) + "\n"


def csv_text(ranked: Sequence[Entry], failing: Sequence[Entry]) -> str:
    """One row per card: rank (empty when failing), participant, choice, numbers, bars missed."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "participant", "choice", "exact_match", "file_bytes",
                "heldout_jailbreak_success", "meets_all", "failed_bars", "card"])
    for i, e in enumerate([*ranked, *failing], 1):
        w.writerow([i if e.meets_all else "", e.participant, e.choice, f"{e.exact_match:.4f}",
                    e.file_bytes, f"{e.heldout_jailbreak:.4f}", e.meets_all,
                    " ".join(e.failed), str(e.path)])
    return buf.getvalue()


def build(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
          bars: Bars | None = None, skip_invalid: bool = False) -> dict[str, Any]:
    """Read, validate and rank the cards, and write ``leaderboard.md`` / ``.csv`` into
    ``out`` atomically. Returns the written paths and the ranking."""
    bars = bars or Bars()
    entries, invalid = [], []
    for p in expand(paths):
        try:
            entries.append(read_card(p, bars))
        except CardError as exc:
            if not skip_invalid:
                raise
            invalid.append(str(exc))
    ranked, failing = rank(entries)
    out = Path(out)
    md = atomic_write_text(out / "leaderboard.md", markdown(ranked, failing, bars, invalid))
    cs = atomic_write_text(out / "leaderboard.csv", csv_text(ranked, failing))
    return {"markdown": md, "csv": cs, "ranked": ranked, "failing": failing,
            "invalid": invalid}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m utils.leaderboard",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("cards", nargs="+", help="card JSON files, or folders holding them")
    ap.add_argument("--out", default="leaderboard", help="folder for leaderboard.md/.csv")
    ap.add_argument("--bars", default=None,
                    help="JSON file of bars (utils.capstone.Bars fields) instead of the defaults")
    ap.add_argument("--skip-invalid", action="store_true",
                    help="list invalid cards instead of stopping at the first one")
    args = ap.parse_args(argv)
    try:
        bars = Bars()
        if args.bars:
            try:
                bars = Bars.from_dict(json.loads(Path(args.bars).read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                raise CardError(f"{args.bars}: cannot read the bars ({exc}); write a JSON "
                                "object of utils.capstone.Bars fields") from None
        result = build(args.cards, args.out, bars=bars, skip_invalid=args.skip_invalid)
    except CardError as exc:
        print(f"leaderboard: {exc}", file=sys.stderr)
        return 2
    print(f"{len(result['ranked'])} card(s) meet every bar, {len(result['failing'])} miss one, "
          f"{len(result['invalid'])} invalid -> {result['markdown']} and {result['csv']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
