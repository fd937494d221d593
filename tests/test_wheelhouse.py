"""`make wheelhouse`: wheels that install with ``--no-index`` on a machine without internet.

The target is run for a small set (two pure-Python packages of the pinned stack, plus the
build backend) instead of the multi-GB stack; the wheels then go into a fresh venv with pip's
configuration switched off and ``--no-index``, and the course package itself is built there,
editable, from a copy of its sources. Filling the wheelhouse needs the package index
(**network**, or a local mirror): the test skips, saying so, when the index cannot be reached.
The installs themselves never touch the network. About 30-50 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.paths import repo_root

SMALL = "tqdm==4.70.1 idna"  # pure Python; tqdm is one of the course's own pins


def _offline_env(wheelhouse: Path) -> dict[str, str]:
    """pip sees nothing but the wheelhouse: no config files, no index, no other find-links."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
                "PIP_FIND_LINKS": str(wheelhouse), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return env


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def small_wheelhouse(tmp_path_factory):
    if shutil.which("make") is None:
        pytest.skip("`make` is not installed")
    wh = tmp_path_factory.mktemp("wh") / "wheelhouse"
    proc = _run(["make", "-s", "-C", str(repo_root()), "wheelhouse", f"WHEELHOUSE={wh}",
                 f"WHEELHOUSE_REQS={SMALL}"])
    if proc.returncode != 0:
        log = (wh / "pip.log").read_text() if (wh / "pip.log").exists() else ""
        if any(s in log for s in ("NewConnectionError", "Temporary failure in name resolution",
                                  "No matching distribution found", "Network is unreachable")):
            pytest.skip("needs the package index (network) to fill the wheelhouse; pip said: "
                        + next((ln for ln in log.splitlines() if "ERROR" in ln), log[-200:]))
        pytest.fail(f"make wheelhouse failed:\n{proc.stdout}\n{proc.stderr}\n{log[-3000:]}")
    return wh, proc.stdout


def test_make_wheelhouse_writes_wheels_and_exact_pins(small_wheelhouse):
    wh, out = small_wheelhouse
    assert "[4/4]" in out and "ready:" in out and "--find-links" not in out.split("ready:")[0]
    pins = [ln for ln in (wh / "requirements.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]
    names = {p.split("==")[0].lower() for p in pins}
    assert {"tqdm", "idna", "pip", "setuptools"} <= names, pins
    assert "tqdm==4.70.1" in pins and all("==" in p for p in pins)
    wheels = {w.name.split("-")[0].lower() for w in wh.glob("*.whl")}
    assert names <= wheels  # every pin has its wheel
    assert not list(wh.glob("*.tar.gz"))  # wheels only: nothing to build offline


def test_wheelhouse_installs_offline_into_a_fresh_venv(small_wheelhouse, tmp_path):
    wh, _ = small_wheelhouse
    venv = tmp_path / "venv"
    proc = _run([sys.executable, "-m", "venv", str(venv)])
    assert proc.returncode == 0, proc.stderr
    py = str(venv / "bin" / "python")
    env = _offline_env(wh)
    proc = _run([py, "-m", "pip", "install", "--no-index", "--find-links", str(wh),
                 "-r", str(wh / "requirements.txt")], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the course package itself, editable (as `make install` does), built offline with the
    # wheelhouse's setuptools; its heavy dependencies are the full wheelhouse's job
    course = tmp_path / "course"
    course.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo_root() / name, course / name)
    shutil.copytree(repo_root() / "utils", course / "utils",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = _run([py, "-m", "pip", "install", "--no-index", "--find-links", str(wh),
                 "--no-deps", "-e", str(course)], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run([py, "-c", "import tqdm, idna, utils.paths; "
                           "print(tqdm.__version__, utils.paths.repo_root())"],
                env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4.70.1", str(course)]
    # and nothing else can come in: a package outside the wheelhouse is refused offline
    proc = _run([py, "-m", "pip", "install", "--no-index", "--find-links", str(wh), "six"],
                env=env)
    assert proc.returncode != 0 and "No matching distribution" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_full_wheelhouse_resolves_offline():
    """After `make wheelhouse`: the whole pinned stack resolves from wheelhouse/ alone."""
    wh = Path(os.environ.get("DD_WHEELHOUSE", repo_root() / "wheelhouse"))
    if not (wh / "requirements.txt").exists():
        pytest.skip(f"no full wheelhouse at {wh}: run `make wheelhouse` (hundreds of MB; needs the "
                    "package index), or point DD_WHEELHOUSE at one, to test it")
    proc = _run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                 "--no-index", "--find-links", str(wh), "-r", str(wh / "requirements.txt"),
                 "--python-version", "3.11.0", "--only-binary=:all:"],  # the oldest 3.11 too
                env=_offline_env(wh))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Would install" in proc.stdout and "torch-2.13.0" in proc.stdout
