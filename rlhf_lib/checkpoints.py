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

Every place is a local directory or an S3 prefix; `rlhf_lib/storage.py` answers for both. Uploads run in the
background (`rlhf_lib/uploads.py`); a resume agrees across the stage's processes (`rlhf_lib/ranks.py`).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

from rlhf_lib import storage
from rlhf_lib.ranks import Ranks
from rlhf_lib.uploads import UPLOADS
from rlhf_lib.storage import atomic_dir, atomic_write_json

MARKER = "COMPLETE"
STARTED = "STARTED"
READING = "READING"  # <stage>/READING/<reader>: the task's checkpoints are being read by another attempt or run
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


def readers(checkpoint_root: str | Path) -> dict[str, str]:
    """Who marked a checkpoint of this task as being read (`<stage>/READING/<reader>`: a later attempt, or a run
    resumed from this one), and which checkpoint each reads."""
    where = attempt_of(checkpoint_root)
    if not where:
        return {}
    marks = storage.join(where[0], READING)
    found = {}
    for reader in storage.list_files(marks):
        try:
            found[reader] = storage.place(storage.read_text(storage.join(marks, reader)).strip())
        except FileNotFoundError:  # its reader's run ended and took its mark away meanwhile: it reads nothing now
            continue
    return found


def mark_reading(location: str, reader: str) -> None:
    """Say, beside the task that wrote it, that `reader` is reading the checkpoint at `location`: from then on that
    task's attempts do not delete that checkpoint (a zombie pod, or the origin of a resumed run still running)."""
    where = attempt_of(str(location).rstrip("/").rsplit("/", 1)[0])
    if where:
        storage.write_text(storage.join(where[0], READING, reader), f"{storage.place(location)}\n")


def _may_delete(root: str | Path, checkpoint: str, what: str) -> bool | None:
    """Whether this attempt may delete `checkpoint` now: True; False to keep it (someone reads it); None when it
    no longer holds the lease on its task's checkpoints at all (a later attempt has started). Asked right before
    each delete. A reader's mark protects the checkpoint it reads, not the reader's own attempt's checkpoints: a
    retried attempt that continued from its predecessor keeps pruning its own."""
    if later_attempt_started(root):
        print(f"[checkpoints] a later attempt of this task has started: keeping every checkpoint in {root} "
              f"({what})", flush=True)
        return None
    marks = [reader for reader, read in readers(root).items() if read == storage.place(checkpoint)]
    if marks:
        print(f"[checkpoints] {', '.join(marks)} read(s) {checkpoint}: keeping it ({what})", flush=True)
        return False
    return True


def prune(root: str | Path, keep: int, what: str, fenced: bool = True) -> None:
    """Delete all but the newest `keep` complete checkpoints under `root` (local or S3; an S3 one marker first),
    each only while this attempt still holds the lease and no one reads it (`fenced`: asked right before each
    delete)."""
    for _, old in list_checkpoints(root)[:-keep]:
        allowed = _may_delete(root, old, what) if fenced else True
        if allowed is None:
            return
        if allowed:
            storage.delete(old, [MARKER])  # incomplete to every reader from now on
            storage.delete_tree(old)


# ------------------------------------------------------------------ writing


def save(root: Path, step: int, write: Callable[[Path], None], keep: int | None = None,
         mirror: str | None = None) -> Path:
    """Write checkpoint `step` under root via write(tmp_dir), mark it complete, then prune to the last `keep`;
    with `mirror` (the attempt's checkpoint prefix in S3), upload it there too — in the background (`UPLOADS`): the
    training goes on, and the next checkpoint waits for it. Without a mirror `root` is the attempt's own checkpoint
    directory on a shared disk, pruned only while this attempt holds the lease (`_may_delete`)."""

    def build(tmp: Path) -> None:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps({"step": step}))

    started = time.time()
    path = atomic_dir(step_dir(root, step), build, is_complete=lambda p: marked_step(p) == step)
    print(f"[checkpoints] step {step} written in {time.time() - started:.1f} s ({_megabytes(path):.0f} MB)", flush=True)
    if keep:  # a mirrored attempt's local directory is its own scratch: no one else reads it
        prune(root, keep, "local", fenced=not mirror)
    if mirror:
        publish_later(path, mirror, keep)
    return path


