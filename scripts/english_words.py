"""The English word list of lesson 07's harm judge (data/safety/english_words.txt), reproducibly.

    python scripts/english_words.py --check            # exit 1 unless the committed file is intact
    python scripts/english_words.py --build DICT_DIR   # rebuild it from the Debian word lists

:class:`utils.safety.HarmJudge` counts a clause as restricted content only when every word in
it is a word, of English or of the course's world: the students' garbled text ("Plant theil
with oil", "Start roed Vexrootia") is not something a reader could act on. The English side
is SCOWL (Kevin Atkinson's Spell Checker Oriented Word Lists), as Debian ships it:

- ``wamerican`` and ``wbritish`` 2020.12.07-2 (SCOWL size 50: common and less common words,
  both spellings, so "colour" and "color");
- words of at most four letters only when they are also in ``wamerican-small`` and
  ``wbritish-small`` (size 35): the short entries of size 50 are mostly abbreviations and
  fragments ("comm", "ap", "sy") that the students' gibberish is made of.

Kept: entries of letters only, lower-cased, possessives ("'s") dropped. SCOWL's licence (free
to use, copy and distribute, with its notice) is in ``data/safety/ENGLISH_WORDS.md``.

To rebuild, get the four packages with ``apt-get download wamerican wbritish
wamerican-small wbritish-small``, unpack each with ``dpkg-deb -x PKG.deb DIR`` into one DIR,
and run ``--build DIR``; the sha256 of the packages used is in ENGLISH_WORDS.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script
    sys.path.insert(0, str(ROOT))

from utils.io import sha256_file  # noqa: E402
from utils.paths import data_dir  # noqa: E402

WORDS_FILE = "safety/english_words.txt"  # under data/
# sha256 of the committed file (what --check compares); update it with the file
SHA256 = "d8823880e48cdadaf4f5efb3ac82ab95f14bd10e6ece245a511875e6d32a5d43"
LARGE = ("american-english", "british-english")  # SCOWL size 50
SMALL = ("american-english-small", "british-english-small")  # SCOWL size 35
SHORT = 4  # words of at most this many letters must be in the small lists


def _entries(path: Path) -> set[str]:
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        word = line.strip()
        if word.endswith("'s") or not re.fullmatch(r"[A-Za-z]+", word):
            continue
        out.add(word.lower())
    return out


def build(dict_dir: Path) -> list[str]:
    """The word list from unpacked Debian packages (``usr/share/dict/`` under ``dict_dir``)."""
    folder = dict_dir / "usr" / "share" / "dict"
    missing = [n for n in LARGE + SMALL if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: unpack wamerican, wbritish, "
                                "wamerican-small and wbritish-small there (see --help)")
    large = set().union(*(_entries(folder / n) for n in LARGE))
    small = set().union(*(_entries(folder / n) for n in SMALL))
    return sorted(small | {w for w in large if len(w) > SHORT})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/english_words.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--build", type=Path, default=None, metavar="DICT_DIR",
                   help="rebuild data/safety/english_words.txt from unpacked Debian packages")
    p.add_argument("--check", action="store_true", help="verify the committed file's sha256")
    args = p.parse_args(argv)
    path = data_dir() / WORDS_FILE
    if args.build:
        from utils.io import atomic_write_text

        words = build(args.build)
        atomic_write_text(path, "".join(w + "\n" for w in words))
        print(f"wrote {len(words)} words to {path}; sha256 {sha256_file(path)}")
        return 0
    if not path.is_file():
        print(f"{path} is missing: restore it from the repository", file=sys.stderr)
        return 1
    got = sha256_file(path)
    print(f"{path.name}: {sum(1 for _ in path.open(encoding='utf-8'))} words, sha256 {got}")
    if args.check and got != SHA256:
        print(f"sha256 differs from the recorded {SHA256}: rebuild it (see --help)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
