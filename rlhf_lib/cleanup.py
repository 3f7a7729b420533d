"""What a run leaves behind, and deleting a run's outputs without breaking another run that points at them.

A run's stage outputs live under `<storage root>/RLHFFlow/<run id>/<stage>/attempt-<k>/`. When the run's `end` step
runs, every attempt no artifact of the run references is removed — failed attempts, with their checkpoints and
snapshots — unless `run.keep_failed_attempts`; so are the READING marks that fenced its checkpoints, and any
multipart upload still open under the run's prefix (a killed process's, which S3 would keep and bill). A resumed
run also clears its origin's attempts that nothing it points at needs (the origin's failed attempts; the steps it
cloned stay referenced).

    python -m rlhf_lib.cleanup RUN_ID [--dry-run]

deletes a finished run's outputs, except what another run's artifacts still reference (a run resumed from it
keeps pointing at the steps it cloned): the way to free a run's storage that `aws s3 rm --recursive` is not.
"""

from __future__ import annotations

import argparse
import re

from rlhf_lib import storage
from rlhf_lib.checkpoints import READING
from rlhf_lib.workspace import FLOW_NAME

_ATTEMPT = re.compile(r"^attempt-\d+$")


def paths_in(value) -> set[str]:
    """Every string in an artifact's value (nested dicts and lists too) that names a place: a local path or a URI."""
    if isinstance(value, dict):
        return set().union(*map(paths_in, value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*map(paths_in, value)) if value else set()
    if isinstance(value, str) and storage.names_a_place(value):
        return {value.rstrip("/")}
    return set()


def attempts(run_root: str) -> list[str]:
    """Every attempt directory (or prefix) of every stage of a run."""
    found = []
    for stage in storage.list_dirs(run_root):
        found += [storage.join(run_root, stage, a) for a in storage.list_dirs(storage.join(run_root, stage))
                  if _ATTEMPT.match(a)]
    return found


def unreferenced(run_root: str, references: set[str]) -> list[str]:
    """The attempts of a run that no reference points into."""
    return [a for a in attempts(run_root) if not any(r == a or r.startswith(a + "/") for r in references)]


def clean_run(storage_root: str, run_id: str, artifacts: dict, origin_run_id: str | None = None,
              keep_failed: bool = False) -> dict:
    """The `end` step's cleanup (see the module doc). Returns what it removed and aborted."""
    references = paths_in(artifacts)
    report = {"removed": [], "aborted_uploads": 0}
    for run in [run_id] + ([origin_run_id] if origin_run_id else []):
        run_root = storage.join(storage_root, FLOW_NAME, str(run))
        if not keep_failed:
            for attempt in unreferenced(run_root, references):
                storage.delete_tree(attempt)
                report["removed"].append(attempt)
        for stage in storage.list_dirs(run_root):
            storage.delete_tree(storage.join(run_root, stage, READING))
        report["aborted_uploads"] += storage.abort_uploads(run_root)
    return report


def delete_run(run_id: str, dry_run: bool = False) -> dict:
    """Delete a finished run's stage outputs, except the attempts another successful run's artifacts reference."""
    from metaflow import Flow, Run, namespace

    namespace(None)
    target = Run(f"{FLOW_NAME}/{run_id}")
    root = storage.join(target.data.storage_root, FLOW_NAME, str(run_id))
    others = set()
    for run in Flow(FLOW_NAME).runs():
        if run.id != str(run_id) and run.successful:
            others |= {p for p in paths_in({k.id: k.data for k in run["end"].task.artifacts}) if p.startswith(root)}
    doomed = unreferenced(root, others)
    kept = sorted(set(attempts(root)) - set(doomed))
    for attempt in doomed:
        print(f"{'would delete' if dry_run else 'deleting'} {attempt}", flush=True)
        if not dry_run:
            storage.delete_tree(attempt)
    for attempt in kept:
        print(f"keeping {attempt}: another run's artifacts point into it", flush=True)
    return {"deleted": doomed, "kept": kept}


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
