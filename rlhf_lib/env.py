"""Process environment the project needs before Metaflow, W&B or the HF hub are imported.

Metaflow only reads a project's `.metaflowconfig/` when `METAFLOW_HOME` points at it, refuses to run without a
user name, and finds its local datastore by walking up from the current directory. The flow, the tests and the
notebook all call `configure()` first, so they see one datastore wherever they are started from.

The user's own Metaflow configuration wins: the project's `.metaflowconfig/` (local datastore and metadata) is
used only when there is none — no `METAFLOW_HOME`, no `METAFLOW_PROFILE`, no `~/.metaflowconfig/config*.json`,
no `METAFLOW_DEFAULT_DATASTORE` — so a deployment's S3 datastore, Kubernetes namespace and image are never
silently ignored. `metaflow_config_source()` says which one this process uses (`start` prints it).
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
METAFLOW_HOME = PROJECT_ROOT / ".metaflowconfig"


def _metaflow_can_name_user() -> bool:
    # Metaflow takes METAFLOW_USER, SUDO_USER, USERNAME or USER, and refuses "root" from any of them.
    names = [os.environ.get(v) for v in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")]
    return any(n and n != "root" for n in names)


def _fallback_user() -> str:
    try:
        name = getpass.getuser()
    except Exception:  # no passwd entry (containers, CI)
        name = ""
    return name if name and name != "root" else "rlhf"


CONFIG_SOURCE_VAR = "RLHF_METAFLOW_CONFIG"  # the decision, kept for child processes (which see METAFLOW_HOME set)


def _users_metaflow_config() -> str | None:
    """Where the user's own Metaflow configuration comes from, or None when they have none."""
    if os.environ.get("METAFLOW_HOME"):
        return f"METAFLOW_HOME={os.environ['METAFLOW_HOME']}"
    if os.environ.get("METAFLOW_PROFILE"):
        return f"METAFLOW_PROFILE={os.environ['METAFLOW_PROFILE']} (~/.metaflowconfig)"
    home = Path("~/.metaflowconfig").expanduser()
    found = sorted(home.glob("config*.json")) if home.is_dir() else []
    if found:
        return str(found[0])
    if os.environ.get("METAFLOW_DEFAULT_DATASTORE"):
        return f"METAFLOW_DEFAULT_DATASTORE={os.environ['METAFLOW_DEFAULT_DATASTORE']} in the environment"
    return None


def metaflow_config_source() -> str:
    """Which Metaflow configuration this process runs with, in words."""
    configure()
    return os.environ[CONFIG_SOURCE_VAR]


def configure() -> None:
    """Set the environment defaults the project relies on; values the user exported (or configured) win."""
    if CONFIG_SOURCE_VAR not in os.environ:
        users = _users_metaflow_config()
        if users is None:
            os.environ["METAFLOW_HOME"] = str(METAFLOW_HOME)
            # Absolute, so `.metaflow/` is the repo's one whatever the working directory (a notebook runs in
            # notebooks/).
            os.environ.setdefault("METAFLOW_DATASTORE_SYSROOT_LOCAL", str(PROJECT_ROOT))
        os.environ[CONFIG_SOURCE_VAR] = f"yours: {users}" if users else \
            f"the project's default: {METAFLOW_HOME} (local datastore and metadata)"
    if not _metaflow_can_name_user():  # e.g. CI containers: no USER, or root
        os.environ["METAFLOW_USER"] = _fallback_user()
    # W&B blocks on a login prompt when it has neither a key nor a mode; offline is the project's default.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    # Tokenizers' thread pool warns (and can deadlock) when a process forks after using it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    interpreter_first_on_path()
    for var, workers in local_workers(sys.argv, os.cpu_count() or 1).items():
        os.environ.setdefault(var, str(workers))


METAFLOW_DEFAULT_WORKERS = 16  # `run --max-workers`' default
# Decorators (`--with X`) and commands that put the steps on another machine.
REMOTE_DECORATORS = ("kubernetes", "batch")
REMOTE_COMMANDS = ("argo-workflows", "step-functions", "airflow", "kubernetes", "batch")


def runs_remote(argv: list[str] | None = None, environ: dict | None = None) -> bool:
    """Whether this command puts steps on remote compute: `--with kubernetes`/`--with batch` (on the command line,
    in METAFLOW_DECOSPECS, or in METAFLOW_DEFAULT_DECOSPECS, which Metaflow adds to every run's `--with`), or a
    command that compiles for an orchestrator or runs inside a pod."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    decospecs = [a for i, a in enumerate(argv) if i and argv[i - 1] == "--with"]
    decospecs += [a.split("=", 1)[1] for a in argv if a.startswith("--with=")]
    decospecs += environ.get("METAFLOW_DECOSPECS", "").split() + environ.get("METAFLOW_DEFAULT_DECOSPECS", "").split()
    if any(spec.split(":")[0] in REMOTE_DECORATORS for spec in decospecs):
        return True
    return any(a in REMOTE_COMMANDS for a in argv[1:])


def local_workers(argv: list[str], cores: int) -> dict[str, int]:
    """Metaflow runs up to 16 tasks side by side; on a machine with fewer cores a compare run's six method stages
    at once oversubscribe them (the test profile's six methods on 2 cores: 190 s, 148 s with two workers — each
    stage's torch threads are the cores free when it starts, rlhf_lib/cpu.py). A local `run` or `resume` takes at
    most one task per core: Metaflow reads these variables as `--max-workers`' default, so the option, or the
    variable exported, wins. A command that puts steps on a cluster (`runs_remote`) is left alone: there each task
    has a machine of its own."""
    if cores >= METAFLOW_DEFAULT_WORKERS or runs_remote(argv):
        return {}
    return {"METAFLOW_RUN_MAX_WORKERS": cores, "METAFLOW_RESUME_MAX_WORKERS": cores}


def interpreter_first_on_path() -> None:
    """This interpreter's directory first on PATH. Metaflow starts some processes as a bare `python` from PATH —
    the other nodes of a local `@parallel` gang among them — so a flow run by a virtual environment's python that
    was never activated (IDEs, cron, CI scripts) would start them with whatever `python` PATH finds first, one
    without the project's packages: the node dies at once and its gang waits for it."""
    here = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if here and parts[:1] != [here] and os.path.exists(os.path.join(here, "python")):
        os.environ["PATH"] = os.pathsep.join([here, *(p for p in parts if p and p != here)])
