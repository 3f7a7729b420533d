"""Checkpoints and snapshots: written atomically, found in either layout, local or in S3, fenced between task
attempts, and the point a stage continues from.

Two layouts: ours (`step-N/`, ppo and rest) and the HF Trainer's (`checkpoint-N/`, sft, reward, dpo, grpo, rloo).
A checkpoint is complete when its `COMPLETE` marker names its step (ours: built in a temporary sibling, every file
fsynced, the marker written last, renamed into place; in S3 the marker is uploaded after every other file), or —
an HF checkpoint — once HF wrote its `trainer_state.json` (last of its files, and uploaded last but the marker). A
torn or corrupt checkpoint is skipped in favour of the one before.

Fencing. Each attempt of a task writes under its own prefix, `<stage>/attempt-<k>/` (rlhf_lib/workspace.py), and
first leaves a `STARTED` marker there. An attempt never touches another's prefix; it prunes its own old checkpoints
only while no later attempt has started (a later one may be reading them), and a checkpoint downloaded from an
earlier attempt counts only if its marker is still there once the download is done — so an attempt that is
still running after it was given up for dead (a "zombie" pod) can change nothing the new attempt reads.

Snapshots: an online method keeps its adapter at each checkpoint under `DIR/snapshots/step-N` (the evaluation's
over-optimisation curve); they are never pruned, and travel with a checkpoint adopted from elsewhere.

Every place is a local directory or an S3 prefix; `rlhf_lib/storage.py` answers for both.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

from rlhf_lib import storage
from rlhf_lib.storage import atomic_dir

MARKER = "COMPLETE"
STARTED = "STARTED"
HF_STATE = "trainer_state.json"
SNAPSHOTS = "snapshots"  # DIR/snapshots/step-N: an online method's adapter at each checkpoint, never pruned
FETCHED = ".fetched"  # DIR/.fetched/<checkpoint>: a checkpoint downloaded to continue from
_CHECKPOINT = re.compile(r"^(?:step|checkpoint)-(\d+)$")
_ATTEMPT = re.compile(r"^attempt-(\d+)$")


# ------------------------------------------------------------------ markers and listing


def step_of(name: str | Path | None) -> int | None:
    """The step in a checkpoint's directory name (`step-N` or `checkpoint-N`), None for anything else."""
    if not name:
        return None
    m = _CHECKPOINT.match(Path(str(name).rstrip("/")).name)
    return int(m.group(1)) if m else None


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def _read_step(text: str) -> int | None:
    try:
        return int(json.loads(text)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def marked_step(path: Path) -> int | None:
    """The step a local checkpoint's marker names; None when it has none (or an unreadable one)."""
    try:
        return _read_step((Path(path) / MARKER).read_text())
    except OSError:
        return None


def _stored_step(where: str) -> int | None:
    """The step the marker at `where` (a checkpoint, local or in S3) names; None when there is no marker or it does
    not parse. Every other storage error is raised: a fault is not an absence."""
    try:
        return _read_step(storage.read_text(storage.join(where, MARKER)))
    except FileNotFoundError:
        return None


def list_checkpoints(root: str | Path) -> list[tuple[int, str]]:
    """(step, location) of the complete checkpoints under a local directory or an S3 prefix, oldest first.
    Incomplete ones are skipped with a warning; an error reading the storage is raised."""
    root = str(root)
    files = storage.list_files(root)
    found = []
    for name in storage.list_dirs(root):
        step = step_of(name)
        if step is None:
            continue
        where = storage.join(root, name)
        own = {f[len(name) + 1:] for f in files if f.startswith(name + "/")}
        complete = (MARKER in own and _stored_step(where) == step) or \
            (name.startswith("checkpoint-") and HF_STATE in own)
        if complete:
            found.append((step, where))
        else:
            warnings.warn(f"skipping incomplete checkpoint {where} (no valid {MARKER} marker)", stacklevel=2)
    return sorted(found)


def newest_first(roots: list[str | Path]) -> list[tuple[int, str]]:
    """Every complete checkpoint under `roots` (local directories or S3 prefixes), newest first; on equal steps
    the earlier root's first."""
    found = [(step, -i, where) for i, root in enumerate(roots) for step, where in list_checkpoints(root)]
    return [(step, where) for step, _, where in sorted(found, reverse=True)]


# ------------------------------------------------------------------ attempts and fencing


def attempt_of(checkpoint_root: str | Path) -> tuple[str, int] | None:
    """(the stage's directory or prefix, this attempt's number) for `<stage>/attempt-<k>/checkpoints`."""
    attempt_dir = str(checkpoint_root).rstrip("/").rsplit("/", 1)[0]
    stage, _, name = attempt_dir.rpartition("/")
    m = _ATTEMPT.match(name)
    return (stage, int(m.group(1))) if m else None


def later_attempt_started(checkpoint_root: str | Path) -> bool:
    """Whether a later attempt of the same task has begun (left its STARTED marker) beside this attempt."""
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
    """Upload a finished local checkpoint (`step-N` or `checkpoint-N`) to `remote_root/<name>/`, HF's state and the
    marker last; then delete remote checkpoints older than the newest `keep` (their marker first) — unless a later
    attempt of this task has started, which may be reading them."""
    checkpoint = Path(checkpoint)
    step = step_of(checkpoint.name)
    if marked_step(checkpoint) != step:  # HF checkpoints have no marker of their own: complete once saved
        (checkpoint / MARKER).write_text(json.dumps({"step": step}))
    target = storage.join(remote_root, checkpoint.name)
    storage.upload_dir(checkpoint, target, last=(HF_STATE, MARKER))
    print(f"[checkpoints] step {step} stored at {target}", flush=True)
    if keep and _may_prune(remote_root, "remote"):
        for _, old in list_checkpoints(remote_root)[:-keep]:
            files = storage.list_files(old)
            storage.delete(old, [MARKER] + [f for f in files if f != MARKER])
    return target


# ------------------------------------------------------------------ reading


def fetch(where: str, local_root: Path) -> Path:
    """A local copy of the checkpoint at `where` (itself, when it is local; else downloaded into
    `local_root/<name>`), checked afterwards: its marker must still be there (an earlier attempt still running may
    have pruned it meanwhile). Raises StorageError when it is gone or torn."""
    name = str(where).rstrip("/").rsplit("/", 1)[1]
    step = step_of(name)
    local = storage.fetch_dir(where, Path(local_root) / name, complete=lambda p: marked_step(p) == step)
    if local == Path(where):
        return local
    if _stored_step(where) != step or marked_step(local) != step:
        shutil.rmtree(local, ignore_errors=True)
        raise storage.StorageError(f"checkpoint {where} was removed or changed while it was being downloaded")
    return local


def adopt(checkpoint: Path, own_root: Path) -> Path:
    """Copy a checkpoint from elsewhere (an earlier attempt, a resume's origin run) into this stage's own checkpoint
    directory, atomically, so that a resume of this attempt later still finds it if it dies before saving."""
    target = Path(own_root) / Path(checkpoint).name
    if Path(checkpoint).resolve() == target.resolve():
        return target
    return atomic_dir(target, lambda tmp: shutil.copytree(checkpoint, tmp, dirs_exist_ok=True))


def resume_point(stage: str, roots: list[str], output: Path, load) -> tuple[Path, object] | None:
    """Where a stage continues: the newest checkpoint that `load` accepts, among those in its own directory (a
    rerun of this attempt) and under `roots` (earlier attempts of this task, then a resume's origin run; local
    directories or S3 prefixes). One in S3 is downloaded first; one that fails to load is said and the next older
    one tried. One from elsewhere is copied into this stage's own directory with the snapshots it had up to its
    step. Every outcome is said, "starting at step 0" included. Returns (local checkpoint, what `load` gave)."""
    own_root = Path(output) / "checkpoints"
    candidates = newest_first([own_root, *roots])
    where = ", ".join(str(r) for r in roots) or "this stage's own directory"
    if not candidates:
        print(f"[{stage}] no checkpoint in {where}: starting at step 0", flush=True)
        return None
    for i, (step, location) in enumerate(candidates):
        try:
            local = fetch(location, Path(output) / FETCHED)
            state = load(local)
        except Exception as err:  # torn, corrupt, or pruned while downloading: the next older one
            following = f"trying {candidates[i + 1][1]}" if i + 1 < len(candidates) else "starting at step 0"
            print(f"[{stage}] checkpoint {location} failed to load ({type(err).__name__}: {err}): {following}",
                  flush=True)
            continue
        if Path(local).parent.resolve() != own_root.resolve():
            source_root = location.rstrip("/").rsplit("/", 1)[0]
            local = adopt(Path(local), own_root)
            snapshots = fetch_snapshots(source_root, step, Path(output) / SNAPSHOTS)
            print(f"[{stage}] continuing from {location} (step {step}; {snapshots} snapshot(s) of the curve with it)",
                  flush=True)
        shutil.rmtree(Path(output) / FETCHED, ignore_errors=True)
        return Path(local), state
    return None


# ------------------------------------------------------------------ snapshots


def snapshots_beside(checkpoint_root: str) -> str:
    """The `snapshots` directory or prefix that sits beside an attempt's `checkpoints`."""
    parent = str(checkpoint_root).rstrip("/").rsplit("/", 1)[0]
    return storage.join(parent, SNAPSHOTS)


def save_snapshot(adapter_model, output: Path, step: int, checkpoint_uri: str | None = None) -> Path:
    """The adapter as it is at `step`, kept for good under DIR/snapshots/step-N (atomic). With a `checkpoint_uri`
    elsewhere (S3) it is stored beside the attempt's checkpoints at once, so a retried or resumed attempt elsewhere
    keeps the whole curve."""
    path = atomic_dir(Path(output) / SNAPSHOTS / f"step-{step:06d}",
                      lambda tmp: adapter_model.save_pretrained(tmp, safe_serialization=True),
                      is_complete=lambda p: (p / "adapter_config.json").exists())
    mirror = storage.mirror_of(checkpoint_uri)
    if mirror:
        storage.upload_dir(path, storage.join(snapshots_beside(mirror), path.name))
    return path


def fetch_snapshots(checkpoint_root: str, upto: int, local_dir: Path) -> int:
    """Copy (or download) the adapter snapshots an earlier attempt or run kept beside `checkpoint_root`, up to step
    `upto`, into `local_dir` (those already there are kept): a continued method keeps its whole over-optimisation
    curve. Returns how many were brought."""
    source = snapshots_beside(checkpoint_root)
    brought = 0
    for name in storage.list_dirs(source):
        step = step_of(name)
        target = Path(local_dir) / name
        if step is None or step > upto or target.exists():
            continue
        storage.copy_dir(storage.join(source, name), target)
        brought += 1
    return brought