def _megabytes(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def publish_later(checkpoint: Path, remote_root: str, keep: int | None = None) -> None:
    """`publish` in the background (`UPLOADS`), from a snapshot of the checkpoint taken now."""
    checkpoint = Path(checkpoint)
    _mark(checkpoint)
    UPLOADS.submit_dir(step_of(checkpoint.name), checkpoint, publish, remote_root, keep, name=checkpoint.name)


def _mark(checkpoint: Path) -> None:
    """An HF checkpoint's marker (ours have theirs): it is complete once HF has saved it."""
    step = step_of(checkpoint.name)
    if marked_step(checkpoint) != step:
        (checkpoint / MARKER).write_text(json.dumps({"step": step}))


def publish(checkpoint: Path, remote_root: str, keep: int | None = None, name: str | None = None) -> str:
    """Upload a finished local checkpoint (`step-N` or `checkpoint-N`) to `remote_root/<name>/`, HF's state and the
    marker last; then delete remote checkpoints older than the newest `keep` (their marker first) while this
    attempt holds the lease (no later attempt started, no one reading them)."""
    checkpoint, name = Path(checkpoint), name or Path(checkpoint).name
    step = step_of(name)
    if marked_step(checkpoint) != step:  # HF checkpoints have no marker of their own: complete once saved
        (checkpoint / MARKER).write_text(json.dumps({"step": step}))
    target = storage.join(remote_root, name)
    storage.upload_dir(checkpoint, target, last=(HF_STATE, MARKER))
    print(f"[checkpoints] step {step} stored at {target}", flush=True)
    if keep:
        prune(remote_root, keep, "remote")
    return target


# ------------------------------------------------------------------ reading


def fetch(where: str, local_root: Path) -> Path:
    """A local copy of the checkpoint at `where` (itself, when it is local; else downloaded into
    `local_root/<name>`), checked afterwards: its marker must still be there (an earlier attempt still running may
    have pruned it meanwhile). Raises storage.Gone when it is gone or torn."""
    name = str(where).rstrip("/").rsplit("/", 1)[1]
    step = step_of(name)
    local = storage.fetch_dir(where, Path(local_root) / name, complete=lambda p: marked_step(p) == step)
    if local == Path(where):
        return local
    if _stored_step(where) != step or marked_step(local) != step:
        shutil.rmtree(local, ignore_errors=True)
        raise storage.Gone(f"checkpoint {where} was removed or changed while it was being downloaded")
    return local


def adopt(checkpoint: Path, own_root: Path) -> Path:
    """Copy a checkpoint from elsewhere (an earlier attempt, a resume's origin run) into this stage's own checkpoint
    directory, atomically, so that a resume of this attempt later still finds it if it dies before saving."""
    target = Path(own_root) / Path(checkpoint).name
    if Path(checkpoint).resolve() == target.resolve():
        return target
    return atomic_dir(target, lambda tmp: shutil.copytree(checkpoint, tmp, dirs_exist_ok=True))


class Corrupt(ValueError):
    """A file of a checkpoint is there but does not parse (torn, truncated, or not what it should be)."""


# Why a reader may try an older checkpoint: this one is not (all) there...
NOT_THERE = (storage.Gone, FileNotFoundError, IsADirectoryError, NotADirectoryError)
# ...or a file of it is there and does not parse: what json, text, pickle and safetensors raise on bad bytes.
DOES_NOT_PARSE = (Corrupt, ValueError, EOFError, pickle.UnpicklingError)
# Errors raised by the storage's own libraries are faults of the storage, whatever their type.
STORAGE_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3", "metaflow")


def _does_not_parse() -> tuple[type, ...]:
    from safetensors import SafetensorError

    return (*DOES_NOT_PARSE, SafetensorError)


def unusable(err: BaseException) -> bool:
    """Whether a failure to fetch or load a checkpoint means *this checkpoint* is incomplete or corrupt — it is not
    there (a 404, a key removed while it was read, a missing file or marker) or a file of it does not parse — so
    that an older one may be tried. Everything else is a fault that must fail the stage: access denied, throttling
    past the retries, timeouts, a full disk, metaflow.S3's own exceptions (the path of every checkpoint of 32 MB or
    more), and any exception nobody classified. A fault is never "no checkpoint, start at 0"."""
    if isinstance(err, NOT_THERE):
        return True
    if type(err).__module__.split(".")[0] in STORAGE_LIBRARIES:
        return False
    return isinstance(err, _does_not_parse())


def parse_file(path: Path, read: Callable[[Path], object]) -> object:
    """`read(path)` for one file of a local checkpoint, with what says its bytes are bad turned into Corrupt:
    torch's reader raises a bare RuntimeError for a torn archive. The machine's errors (OSError) stay faults."""
    try:
        return read(path)
    except OSError:
        raise
    except (RuntimeError, *_does_not_parse()) as err:
        raise Corrupt(f"{path} does not parse ({type(err).__name__}: {err})") from err


def choose(stage: str, roots: list[str], output: Path, load, reader: str | None) -> tuple[int, str, Path, object] | None:
    """The newest checkpoint `load` accepts among this stage's own directory and `roots`: (step, location, local
    copy, what `load` gave). An incomplete or corrupt one is said and the next older one tried; any other error
    (the storage's or the machine's) is raised. One from elsewhere is marked as being read before it is fetched."""
    own_root = Path(output) / "checkpoints"
    where = ", ".join(str(r) for r in roots) or "this stage's own directory"
    try:
        candidates = newest_first([own_root, *roots])
    except Exception as err:
        _fault(stage, f"the checkpoints in {where}", err)
        raise
    if not candidates:
        print(f"[{stage}] no checkpoint in {where}: starting at step 0", flush=True)
        return None
    for i, (step, location) in enumerate(candidates):
        try:
            if reader and not str(location).startswith(str(own_root)):
                mark_reading(location, reader)
            local = fetch(location, Path(output) / FETCHED)
            started = time.time()
            state = load(local)
            print(f"[{stage}] checkpoint {location} read in {time.time() - started:.1f} s", flush=True)
            return step, location, local, state
        except Exception as err:
            if not unusable(err):
                _fault(stage, f"checkpoint {location}", err)
                raise
            following = f"trying {candidates[i + 1][1]}" if i + 1 < len(candidates) else "starting at step 0"
            print(f"[{stage}] checkpoint {location} failed to load ({type(err).__name__}: {err}): {following}",
                  flush=True)
    return None


def reader_of(checkpoint_uri: str | None) -> str | None:
    """How an attempt names itself in a READING mark: `<flow>-<run>-<stage>-attempt-<k>` from its checkpoint
    location (None for a stage run alone, which has none)."""
    if not checkpoint_uri:
        return None
    parts = str(checkpoint_uri).rstrip("/").split("/")
    return "-".join(parts[-5:-1]) if len(parts) >= 5 else None


def _fault(stage: str, what: str, err: BaseException) -> None:
    print(f"[{stage}] {what} could not be read ({storage.error_line(err)}): failing the stage rather than "
          f"starting over", flush=True)


def resume_point(stage: str, roots: list[str], output: Path, load, own_uri: str | None = None
                 ) -> tuple[Path, object] | None:
    """Where a stage continues: the newest checkpoint that `load` accepts (`choose`), among those in its own
    directory (a rerun of this attempt) and under `roots` (earlier attempts of this task, then a resume's origin
    run; local directories or S3 prefixes). A collective on several processes: rank 0 chooses; the first process
    of each other node downloads that checkpoint once for its node; every process loads it; all of them must agree
    on the step, or every one fails (none hangs): a failure of rank 0 while it chooses or fetches is broadcast to
    the others, which fail naming it. One from elsewhere is copied into this stage's own directory with
    the snapshots it had up to its step. Every outcome is said, "starting at step 0" included. Returns (local
    checkpoint, what `load` gave), or None to start at step 0."""
    ranks, output = Ranks(), Path(output)
    chosen, failure = None, None
    if ranks.rank == 0:
        try:
            chosen = choose(stage, roots, output, load, reader_of(own_uri))
            if chosen:
                chosen = _adopt_with_snapshots(stage, chosen, output)
        except Exception as err:  # told to every rank before it is raised: none waits at the broadcast for it
            failure = err
    told = ranks.broadcast({"location": chosen[1] if chosen else None,
                            "failure": storage.error_line(failure) if failure else None})
    if failure is not None:
        raise failure
    if told["failure"]:
        raise RuntimeError(f"[{stage}] rank 0 failed choosing or loading the checkpoint to continue from "
                           f"({told['failure']}); rank {ranks.rank} fails the stage with it")
    location = told["location"]
    local, state = (chosen[2], chosen[3]) if chosen else (None, None)
    if location is not None and ranks.rank != 0:
        local, state = _load_on_this_rank(ranks, location, output, load)
    else:
        ranks.barrier()  # rank 0 has its copy; the others are fetching theirs
    step = (step_of(location) if state is not None else -1) if location is not None else 0
    steps = ranks.gather(step)
    if len(set(steps)) != 1:
        raise RuntimeError(f"[{stage}] the {ranks.world} processes do not agree on the checkpoint to continue from "
                           f"(steps by rank, -1 where it failed to load: {steps}); failing the stage")
    if location is None:
        return None
    if ranks.world > 1:
        print(f"[{stage}] rank {ranks.rank}/{ranks.world}: continuing from step {step} ({local})", flush=True)
    return Path(local), state


def _adopt_with_snapshots(stage: str, chosen: tuple, output: Path) -> tuple:
    """A chosen checkpoint from elsewhere copied into this stage's own directory, with its snapshots."""
    step, location, local, state = chosen
    own_root = output / "checkpoints"
    if Path(local).parent.resolve() != own_root.resolve():
        local = adopt(Path(local), own_root)
        snapshots = fetch_snapshots(location.rstrip("/").rsplit("/", 1)[0], step, output / SNAPSHOTS)
        print(f"[{stage}] continuing from {location} (step {step}; {snapshots} snapshot(s) of the curve with it)",
              flush=True)
    shutil.rmtree(output / FETCHED, ignore_errors=True)
    return step, location, local, state


def _load_on_this_rank(ranks: Ranks, location: str, output: Path, load) -> tuple[Path | None, object]:
    """A process other than rank 0: its node's copy of the chosen checkpoint (fetched once, by the node's first
    process; on rank 0's node, rank 0's own copy), loaded. (None, None) when it cannot be."""
    point = output / FETCHED / "POINT.json"
    if ranks.local_rank == 0:
        try:
            local = fetch(location, output / FETCHED)
            atomic_write_json(point, {"location": location, "local": str(local)})
        except Exception as err:
            print(f"[checkpoints] rank {ranks.rank}: cannot fetch {location} ({type(err).__name__}: {err})", flush=True)
    ranks.barrier()
    try:
        local = Path(json.loads(point.read_text())["local"]) if point.exists() else _rank0_copy(output, location)
        return local, load(local)
    except Exception as err:
        print(f"[checkpoints] rank {ranks.rank}: cannot load {location} ({type(err).__name__}: {err})", flush=True)
        return None, None


def _rank0_copy(output: Path, location: str) -> Path:
    """On rank 0's node, the copy rank 0 adopted into the stage's own directory."""
    return output / "checkpoints" / str(location).rstrip("/").rsplit("/", 1)[1]


# ------------------------------------------------------------------ snapshots


def snapshots_beside(checkpoint_root: str) -> str:
    """The `snapshots` directory or prefix that sits beside an attempt's `checkpoints`."""
    parent = str(checkpoint_root).rstrip("/").rsplit("/", 1)[0]
    return storage.join(parent, SNAPSHOTS)


def save_snapshot(adapter_model, output: Path, step: int, checkpoint_uri: str | None = None) -> Path:
    """The adapter as it is at `step`, kept for good under DIR/snapshots/step-N, with its own `COMPLETE` marker
    written last (atomic). With a `checkpoint_uri` elsewhere (S3) it is stored beside the attempt's checkpoints
    (in the background, marker last), so a retried or resumed attempt elsewhere keeps the whole curve."""

    def build(tmp: Path) -> None:
        adapter_model.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps({"step": step}))

    path = atomic_dir(Path(output) / SNAPSHOTS / f"step-{step:06d}", build,
                      is_complete=lambda p: marked_step(p) == step)
    mirror = storage.mirror_of(checkpoint_uri)
    if mirror:
        UPLOADS.submit_dir(step, path, storage.upload_dir, storage.join(snapshots_beside(mirror), path.name),
                           last=(MARKER,))
    return path


