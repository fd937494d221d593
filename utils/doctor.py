"""Workshop preflight: is this machine ready for the course? (``make doctor``, lesson 00).

``python -m utils.doctor`` runs every check below in well under 20 s, prints a
pass/warn/fail table and exits 1 when something fails, printing the fix. Each check is a
small function that returns :class:`CheckRow` records (what was checked, its status, what
this machine has, and the fix), so lesson 00 shows the same table as a pandas DataFrame::

    from utils.doctor import run_doctor, to_dataframe
    to_dataframe(run_doctor())

Every measurement a check needs is a keyword argument (``None``: measure it here), which is
how ``tests/test_doctor.py`` makes each check fail on purpose.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from utils.model_cache import verify_folder
from utils.paths import data_dir, repo_root
from utils.xstest import how_to_get, xstest_dir

Status = Literal["pass", "warn", "fail"]

GB = 1024**3
KERNEL_NAME = "distill-deploy"
KERNEL_DISPLAY = "Python 3 (Distill & Deploy)"
# Thresholds. The course's models are tiny; what needs memory is JupyterLab, a kernel with
# torch + transformers loaded (about 1 GB) and a second kernel when a learner opens two lessons.
RAM_FAIL_GB = 2.0
RAM_WARN_GB = 4.0
# .venv is already installed when the doctor runs; what is left is the model cache, ONNX and
# GGUF exports (tens of MB each) and pip's cache when a pin has to be fixed.
DISK_FAIL_GB = 1.0
DISK_WARN_GB = 3.0
MIN_CORES = 2  # every lesson's run time is measured on 2 cores
TRAIN_STEP_WARN_S = 5.0  # the tiny step below takes well under a second on a laptop CPU
# The tiny model of the training-step check: a 2-layer Llama of about 40k parameters.
TINY_MODEL = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                  max_position_embeddings=64)

_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class CheckRow:
    """One line of the doctor's table."""

    check: str  # what was checked, e.g. "RAM available"
    status: Status
    found: str  # what this machine has
    fix: str = ""  # what to do about it (empty when the row passes)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _pip() -> str:
    return f"{_venv_python()} -m pip install"


def _venv_python() -> str:
    return ".venv/bin/python"


# --- pyproject pins ---------------------------------------------------------------------------

