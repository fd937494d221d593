"""Fetch XSTest (Röttger et al., NAACL 2024) into the course cache, pinned and verified.

    python -m utils.xstest fetch     # make xstest: download, check every sha256, then install
    python -m utils.xstest verify    # check the copy lesson 07 would read
    python -m utils.xstest where     # print that folder

Lesson 07 calibrates its refusal judges on XSTest's human labels
(:func:`utils.safety.load_xstest`). The files are never copied into the repository: they come
from the authors' repository at a fixed commit, into ``<course cache>/xstest`` (``DD_CACHE_DIR``
moves it), and a file whose sha256 differs from the pinned one is refused; nothing is installed
until every file is verified. ``DD_XSTEST_DIR`` points at a copy you already have instead.
The prompts are CC BY 4.0; the model completions carry the licences of their models (Meta,
Mistral, OpenAI), as the XSTest README says.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from utils.io import atomic_write_json, replace_dir, sha256_file
from utils.paths import cache_dir, repo_root

XSTEST_REPO = "paul-rottger/xstest"  # formerly paul-rottger/exaggerated-safety
XSTEST_COMMIT = "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d"
XSTEST_URL = f"https://raw.githubusercontent.com/{XSTEST_REPO}/{XSTEST_COMMIT}/"
URL_ENV = "DD_XSTEST_URL"  # another base URL (a mirror, or file:// in the tests)
DIR_ENV = "DD_XSTEST_DIR"
# Paths as in the repository, with the sha256 of each file at XSTEST_COMMIT.
XSTEST_FILES: dict[str, str] = {
    "xstest_prompts.csv":
        "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
    "model_completions/xstest_v2_completions_gpt4.csv":
        "71af323af8ecdec0efae23992317721441d2cfedddedeef3248f842f4e15c9ca",
    "model_completions/xstest_v2_completions_llama2new.csv":
        "6365cc55ce0a593c7ab8785853d02784be027d97199d4077912b4313cd010099",
    "model_completions/xstest_v2_completions_llama2orig.csv":
        "cbc52550e8ba8197a3e3d97a5af078d27bae4766737cd62df80270126a87ffc6",
    "model_completions/xstest_v2_completions_mistralguard.csv":
        "0ac03817b65e019a8f5b4b3eed805086f9f7fafe538ac9ebd156f80210af6903",
    "model_completions/xstest_v2_completions_mistralinstruct.csv":
        "6a146b65a5b96ec8249729bc2db459697175125998d7cbbcc88f7688ecf31dad",
}
SOURCE_FILE = "SOURCE.json"
MAX_BYTES = 5_000_000  # each file is under 1 MB; a larger answer is not XSTest


class ChecksumError(ValueError):
    """A downloaded file is not the pinned XSTest file (nothing was installed)."""


def fetched_dir() -> Path:
    """Where ``make xstest`` puts the files: ``<course cache>/xstest``."""
    return cache_dir() / "xstest"


def sibling_dir() -> Path:
    """The course authors' copy beside the repository (``../shared/external/xstest``)."""
    return repo_root().parent / "shared" / "external" / "xstest"


def xstest_dir() -> Path:
    """The XSTest folder lesson 07 reads: ``$DD_XSTEST_DIR``, else the fetched copy in the
    course cache, else ``../shared/external/xstest`` when it exists, else the cache folder
    (where ``make xstest`` would put it)."""
    if env := os.environ.get(DIR_ENV):
        return Path(env)
    fetched = fetched_dir()
    if (fetched / "xstest_prompts.csv").exists() or not (sibling_dir() / "xstest_prompts.csv"
                                                         ).exists():
        return fetched
    return sibling_dir()


def how_to_get() -> str:
    """One line: how a learner gets the files."""
    return (f"run `make xstest` (downloads {len(XSTEST_FILES)} CSV files from "
            f"github.com/{XSTEST_REPO}) or set {DIR_ENV} to a folder holding "
            "xstest_prompts.csv and model_completions/")


