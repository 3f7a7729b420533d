"""What a run leaves behind, and deleting a run's outputs without breaking another run that points at them.

A run's stage outputs live under `<storage root>/RLHFFlow/<run id>/<stage>/attempt-<k>/`. When the run's `end` step
runs, every attempt *of this run* that no artifact of the run references is removed — failed attempts, with their
checkpoints and snapshots — unless `run.keep_failed_attempts`; so are the READING marks this run's attempts left
(here and in the runs it was resumed from), and any multipart upload still open under the run's prefix (a killed
process's, which S3 would keep and bill). Places are compared resolved: a local storage root reached through a
symlink names the same attempt two ways. A resumed run never removes its origin's attempts: another resume of the
same origin may still need them.

A run whose cleanup is refused (the credentials lack a permission) still ends successfully: the cleanup is said
as a warning naming the permission and the command below, which cleans up later.

    python -m rlhf_lib.cleanup RUN_ID [--dry-run]

deletes a finished run's outputs (and its open uploads), the way to free a run's storage that `aws s3 rm
--recursive` is not: it refuses while a later run was resumed from it or another run's artifacts point into it.
"""

from __future__ import annotations

import argparse
import re

from rlhf_lib import storage
from rlhf_lib.checkpoints import READING
from rlhf_lib.workspace import FLOW_NAME, ORIGIN, origin_of

_ATTEMPT = re.compile(r"^attempt-\d+$")