def read_pyproject(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The parsed ``pyproject.toml`` of the course (tomllib, standard library)."""
    path = Path(path) if path is not None else repo_root() / "pyproject.toml"
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def read_pins(pyproject: Mapping[str, Any] | None = None, *,
              extras: Iterable[str] = ("dev",)) -> list[tuple[str, str, bool]]:
    """``(requirement, name, required)`` for every ``[project.dependencies]`` entry (required)
    and every entry of the given optional-dependency groups (not required)."""
    project = (pyproject if pyproject is not None else read_pyproject())["project"]
    pins = [(req, _req_name(req), True) for req in project.get("dependencies", [])]
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        pins += [(req, _req_name(req), False) for req in optional.get(extra, [])]
    return pins


def _req_name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- the checks -------------------------------------------------------------------------------

def check_python(version: tuple[int, int, int] | None = None,
                 requires: str | None = None) -> CheckRow:
    """Python matches ``requires-python`` of pyproject.toml (3.11)."""
    from packaging.specifiers import SpecifierSet

    version = version or tuple(sys.version_info[:3])
    requires = requires or read_pyproject()["project"].get("requires-python", "")
    found = ".".join(map(str, version))
    if not requires or SpecifierSet(requires).contains(found, prereleases=True):
        return CheckRow("Python", "pass", f"{found} ({requires or 'no requirement'})")
    return CheckRow(
        "Python", "fail", f"{found}, the course needs {requires}",
        "Install Python 3.11 (python.org, `pyenv install 3.11`, or `conda env create -f "
        "environment.yml`), then recreate the environment: `rm -rf .venv && make install "
        "PYTHON=/path/to/python3.11`.")


def check_packages(pins: list[tuple[str, str, bool]] | None = None,
                   version_of: Callable[[str], str | None] = _installed_version
                   ) -> list[CheckRow]:
    """Every pinned package is installed at its pinned version (one row per package).

    A wrong core pin fails; a wrong dev tool (pytest, nbval, ruff) only warns.
    """
    from packaging.requirements import Requirement

    rows = []
    for requirement, name, required in pins if pins is not None else read_pins():
        spec = Requirement(requirement).specifier
        installed = version_of(name)
        label = f"package {name}"
        bad = "fail" if required else "warn"
        install = f'{_pip()} "{requirement}"'
        if name == "torch":  # the CPU wheel: the default one pulls several GB of CUDA libraries
            install += " --index-url https://download.pytorch.org/whl/cpu"
        if installed is None:
            rows.append(CheckRow(label, bad, f"not installed (pinned {spec})",
                                 f"`{install}` (or `make install` on a fresh checkout)."))
        elif not spec.contains(installed, prereleases=True):
            rows.append(CheckRow(label, bad, f"{installed}, pinned {spec}",
                                 f"`{install}`: the course is tested on exactly this version."))
        else:
            rows.append(CheckRow(label, "pass", installed))
    return rows


def check_torch_build(cuda_version: str | None = None,
                      cuda_available: bool | None = None) -> CheckRow:
    """A CUDA build of torch without a GPU is several GB for nothing (pip's default wheel).

    ``cuda_available=None`` measures both values from the installed torch.
    """
    if cuda_available is None:
        import torch

        cuda_version, cuda_available = torch.version.cuda, torch.cuda.is_available()
    if cuda_version and not cuda_available:
        return CheckRow(
            "torch build", "warn", f"CUDA {cuda_version} build, but no GPU is usable",
            "It works, but it is a multi-GB install. For the CPU wheel: "
            f"`{_pip()} --force-reinstall torch==2.13.0 --index-url "
            "https://download.pytorch.org/whl/cpu`.")
    if cuda_version:
        return CheckRow("torch build", "pass", f"CUDA {cuda_version} build, GPU available")
    return CheckRow("torch build", "pass", "CPU build")


def check_cores(count: int | None = None) -> CheckRow:
    """At least the 2 cores the lessons are timed on."""
    count = count if count is not None else (os.cpu_count() or 1)
    if count < MIN_CORES:
        return CheckRow("CPU cores", "warn", f"{count} (lessons are timed on {MIN_CORES})",
                        "The lessons run, about twice as slowly as their headers say. Close "
                        "other heavy programs; use a machine with 2+ cores if you can.")
    return CheckRow("CPU cores", "pass", str(count))


def _available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with ipykernel
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_ram(available: int | None = None) -> CheckRow:
    """Free memory (bytes available without swapping)."""
    available = available if available is not None else _available_ram()
    gb = available / GB
    found = f"{gb:.1f} GB available"
    fix = ("Close browser tabs and other programs; in JupyterLab shut down kernels you are not "
           "using (Kernel > Shut Down All Kernels) and open one lesson at a time.")
    if gb < RAM_FAIL_GB:
        return CheckRow("RAM available", "fail", f"{found}, needs {RAM_FAIL_GB:.0f} GB", fix)
    if gb < RAM_WARN_GB:
        return CheckRow("RAM available", "warn", f"{found}, {RAM_WARN_GB:.0f} GB is comfortable",
                        fix)
    return CheckRow("RAM available", "pass", found)


def check_disk(free: int | None = None, path: str | os.PathLike | None = None) -> CheckRow:
    """Free disk space where the repository (and its model cache) lives."""
    path = Path(path) if path is not None else repo_root()
    free = free if free is not None else shutil.disk_usage(path).free
    gb = free / GB
    found = f"{gb:.1f} GB free"
    fix = ("Free some space: `make clean` removes the course's caches, `pip cache purge` pip's; "
           "empty the trash and old downloads.")
    if gb < DISK_FAIL_GB:
        return CheckRow("disk free", "fail", f"{found}, needs {DISK_FAIL_GB:.0f} GB", fix)
    if gb < DISK_WARN_GB:
        return CheckRow("disk free", "warn", f"{found}, {DISK_WARN_GB:.0f} GB is comfortable", fix)
    return CheckRow("disk free", "pass", found)


def check_threads(threads: int | None = None, cores: int | None = None) -> CheckRow:
    """torch's intra-op threads: more than the cores oversubscribes, 1 wastes a core."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    cores = cores if cores is not None else (os.cpu_count() or 1)
    found = f"{threads} threads on {cores} cores"
    if threads > cores:
        return CheckRow("torch threads", "warn", f"{found} (oversubscribed)",
                        f"`export OMP_NUM_THREADS={cores}` before `make lab`, or call "
                        f"`torch.set_num_threads({cores})` in the setup cell.")
    if threads < min(MIN_CORES, cores):
        return CheckRow("torch threads", "warn", f"{found} (a core sits idle)",
                        "Unset OMP_NUM_THREADS / MKL_NUM_THREADS, or call "
                        f"`torch.set_num_threads({min(MIN_CORES, cores)})`.")
    return CheckRow("torch threads", "pass", found)


def tiny_training_step(seed: int = 0) -> dict[str, float]:
    """One forward/backward/update step of a tiny course model; returns its numbers."""
    import torch

    from utils.models import ModelConfig, build_model, count_parameters

    model = build_model(ModelConfig(**TINY_MODEL), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, TINY_MODEL["vocab_size"], (4, 32), generator=generator)  # (B, T)
    start = time.perf_counter()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()
                              if p.grad is not None))
    optimizer.step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "loss": loss.item(), "grad_norm": grad_norm,
            "parameters": count_parameters(model)}