def verify(path: str | os.PathLike, files: dict[str, str] | None = None) -> list[str]:
    """Problems of the copy at ``path`` against the pinned sha256s (empty: all good)."""
    root = Path(path)
    problems = []
    for rel, digest in (files or XSTEST_FILES).items():
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif (got := sha256_file(f)) != digest:
            problems.append(f"{rel} has sha256 {got[:12]}..., expected {digest[:12]}...")
    return problems


def _download(url: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
            size = 0
            while chunk := resp.read(1 << 16):
                size += len(chunk)
                if size > MAX_BYTES:
                    raise ChecksumError(f"{url} is larger than {MAX_BYTES} bytes: not XSTest")
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(
            f"could not download {url}: {exc}. Check the network (a proxy: set HTTPS_PROXY), "
            f"or copy the files by hand and set {DIR_ENV}") from exc


def fetch(dest: str | os.PathLike | None = None, *, base_url: str | None = None,
          files: dict[str, str] | None = None, force: bool = False,
          timeout: float = 60.0) -> Path:
    """Download the pinned XSTest files into ``dest`` (default :func:`fetched_dir`).

    Every file goes to a temporary folder beside ``dest`` and is checked against its sha256;
    only when all match is the folder renamed into place (with ``SOURCE.json``: URL, commit,
    sha256s). A mismatch raises :class:`ChecksumError` naming the file, and ``dest`` is left as
    it was. An already verified copy is kept unless ``force``.
    """
    files = files or XSTEST_FILES
    dest = Path(dest) if dest is not None else fetched_dir()
    base = base_url or os.environ.get(URL_ENV) or XSTEST_URL
    base = base if base.endswith("/") else base + "/"
    if not force and dest.is_dir() and not verify(dest, files):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for rel, digest in files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _download(base + rel, target, timeout)
            got = sha256_file(target)
            if got != digest:
                raise ChecksumError(
                    f"{base + rel}: sha256 {got} differs from the pinned {digest}. This is not "
                    f"XSTest at commit {XSTEST_COMMIT[:7]} (a changed mirror, a proxy's error "
                    "page, or a damaged download): nothing was installed. Retry, or fetch the "
                    f"files by hand from github.com/{XSTEST_REPO} and set {DIR_ENV}.")
        atomic_write_json(tmp / SOURCE_FILE, {
            "repository": f"https://github.com/{XSTEST_REPO}", "commit": XSTEST_COMMIT,
            "base_url": base, "sha256": files,
            "licence": "prompts CC BY 4.0; completions under their models' licences"})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.xstest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("fetch", "verify", "where"))
    parser.add_argument("--dest", type=Path, default=None,
                        help="folder to fetch into (default: <course cache>/xstest)")
    parser.add_argument("--url", default=None, help=f"base URL (default {XSTEST_URL})")
    parser.add_argument("--force", action="store_true", help="download even if verified")
    args = parser.parse_args(argv)
    if args.command == "where":
        print(xstest_dir())
        return 0
    if args.command == "verify":
        where = args.dest or xstest_dir()
        problems = verify(where)
        if problems:
            print(f"XSTest at {where}: " + "; ".join(problems) + f". Fix: {how_to_get()}",
                  file=sys.stderr)
            return 1
        print(f"XSTest at {where}: all {len(XSTEST_FILES)} files match the pinned sha256s")
        return 0
    try:
        path = fetch(args.dest, base_url=args.url, force=args.force)
    except (ChecksumError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"XSTest ({XSTEST_REPO}@{XSTEST_COMMIT[:7]}) verified in {path}")
    if os.environ.get(DIR_ENV) and Path(os.environ[DIR_ENV]) != path:
        print(f"note: {DIR_ENV}={os.environ[DIR_ENV]} is set, and lesson 07 reads that instead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
