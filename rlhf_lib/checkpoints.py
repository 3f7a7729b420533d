"""Checkpoints: written atomically, found in either layout, local or in S3, and fenced between task attempts.

Two layouts: ours (`step-N/`, ppo and rest) and the HF Trainer's (`checkpoint-N/`, sft, reward, dpo, grpo, rloo).
A local `step-N` is complete when its `COMPLETE` marker names its step (it is built in a temporary sibling, every
file fsynced, the marker written last, renamed into place); a local `checkpoint-N` when HF wrote its
`trainer_state.json`. In S3 both are complete when the `COMPLETE` object, uploaded after every other file, names
the step. A torn or corrupt checkpoint is skipped in favour of the one before.

Fencing. Each attempt of a task writes under its own prefix, `<stage>/attempt-<k>/` (rlhf_lib/workspace.py), and
first leaves a `STARTED` marker there. An attempt never touches another's prefix; it prunes its own old checkpoints
only while no later attempt has started (a later one may be reading them), and a checkpoint downloaded from an
earlier attempt counts only if its marker is still there once the download is done — so an attempt that is
still running after it was given up for dead (a "zombie" pod) can change nothing the new attempt reads.
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
STARTED = "STARTED"
HF_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^(?:step|checkpoint)-(\d+)$")
_ATTEMPT = re.compile(r"^attempt-(\d+)$")


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


def step_of(name: str) -> int | None:
    """The step in a checkpoint's directory name (`step-N` or `checkpoint-N`), None for anything else."""
    m = _CHECKPOINT.match(Path(str(name).rstrip("/")).name)
    return int(m.group(1)) if m else None


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def marked_step(path: Path) -> int | None:
    try:
        return int(json.loads((Path(path) / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_complete(path: Path) -> bool:
    """A local checkpoint directory that is whole: its marker names its step, or HF finished writing it."""
    path, step = Path(path), step_of(Path(path).name)
    if step is None or not path.is_dir():
        return False
    return marked_step(path) == step or (path.name.startswith("checkpoint-") and (path / HF_STATE).is_file())


def list_checkpoints(root: str | Path) -> list[tuple[int, str]]:
    """(step, location) of the complete checkpoints under a local directory or an S3 prefix, oldest first."""
    from rlhf_lib import storage

    root = str(root)
    found = []
    if not storage.is_remote(root):
        if not Path(root).is_dir():
            return []
        for child in Path(root).iterdir():
            if step_of(child.name) is None or not child.is_dir():
                continue
            if is_complete(child):
                found.append((step_of(child.name), str(child)))
            else:
                warnings.warn(f"skipping incomplete checkpoint {child} (no valid {MARKER} marker)", stacklevel=2)
        return sorted(found)
    markers = {f.rsplit("/", 1)[0] for f in storage.list_files(root) if f.endswith("/" + MARKER)}
    for name in storage.list_dirs(root):
        step = step_of(name)
        if step is None:
            continue
        where = storage.join(root, name)
        try:
            marked = int(json.loads(storage.read_text(storage.join(where, MARKER)))["step"]) if name in markers else None
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            marked = None
        if marked == step:
            found.append((step, where))
        else:
            warnings.warn(f"skipping incomplete checkpoint {where} (no valid {MARKER})", stacklevel=2)
    return sorted(found)


def latest_valid(root: Path, load: Callable[[Path], object]) -> tuple[Path, object] | None:
    """The newest local checkpoint under `root` that `load` accepts; corrupt ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            return Path(path), load(Path(path))
        except Exception as err:  # a truncated or corrupted file: fall back to the previous checkpoint
            warnings.warn(f"skipping corrupt checkpoint {path}: {type(err).__name__}: {err}", stacklevel=2)
    return None


# ------------------------------------------------------------------ attempts and fencing


def attempt_of(checkpoint_root: str | Path) -> tuple[str, int] | None:
    """(the stage's directory or prefix, this attempt's number) for `<stage>/attempt-<k>/checkpoints`."""
    from rlhf_lib import storage

    root = str(checkpoint_root).rstrip("/")
    attempt_dir = root.rsplit("/", 1)[0]
    stage, _, name = attempt_dir.rpartition("/")
    m = _ATTEMPT.match(name)
    if not m:
        return None
    return (stage if storage.is_remote(root) else str(Path(stage))), int(m.group(1))


def later_attempt_started(checkpoint_root: str | Path) -> bool:
    """Whether a later attempt of the same task has begun (left its STARTED marker) beside this attempt."""
    from rlhf_lib import storage

    where = attempt_of(checkpoint_root)
    if where is None:
        return False
    stage, own = where
    for name in storage.list_dirs(stage):
        m = _ATTEMPT.match(name)
        if m and int(m.group(1)) > own and storage.exists(storage.join(stage, name, STARTED)):
            return True
    return False


def _may_prune(root: str | Path, what: str) -> bool:
    if later_attempt_started(root):
        print(f"[checkpoints] a later attempt of this task has started: keeping every checkpoint in {root} "
              f"({what})", flush=True)
        return False
    return True


# ------------------------------------------------------------------ writing


def save(root: Path, step: int, write: Callable[[Path], None], keep: int | None = None,
         mirror: str | None = None) -> Path:
    """Write checkpoint `step` under root via write(tmp_dir), mark it complete, then prune to the last `keep`;
    with `mirror` (the attempt's checkpoint prefix in S3), upload it there too before returning. Without a mirror
    `root` is the attempt's own checkpoint directory on a shared disk, pruned only while no later attempt reads it."""

    def build(tmp: Path) -> None:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps({"step": step}))

    path = atomic_dir(step_dir(root, step), build, is_complete=lambda p: marked_step(p) == step)
    if keep and (mirror or _may_prune(root, "local")):
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if mirror:
        publish(path, mirror, keep)
    return path


def publish(checkpoint: Path, remote_root: str, keep: int | None = None) -> str:
    """Upload a finished local checkpoint (`step-N` or `checkpoint-N`) to `remote_root/<name>/`, marker last;
    then delete remote checkpoints older than the newest `keep` (their marker first) — unless a later attempt of
    this task has started, which may be reading them."""
    from rlhf_lib import storage

    checkpoint = Path(checkpoint)
    step = step_of(checkpoint.name)
    if marked_step(checkpoint) != step:  # HF checkpoints have no marker of their own: complete once saved
        (checkpoint / MARKER).write_text(json.dumps({"step": step}))
    target = storage.join(remote_root, checkpoint.name)
    storage.upload_dir(checkpoint, target, last=(MARKER,))
    print(f"[checkpoints] step {step} stored at {target}", flush=True)
    if keep and _may_prune(remote_root, "remote"):
        for _, old in list_checkpoints(remote_root)[:-keep]:
            files = storage.list_files(old)
            storage.delete(old, [MARKER] + [f for f in files if f != MARKER])
    return target


# ------------------------------------------------------------------ reading


def newest_first(roots: list[str | Path]) -> list[tuple[int, str]]:
    """Every complete checkpoint under `roots` (local directories or S3 prefixes), newest first; on equal steps
    the earlier root's first."""
    found = [(step, -i, where) for i, root in enumerate(roots) for step, where in list_checkpoints(root)]
    return [(step, where) for step, _, where in sorted(found, reverse=True)]


def fetch(where: str, local_root: Path) -> Path:
    """A local copy of the checkpoint at `where`: itself when local; downloaded into `local_root/<name>` from S3,
    and checked afterwards — its marker must still be there (an earlier attempt still running may have pruned it
    meanwhile). Raises StorageError when it is gone or torn."""
    from rlhf_lib import storage

    if not storage.is_remote(where):
        return Path(where)
    name = where.rstrip("/").rsplit("/", 1)[1]
    local = Path(local_root) / name
    step = step_of(name)
    if marked_step(local) != step:
        print(f"[checkpoints] downloading checkpoint {where}", flush=True)
        storage.download_dir(where, local)
    try:
        still_there = json.loads(storage.read_text(storage.join(where, MARKER)))["step"] == step
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        still_there = False
    if not still_there or marked_step(local) != step:
        shutil.rmtree(local, ignore_errors=True)
        raise storage.StorageError(f"checkpoint {where} was removed or changed while it was being downloaded")
    return local


def snapshots_beside(checkpoint_root: str) -> str:
    """The `snapshots` directory or prefix that sits beside an attempt's `checkpoints`."""
    from rlhf_lib import storage

    root = str(checkpoint_root).rstrip("/")
    parent = root.rsplit("/", 1)[0]
    return storage.join(parent, "snapshots")


def fetch_snapshots(checkpoint_root: str, upto: int, local_dir: Path) -> int:
    """Copy (or download) the adapter snapshots an earlier attempt or run kept beside `checkpoint_root`, up to step
    `upto`, into `local_dir` (those already there are kept): a continued method keeps its whole over-optimisation
    curve. Returns how many were brought."""
    from rlhf_lib import storage

    source = snapshots_beside(checkpoint_root)
    brought = 0
    for name in storage.list_dirs(source):
        step = step_of(name)
        target = Path(local_dir) / name
        if step is None or step > upto or target.exists():
            continue
        if storage.is_remote(source):
            storage.download_dir(storage.join(source, name), target)
        else:
            atomic_dir(target, lambda tmp, src=Path(source) / name: shutil.copytree(src, tmp, dirs_exist_ok=True))
        brought += 1
    return brought