def check_training_step(step: Callable[[], Mapping[str, float]] | None = None,
                        max_seconds: float = TRAIN_STEP_WARN_S) -> CheckRow:
    """A tiny model from ``utils.models`` trains one step: finite loss, non-zero gradient."""
    label = "tiny training step"
    fix_broken = (f'Reinstall the pinned stack: `{_pip()} --force-reinstall "torch==2.13.0" '
                  '--index-url https://download.pytorch.org/whl/cpu` then '
                  f'`{_pip()} -e ".[dev]"`.')
    try:
        out = (step or tiny_training_step)()
    except Exception as exc:  # noqa: BLE001 - reported as a failed row, never a traceback
        return CheckRow(label, "fail", f"crashed: {type(exc).__name__}: {exc}", fix_broken)
    found = (f"{out['seconds'] * 1000:.0f} ms for forward+backward+AdamW on a "
             f"{int(out['parameters']):,}-parameter Llama, loss {out['loss']:.2f}")
    if not (math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
            and out["grad_norm"] > 0):
        return CheckRow(label, "fail", f"{found}; gradient norm {out['grad_norm']}", fix_broken)
    if out["seconds"] > max_seconds:
        return CheckRow(label, "warn", f"{found} (slower than {max_seconds:.0f} s)",
                        "Something else is using the CPU: close it (check `top`), and make sure "
                        "the laptop is plugged in and not in power-saving mode.")
    return CheckRow(label, "pass", found)


def check_offline(env: Mapping[str, str] | None = None) -> CheckRow:
    """``HF_HUB_OFFLINE=1``: nothing in the course may reach for the Hugging Face Hub."""
    env = os.environ if env is None else env
    value = env.get("HF_HUB_OFFLINE")
    if value is not None and value.strip().lower() in _TRUE:
        return CheckRow("offline mode", "pass", f"HF_HUB_OFFLINE={value}")
    return CheckRow("offline mode", "warn", f"HF_HUB_OFFLINE={value or '(unset)'}",
                    "Start the course with `make lab` (it exports HF_HUB_OFFLINE=1), or "
                    "`export HF_HUB_OFFLINE=1` in the shell that starts Jupyter.")