def snapshot_then_checkpoint(adapter_model, output: Path, step: int, checkpoint_uri: str | None, save_checkpoint):
    """The snapshot of `step` first, then the checkpoint (`save_checkpoint()`): a checkpoint then implies its step's
    point of the over-optimisation curve — a kill between the two replays the step from the previous checkpoint and
    rewrites the same snapshot. (HF-Trainer stages keep this order with `hf.snapshot_callback`.)"""
    save_snapshot(adapter_model, output, step, checkpoint_uri)
    return save_checkpoint()


def complete_snapshots(directory: str | Path | None, say: str = "") -> list[tuple[int, Path]]:
    """(step, directory) of every complete snapshot (`step-N` whose marker names N) in a local directory, oldest
    first; one without its marker (cut off while it was written or copied) is skipped, and said when `say` names
    who skips it."""
    found = []
    if not directory or not Path(directory).is_dir():
        return found
    for path in sorted(Path(directory).iterdir()):
        step = step_of(path.name)
        if step is None or not path.is_dir():
            continue
        if marked_step(path) == step:
            found.append((step, path))
        elif say:
            print(f"[{say}] snapshot {path} has no {MARKER} marker (cut off while it was written): skipped", flush=True)
    return sorted(found)


def fetch_snapshots(checkpoint_root: str, upto: int, local_dir: Path) -> int:
    """Copy (or download) the complete adapter snapshots an earlier attempt or run kept beside `checkpoint_root`, up
    to step `upto`, into `local_dir` (those already there are kept): a continued method keeps its whole
    over-optimisation curve. One without its marker is skipped, and said. Returns how many were brought."""
    source = snapshots_beside(checkpoint_root)
    brought = 0
    for name in storage.list_dirs(source):
        step = step_of(name)
        target = Path(local_dir) / name
        if step is None or step > upto or marked_step(target) == step:
            continue
        if _stored_step(storage.join(source, name)) != step:
            print(f"[checkpoints] snapshot {storage.join(source, name)} has no {MARKER} marker (cut off while it was "
                  f"written): skipped", flush=True)
            continue
        storage.copy_dir(storage.join(source, name), target)
        brought += 1
    return brought
