"""Atomic directories and checkpoints.

A checkpoint is a directory `step-000050/` that is complete only when its `COMPLETE` marker names its step.
It is built in a temporary sibling directory, every file fsynced, the marker written last, and renamed into
place: a reader sees either no checkpoint or a whole one. A torn or corrupt one (no or wrong marker, or a file
that fails to load) is skipped in favour of the one before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_dir(final: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool] | None = None
               ) -> Path:
    """Run build(tmp) in a temporary sibling and rename it to `final`; skip if `final` is already complete."""
    final = Path(final)
    complete = is_complete or (lambda p: p.exists())
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        build(tmp)
        _fsync_tree(tmp)
        if complete(final):  # another process finished the same work first
            shutil.rmtree(tmp)
        else:
            if final.exists():  # an incomplete leftover from a crash
                shutil.rmtree(final)
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def save(root: Path, step: int, write: Callable[[Path], None], keep: int | None = None,
         mirror: str | None = None) -> Path:
    """Write checkpoint `step` under root via write(tmp_dir), mark it complete, then prune to the last `keep`;
    with `mirror` (the stage's checkpoint URI in S3), upload it there too before returning."""

    def build(tmp: Path) -> None:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps({"step": step}))

    path = atomic_dir(step_dir(root, step), build, is_complete=lambda p: marked_step(p) == step)
    if keep:
        for old in list_complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if mirror:
        publish(path, mirror, keep)
    return path


def marked_step(path: Path) -> int | None:
    try:
        return int(json.loads((Path(path) / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_complete(root: Path) -> list[Path]:
    """Checkpoints whose marker matches their directory name, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            if marked_step(child) == int(m.group(1)):
                found.append((int(m.group(1)), child))
            else:
                warnings.warn(f"skipping incomplete checkpoint {child} (no valid {MARKER} marker)", stacklevel=2)
    return [p for _, p in sorted(found)]


def latest_valid(root: Path, load: Callable[[Path], object]) -> tuple[Path, object] | None:
    """The newest checkpoint that `load` accepts; corrupt ones are skipped with a warning."""
    for path in reversed(list_complete(root)):
        try:
            return path, load(path)
        except Exception as err:  # a truncated or corrupted file: fall back to the previous checkpoint
            warnings.warn(f"skipping corrupt checkpoint {path}: {type(err).__name__}: {err}", stacklevel=2)
    return None


# ------------------------------------------------------------------ checkpoints in S3
# On a cluster a checkpoint on the pod's disk dies with the pod. Each one is mirrored to the stage's storage as it
# is written: its files first, the COMPLETE marker object last, so a torn upload is never chosen; a retried or
# resumed task on a fresh machine downloads the newest complete one before the stage starts.

_ANY_CKPT_DIR = re.compile(r"^(?:step|checkpoint)-(\d+)$")  # ours (ppo, rest) and the HF Trainer's


def publish(checkpoint: Path, remote_root: str, keep: int | None = None) -> str:
    """Upload a finished local checkpoint (`step-N` or `checkpoint-N`) to `remote_root/<name>/`, marker last;
    then delete remote checkpoints older than the newest `keep` (their marker first)."""
    from rlhf_lib import storage

    checkpoint = Path(checkpoint)
    step = int(_ANY_CKPT_DIR.match(checkpoint.name).group(1))
    if marked_step(checkpoint) != step:  # HF checkpoints have no marker of their own: complete once saved
        (checkpoint / MARKER).write_text(json.dumps({"step": step}))
    target = storage.join(remote_root, checkpoint.name)
    storage.upload_dir(checkpoint, target, last=(MARKER,))
    print(f"[checkpoints] step {step} stored at {target}", flush=True)
    if keep:
        for _, name in remote_complete(remote_root)[:-keep]:
            old = storage.join(remote_root, name)
            files = storage.list_files(old)
            storage.delete(old, [MARKER] + [f for f in files if f != MARKER])
    return target


def remote_complete(remote_root: str) -> list[tuple[int, str]]:
    """(step, name) of the checkpoints under `remote_root` whose marker names their step, oldest first."""
    from rlhf_lib import storage

    found = []
    marked = {f.rsplit("/", 1)[0] for f in storage.list_files(remote_root) if f.endswith("/" + MARKER)}
    for name in storage.list_dirs(remote_root):
        m = _ANY_CKPT_DIR.match(name)
        if not m:
            continue
        try:
            step = int(json.loads(storage.read_text(storage.join(remote_root, name, MARKER)))["step"]) \
                if name in marked else None
        except (ValueError, KeyError, TypeError):
            step = None
        if step == int(m.group(1)):
            found.append((step, name))
        else:
            warnings.warn(f"skipping incomplete checkpoint {storage.join(remote_root, name)} (no valid {MARKER})",
                          stacklevel=2)
    return sorted(found)


def fetch_latest(remote_root: str, local_root: Path) -> Path | None:
    """Download the newest complete checkpoint under `remote_root` into `local_root/<name>` (unless a complete copy
    is there already); None when there is none."""
    from rlhf_lib import storage

    done = remote_complete(remote_root)
    if not done:
        return None
    step, name = done[-1]
    local = Path(local_root) / name
    if marked_step(local) != step:
        storage.download_dir(storage.join(remote_root, name), local)
    return local