def check_kernel(name: str = KERNEL_NAME, manager: Any | None = None,
                 python: str | None = None, prefix: str | None = None) -> CheckRow:
    """The Jupyter kernel the lessons ask for is installed inside this environment and runs it.

    ``make install`` registers it with ``--sys-prefix`` (``<prefix>/share/jupyter/kernels``):
    a per-user registration (``~/.local/share/jupyter``) is shared by every clone and points at
    whichever one ran setup last.
    """
    install = (f'`{_venv_python()} -m ipykernel install --sys-prefix --name {name} '
               f'--display-name "{KERNEL_DISPLAY}"` (what `make install` runs), then reload '
               "JupyterLab.")
    if manager is None:
        from jupyter_client.kernelspec import KernelSpecManager

        manager = KernelSpecManager()
    specs = manager.find_kernel_specs()
    if name not in specs:
        return CheckRow("Jupyter kernel", "fail", f"{name!r} not installed "
                        f"(found: {', '.join(sorted(specs)) or 'none'})", install)
    spec = manager.get_kernel_spec(name)
    argv = spec.argv
    kernel_python = argv[0] if argv else ""
    if kernel_python and not os.path.isabs(kernel_python):  # e.g. "python": found on PATH
        kernel_python = shutil.which(kernel_python) or kernel_python
    kernel_python = os.path.abspath(kernel_python) if kernel_python else "(no argv)"
    python = os.path.abspath(python or sys.executable)
    if kernel_python != python:
        return CheckRow("Jupyter kernel", "warn",
                        f"{name!r} runs {kernel_python}, not this environment's {python}",
                        f"Register it inside this environment: {install}")
    where = getattr(spec, "resource_dir", None) or specs.get(name)
    prefix = os.path.realpath(prefix or sys.prefix)
    if where and not os.path.realpath(where).startswith(prefix + os.sep):
        return CheckRow("Jupyter kernel", "warn",
                        f"{name!r} is registered per user ({where}), shared by every clone",
                        f"Register it inside this environment: {install} The per-user copy can "
                        f"then be deleted: `rm -r {where}`.")
    return CheckRow("Jupyter kernel", "pass", f"{name!r} -> {kernel_python}")


def check_device() -> CheckRow:
    """Which device the lessons will use (``utils.device.pick_device``)."""
    from utils.device import describe_device, pick_device

    try:
        device = pick_device()
    except RuntimeError as exc:
        return CheckRow("device", "fail", str(exc), "Unset DD_DEVICE or set it to `cpu`.")
    return CheckRow("device", "pass", describe_device(device))