def paths_in(value) -> set[str]:
    """Every string in an artifact's value (nested dicts and lists too) that names a place (a local path or a
    URI), as a place (`storage.place`: resolved)."""
    if isinstance(value, dict):
        return set().union(*map(paths_in, value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*map(paths_in, value)) if value else set()
    if isinstance(value, str) and storage.names_a_place(value):
        return {storage.place(value)}
    return set()


def attempts(run_root: str) -> list[str]:
    """Every attempt directory (or prefix) of every stage of a run."""
    found = []
    for stage in storage.list_dirs(run_root):
        found += [storage.join(run_root, stage, a) for a in storage.list_dirs(storage.join(run_root, stage))
                  if _ATTEMPT.match(a)]
    return found


def points_into(references: set[str], location: str) -> bool:
    """Whether any reference names `location` or a place under it (both sides compared as places)."""
    where = storage.place(location)
    return any(p == where or p.startswith(where + "/") for p in map(storage.place, references))


def unreferenced(run_root: str, references: set[str]) -> list[str]:
    """The attempts of a run that no reference points into."""
    return [a for a in attempts(run_root) if not points_into(references, a)]


def _refused(report: dict, run_id: str, what: str, err: Exception, permission: str) -> None:
    """A cleanup step the storage refused: said as a warning, never a failed run."""
    if not storage.denied(err):
        raise err
    report["warnings"].append(f"could not {what} ({storage.error_line(err)}): the "
                              f"credentials lack {permission}; clean up later with "
                              f"`python -m rlhf_lib.cleanup {run_id}`")


def clean_run(storage_root: str, run_id: str, artifacts: dict, origin_run_id: str | None = None,
              keep_failed: bool = False) -> dict:
    """The `end` step's cleanup (see the module doc): this run's unreferenced attempts, its own READING marks
    (here and along its resume chain), its open uploads. Returns what it removed and aborted, and the warnings of
    what the storage refused."""
    references = paths_in(artifacts)
    report = {"removed": [], "aborted_uploads": 0, "warnings": []}
    run_root = storage.join(storage_root, FLOW_NAME, str(run_id))
    if not keep_failed:
        for attempt in unreferenced(run_root, references):
            try:
                storage.delete_tree(attempt)
                report["removed"].append(attempt)
            except Exception as err:
                _refused(report, run_id, f"remove {attempt}", err, "s3:DeleteObject")
    chain, run = [str(run_id)], origin_run_id or origin_of(storage_root, str(run_id))
    while run and run not in chain:
        chain.append(str(run))
        run = origin_of(storage_root, str(run))
    for run in chain:
        root = storage.join(storage_root, FLOW_NAME, run)
        for stage in storage.list_dirs(root):
            marks = storage.join(root, stage, READING)
            mine = [m for m in storage.list_files(marks) if reader_run(m, stage) == str(run_id)]
            try:
                storage.delete(marks, mine)
            except Exception as err:
                _refused(report, run_id, f"remove the READING marks in {marks}", err, "s3:DeleteObject")
    try:
        report["aborted_uploads"] += storage.abort_uploads(run_root)
    except Exception as err:
        _refused(report, run_id, f"abort the multipart uploads left open under {run_root}", err,
                 "s3:ListBucketMultipartUploads and s3:AbortMultipartUpload")
    return report


def reader_run(mark: str, stage: str) -> str | None:
    """The run of a READING mark's reader (`checkpoints.reader_of`: `RLHFFlow-<run>-<stage>-attempt-<k>`; a run
    id may hold dashes, as Argo's do)."""
    m = re.match(rf"^{FLOW_NAME}-(.+)-{re.escape(stage)}-attempt-\d+$", mark)
    return m.group(1) if m else None


def readers_of(storage_root: str, run_id: str) -> set[str]:
    """The runs that depend on `run_id`'s outputs for a resume: resumed from it (their ORIGIN record names it), or
    reading its checkpoints now (a READING mark in one of its stages)."""
    flow_root = storage.join(storage_root, FLOW_NAME)
    found = {run for run in storage.list_dirs(flow_root)
             if run != str(run_id) and storage.exists(storage.join(flow_root, run, ORIGIN))
             and origin_of(storage_root, run) == str(run_id)}
    run_root = storage.join(flow_root, str(run_id))
    for stage in storage.list_dirs(run_root):
        for mark in storage.list_files(storage.join(run_root, stage, READING)):
            reader = reader_run(mark, stage) or mark
            if reader != str(run_id):
                found.add(reader)
    return found


def delete_run(run_id: str, dry_run: bool = False) -> dict:
    """Delete a finished run's stage outputs and open uploads; refuses (deleting nothing) while another run was
    resumed from it, reads its checkpoints, or has artifacts that point into it."""
    from metaflow import Flow, Run, namespace

    namespace(None)
    # From `start`, which every run that began has: a failed run (the usual one to clean) has no `end` data.
    storage_root = Run(f"{FLOW_NAME}/{run_id}")["start"].task.data.storage_root
    root = storage.join(storage_root, FLOW_NAME, str(run_id))
    referencing = set()
    for run in Flow(FLOW_NAME).runs():
        if run.id != str(run_id) and run.successful:
            refs = paths_in({k.id: k.data for k in run["end"].task.artifacts})
            if points_into(refs, root):
                referencing.add(run.id)
    blockers = sorted(readers_of(storage_root, run_id) | referencing)
    if blockers:
        raise SystemExit(f"refusing to delete run {run_id}'s outputs: run(s) {', '.join(blockers)} were resumed "
                         f"from it or point into it; delete those first")
    doomed = attempts(root)
    for attempt in doomed:
        print(f"{'would delete' if dry_run else 'deleting'} {attempt}", flush=True)
        if not dry_run:
            storage.delete_tree(attempt)
    if not dry_run:
        aborted = storage.abort_uploads(root)
        if aborted:
            print(f"aborted {aborted} unfinished multipart upload(s) under {root}", flush=True)
    return {"deleted": doomed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_lib.cleanup", description=__doc__.splitlines()[0])
    parser.add_argument("run_id", help="the RLHFFlow run whose stage outputs to delete")
    parser.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    args = parser.parse_args(argv)
    from rlhf_lib import env

    env.configure()
    delete_run(args.run_id, args.dry_run)


if __name__ == "__main__":
    main()
