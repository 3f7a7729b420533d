"""Installs the project into the active Python environment, with the torch build this machine can use.

    python -m rlhf_lib.install            # what `python flows/rlhf_flow.py run` needs
    python -m rlhf_lib.install --dev      # and what the tests need (requirements-dev.txt)
    python -m rlhf_lib.install --torch cu128   # a CUDA build from PyTorch's index (or --torch cpu, --torch pypi)
    python -m rlhf_lib.install --dry-run  # print the pip commands, run nothing

Why it exists: the `torch==2.13.0` PyPI serves on Linux is the CUDA build (several GB of NVIDIA libraries), which a
machine without a GPU never uses; PyTorch's CPU index has the same version at about 190 MB. pip cannot choose
between them from a requirements file, so this does: on Linux without an NVIDIA driver it installs torch from the
CPU index first (falling back to your configured index, with a warning, when that index cannot be reached); with a
driver, and on macOS (where PyPI's wheel is the CPU/MPS build), it installs PyPI's. The rest comes from
requirements.txt, whose `torch==` pin the installed build then satisfies. Standard library only: it runs before
anything is installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_INDEX = "https://download.pytorch.org/whl/{build}"


def torch_pin(requirements: Path = ROOT / "requirements.txt") -> str:
    """The `torch==X` line of requirements.txt: the one place the version is written."""
    for line in requirements.read_text().splitlines():
        if line.strip().startswith("torch=="):
            return line.strip()
    raise SystemExit(f"{requirements} pins no torch version (a line `torch==X.Y.Z`)")


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is loaded (the kernel module's version file) or nvidia-smi lists a GPU."""
    if Path("/proc/driver/nvidia/version").exists():
        return True
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            return out.returncode == 0 and "GPU" in out.stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
    return False


def torch_build(system: str, gpu: bool) -> str:
    """Which torch to install: "cpu" (PyTorch's CPU index) on Linux without a GPU, else "pypi"."""
    return "cpu" if system == "Linux" and not gpu else "pypi"


def commands(build: str, pin: str, dev: bool) -> list[list[str]]:
    """The pip commands, in order: torch (from the index its build lives on), then the requirements."""
    pip = [sys.executable, "-m", "pip", "install"]
    torch = [*pip, pin] if build == "pypi" else [*pip, pin, "--index-url", TORCH_INDEX.format(build=build),
                                                  "--retries", "1", "--timeout", "30"]
    requirements = ROOT / ("requirements-dev.txt" if dev else "requirements.txt")
    return [torch, [*pip, "-r", str(requirements)]]


def _run(command: list[str]) -> int:
    print("+ " + " ".join(command), flush=True)
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", action="store_true", help="also the test dependencies (requirements-dev.txt)")
    parser.add_argument("--torch", metavar="BUILD",
                        help="cpu, pypi, or a CUDA build on PyTorch's index (cu126, cu128...): default, detected")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")
    args = parser.parse_args(argv)
    if sys.prefix == sys.base_prefix and not os.environ.get("CONDA_PREFIX"):
        print("[install] note: no virtual environment is active; installing into "
              f"{sys.prefix} (python3 -m venv .venv && . .venv/bin/activate first to keep it apart)", flush=True)
    gpu = has_nvidia_gpu()
    build = args.torch or torch_build(platform.system(), gpu)
    pin = torch_pin()
    print(f"[install] {platform.system()} {platform.machine()}, NVIDIA GPU: {'yes' if gpu else 'no'}; "
          f"torch: {pin} from {'PyPI' if build == 'pypi' else TORCH_INDEX.format(build=build)}", flush=True)
    torch_cmd, requirements_cmd = commands(build, pin, args.dev)
    if args.dry_run:
        for command in (torch_cmd, requirements_cmd):
            print("+ " + " ".join(command))
        return 0
    if _run(torch_cmd) != 0:
        if build == "pypi":
            return 1
        print(f"[install] warning: {TORCH_INDEX.format(build=build)} could not be used; installing {pin} from "
              "your configured index instead (on Linux that is PyPI's CUDA build unless your index has the CPU "
              "one: several GB, and it runs on the CPU all the same)", flush=True)
        if _run(commands("pypi", pin, args.dev)[0]) != 0:
            return 1
    code = _run(requirements_cmd)
    if code == 0:
        print(f"[install] done: {pin} and {Path(requirements_cmd[-1]).name} in {sys.prefix}. "
              "Next: python flows/rlhf_flow.py run", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