def _dir_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _safetensors_problem(path: Path) -> str | None:
    """None when the file's header reads; else what is wrong (without loading tensors)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 100_000_000 or n + 8 > path.stat().st_size:
                return f"{path.name}: header length {n} does not fit the file"
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if 8 + n + end != path.stat().st_size:
            return f"{path.name}: truncated ({path.stat().st_size} bytes, expected {8 + n + end})"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path.name}: unreadable ({exc})"
    return None


def check_data(root: str | os.PathLike | None = None,
               external: str | os.PathLike | None = None) -> list[CheckRow]:
    """The course data that exists in this checkout is present and readable.

    ``data/world/`` (``make data``), the shipped teacher ``data/models/teacher/``
    (``make teacher``) and the optional XSTest files (:func:`utils.xstest.xstest_dir`).
    """
    data = Path(root) if root is not None else data_dir()
    rows = []
    world = data / "world"
    if world.is_dir() and any(world.iterdir()):
        n, size = _dir_size(world)
        rows.append(CheckRow("course data", "pass", f"data/world: {n} files, {size / 1e6:.1f} MB"))
    else:
        rows.append(CheckRow("course data", "warn", "data/world/ is missing or empty",
                             "`make data` regenerates it (deterministic), or restore the "
                             "checkout: `git checkout -- data/`."))
    teacher = data / "models" / "teacher"
    weights = sorted(teacher.glob("*.safetensors")) if teacher.is_dir() else []
    if not weights or not (teacher / "config.json").exists():
        rows.append(CheckRow("teacher model", "warn", "data/models/teacher/ not present",
                             "Lessons 02+ need it: restore the checkout (`git checkout -- "
                             "data/models`) or build it with `make teacher` (slow)."))
    else:
        problems = [p for w in weights if (p := _safetensors_problem(w))]
        if not problems and (mismatch := verify_folder(teacher)) is not None:
            problems.append(f"the teacher is {mismatch}")  # its sha256 manifest
        n, size = _dir_size(teacher)
        if problems:
            rows.append(CheckRow("teacher model", "fail", "; ".join(problems),
                                 "The file is damaged: `git checkout -- data/models` restores "
                                 "it (or `make teacher` rebuilds it)."))
        else:
            rows.append(CheckRow("teacher model", "pass",
                                 f"data/models/teacher: {n} files, {size / 1e6:.1f} MB"))
    xstest = Path(external) if external is not None else xstest_dir()
    if xstest.is_dir() and any(xstest.iterdir()):
        rows.append(CheckRow("XSTest (optional)", "pass", str(xstest)))
    else:
        rows.append(CheckRow("XSTest (optional)", "pass",
                             "not present; lesson 07 skips only its judge calibration ("
                             + how_to_get() + ")"))
    return rows


# --- running and showing ----------------------------------------------------------------------

CHECKS: tuple[Callable[[], CheckRow | list[CheckRow]], ...] = (
    check_python, check_packages, check_torch_build, check_cores, check_ram, check_disk,
    check_threads, check_device, check_training_step, check_offline, check_kernel, check_data,
)


def run_doctor(checks: Iterable[Callable[[], CheckRow | list[CheckRow]]] | None = None
               ) -> list[CheckRow]:
    """Run every check; a check that crashes becomes a failed row, never an exception."""
    rows: list[CheckRow] = []
    for check in CHECKS if checks is None else checks:
        try:
            out = check()
        except Exception as exc:  # noqa: BLE001 - the doctor must always print its table
            name = check.__name__.removeprefix("check_").replace("_", " ")
            out = CheckRow(name, "fail", f"the check crashed: {type(exc).__name__}: {exc}",
                           "Reinstall the pinned stack (`make install`) and run "
                           "`make doctor` again; report the message if it persists.")
        rows += out if isinstance(out, list) else [out]
    return rows


def to_dataframe(rows: list[CheckRow]):
    """The rows as a pandas DataFrame (what lesson 00 displays)."""
    import pandas as pd

    return pd.DataFrame([r.as_dict() for r in rows], columns=["check", "status", "found", "fix"])


def render_table(rows: list[CheckRow]) -> str:
    """A plain-text table (status, check, found), then the fixes of rows that did not pass."""
    width = max((len(r.check) for r in rows), default=5)
    lines = [f"{'':4}  {'check':<{width}}  found", f"{'-' * 4}  {'-' * width}  {'-' * 5}"]
    lines += [f"{_MARK[r.status]}  {r.check:<{width}}  {r.found}" for r in rows]
    todo = [r for r in rows if r.status != "pass"]
    if todo:
        lines += ["", "To fix:"]
        lines += [f"  [{_MARK[r.status]}] {r.check}: {r.fix}" for r in todo]
    return "\n".join(lines)


def verdict(rows: list[CheckRow]) -> str:
    """One line: counts per status and whether the machine is ready."""
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "warn", "fail")}
    text = f"{counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail"
    if counts["fail"]:
        return f"{text}: NOT READY, fix the FAIL rows above and run `make doctor` again."
    if counts["warn"]:
        return f"{text}: ready (the WARN rows are worth fixing)."
    return f"{text}: ready."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    from utils.quiet import silence_library_noise

    silence_library_noise()  # before transformers/torchao are imported by the checks
    start = time.perf_counter()
    rows = run_doctor()
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(f"Distill & Deploy doctor: {platform.system()} {platform.machine()}, "
              f"Python {platform.python_version()}")
        print(render_table(rows))
        print(f"\n{verdict(rows)} ({seconds:.1f} s)")
    return 1 if any(r.status == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
