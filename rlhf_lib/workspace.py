"""Where one attempt of one stage task works, what it reads and where its outputs go: the one seam between the
pipeline and its storage.

Every attempt of a task has its own prefix, `<root>/RLHFFlow/<run id>/<stage>/attempt-<k>/`, local or in S3:
its `STARTED` marker (left first: the fence, see rlhf_lib/checkpoints.py), checkpoints as they are written,
snapshots, and at the end its outputs with `result.json` last. Nothing an attempt writes lands in another's prefix,
so an attempt given up for dead that is still running cannot overwrite what a later attempt reads or what
Metaflow recorded (the artifacts name the attempt that succeeded).

`LocalWorkspace`: the stage works in its attempt directory under a local storage root. `S3Workspace`: the stage
works in a local scratch directory of its own (`<scratch>/RLHFFlow/<run>/<stage>/attempt-<k>/`), downloads its
inputs there, mirrors each checkpoint to S3 as it is written, publishes the rest when it succeeds, and removes
the scratch directory whether it succeeds or fails — a retry on this machine or another starts from S3.

The same few operations on both: `begin` (the fence), `localize` (inputs), `checkpoint_roots` (where earlier
attempts of this task, and a resume's origin run, left checkpoints: the stage continues from the newest that
loads), `publish`, `close`; and where this machine keeps what is not the stage's output (`lock_root`,
`data_root`). Whether the task runs in a pod is another question (`in_pod`): a pod is told by the environment
its scheduler gives it, not by where the outputs go.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from rlhf_lib import checkpoints, storage
from rlhf_lib.config import RunConfig
from rlhf_lib.stages.contract import RESULT_FILE
from rlhf_lib.storage import atomic_write_json

FLOW_NAME = "RLHFFlow"
S3_DATASTORE_SUBDIR = "rlhf"  # stage outputs under the Metaflow S3 datastore's root, beside its own files
# What Metaflow's Kubernetes and Batch plugins set in the pods they start.
POD_ENVIRONMENT = ("METAFLOW_KUBERNETES_WORKLOAD", "AWS_BATCH_JOB_ID")


def in_pod(environ=None) -> bool:
    """Whether this task runs in a pod (Kubernetes, Batch) that Metaflow started, with the disk its step asked for."""
    environ = os.environ if environ is None else environ
    return any(environ.get(var) for var in POD_ENVIRONMENT)


def resolve_storage_root(cfg: RunConfig, datastore_type: str | None) -> str:
    """Where this run's stage outputs go: run.storage_root when it is a URI; the Metaflow S3 datastore's root
    (`<sysroot>/rlhf`) when the run's datastore is S3 (on a cluster a local path would vanish with each pod);
    else the local path."""
    if storage.is_remote(cfg.run.storage_root) or datastore_type != "s3":
        return cfg.storage_uri
    from metaflow.metaflow_config import DATASTORE_SYSROOT_S3

    if not DATASTORE_SYSROOT_S3:
        raise storage.StorageError("Metaflow's datastore is S3 but METAFLOW_DATASTORE_SYSROOT_S3 is not set; set "
                                   "it, or set run.storage_root to an s3:// URI")
    return storage.join(DATASTORE_SYSROOT_S3, S3_DATASTORE_SUBDIR)


class OriginUnreachable(RuntimeError):
    """A `resume` whose origin run's checkpoints cannot be reached from this machine."""


def stage_uri(cfg: RunConfig, run_id: str, stage: str) -> str:
    return storage.join(cfg.storage_uri, FLOW_NAME, str(run_id), stage)


def run_uri(cfg: RunConfig, run_id: str, *parts: str) -> str:
    return storage.join(cfg.storage_uri, FLOW_NAME, str(run_id), *parts)


ORIGIN = "ORIGIN"  # <root>/RLHFFlow/<run>/ORIGIN: the run it was resumed from (a resume chain's links)


def origin_of(storage_root: str, run_id: str) -> str | None:
    """The run `run_id` was resumed from (its ORIGIN record), None for a run started afresh."""
    try:
        return storage.read_text(storage.join(storage_root, FLOW_NAME, str(run_id), ORIGIN)).strip() or None
    except FileNotFoundError:
        return None


def attempt_uri(cfg: RunConfig, run_id: str, stage: str, attempt: int) -> str:
    return storage.join(stage_uri(cfg, run_id, stage), f"attempt-{attempt}")


def _rewrite(value, prefixes: dict[str, str]):
    """`value` with every string that starts with a local path in `prefixes` pointed at its URI instead."""
    if isinstance(value, dict):
        return {k: _rewrite(v, prefixes) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, prefixes) for v in value]
    if isinstance(value, str):
        for local, uri in prefixes.items():
            if value == local or value.startswith(local + "/"):
                return uri + value[len(local):]
    return value


class Workspace:
    """One attempt (`attempt`, Metaflow's retry count) of one stage (`stage`, the output directory's name) of one
    run, on one node of a gang (`node`; node 0 is the one that writes)."""

    def __init__(self, cfg: RunConfig, run_id: str, stage: str, attempt: int = 0, node: int = 0):
        self.cfg, self.run_id, self.stage, self.attempt, self.node = cfg, str(run_id), stage, attempt, node
        self.uri = attempt_uri(cfg, run_id, stage, attempt)
        self.checkpoint_uri = storage.join(self.uri, "checkpoints")

    @staticmethod
    def of(cfg: RunConfig, run_id: str, stage: str, attempt: int = 0, node: int = 0) -> "Workspace":
        cls = S3Workspace if storage.is_remote(cfg.storage_uri) else LocalWorkspace
        return cls(cfg, run_id, stage, attempt, node)

    @property
    def work(self) -> Path:
        """The local directory the stage writes to."""
        raise NotImplementedError

    @property
    def lock_root(self) -> Path:
        """The local directory where the stages of this machine take turns (their lock)."""
        raise NotImplementedError

    @property
    def data_root(self) -> Path:
        """Where the data step builds datasets and tiny models."""
        raise NotImplementedError

    def begin(self) -> None:
        """The fence: this attempt's STARTED marker, before it looks at what earlier attempts left (from then on
        they stop pruning their checkpoints)."""
        if self.node == 0:
            storage.write_text(storage.join(self.uri, checkpoints.STARTED),
                               f"{socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")

    def localize(self, inputs: dict[str, str]) -> dict[str, str]:
        return dict(inputs)

    def checkpoint_roots(self, origin_run_id: str | None) -> list[str]:
        """Where this task's earlier attempts left checkpoints (newest attempt first), then — on a `resume` — every
        attempt of the origin run's same stage, then of the origin's own origin, and so on (a resume chain A -> B
        -> C where B died before its first checkpoint continues from A's). Raises OriginUnreachable when an origin
        run's outputs cannot be reached: starting from step 0 instead would silently throw its work away."""
        roots = [storage.join(attempt_uri(self.cfg, self.run_id, self.stage, k), "checkpoints")
                 for k in reversed(range(self.attempt))]
        if origin_run_id:
            seen = {self.run_id}
            origin: str | None = str(origin_run_id)
            while origin and origin not in seen:
                seen.add(origin)
                roots += self._origin_roots(origin)
                origin = origin_of(self.cfg.storage_uri, origin)
            if self.node == 0:
                storage.write_text(run_uri(self.cfg, self.run_id, ORIGIN), f"{origin_run_id}\n")
        return roots

    def _origin_roots(self, origin_run_id: str) -> list[str]:
        run_root = run_uri(self.cfg, origin_run_id)
        origin = stage_uri(self.cfg, origin_run_id, self.stage)
        if not storage.is_remote(run_root) and not Path(run_root).is_dir():
            raise OriginUnreachable(
                f"[{self.stage}] resume: origin run {origin_run_id} stored its stage outputs and checkpoints under "
                f"{run_root}, which this machine cannot reach; resume where that directory is, or use an s3:// "
                f"run.storage_root (or Metaflow's S3 datastore) so every machine can")
        try:
            attempts = [n for n in storage.list_dirs(origin) if n.startswith("attempt-")]
        except Exception as err:  # credentials, endpoint, bucket: say which, never fall back to step 0
            raise OriginUnreachable(f"[{self.stage}] resume: cannot reach origin run {origin_run_id}'s checkpoints "
                                    f"at {origin}: {type(err).__name__}: {err}") from err
        attempts.sort(key=lambda n: int(n.split("-")[1]), reverse=True)
        print(f"[{self.stage}] resume: origin run {origin_run_id} has {len(attempts)} attempt(s) of this stage under "
              f"{origin}", flush=True)
        return [storage.join(origin, n, "checkpoints") for n in attempts]

    def publish(self, result: dict, downloaded: dict[str, str]) -> dict:
        return result

    def models_here(self, inputs: dict[str, str]) -> dict[str, str]:
        """The hub models among a stage's inputs (pinned `id@commit`), downloaded once on this machine before its
        processes start; returns the environment that has them load those copies without touching the network —
        in a pod from a cache on its own disk (`<scratch>/huggingface`), unless HF_HOME or HF_HUB_CACHE names one
        of yours (a shared cache)."""
        from rlhf_lib import hub

        env = {"HF_HUB_OFFLINE": "1"}
        if in_pod() and not (os.environ.get("HF_HOME") or os.environ.get("HF_HUB_CACHE")):
            os.environ["HF_HOME"] = env["HF_HOME"] = str(storage.scratch_root() / "huggingface")
        for value in inputs.values():
            hub.download(value)
        return env

    def close(self) -> None:
        """Free what only this attempt needed (called whether the stage succeeded or not)."""


class LocalWorkspace(Workspace):
    @property
    def work(self) -> Path:
        root = Path(self.uri)
        return root if self.node == 0 else root / f"node-{self.node}"

    @property
    def lock_root(self) -> Path:
        return self.cfg.local_root

    @property
    def data_root(self) -> Path:
        """The local storage root itself: datasets and tiny models built from the same sources, seed and specs
        are shared by every run that uses it."""
        return self.cfg.local_root


class S3Workspace(Workspace):
    @property
    def scratch(self) -> Path:
        return storage.scratch_root() / FLOW_NAME / self.run_id / self.stage / f"attempt-{self.attempt}"

    @property
    def work(self) -> Path:
        return self.scratch / ("out" if self.node == 0 else f"node-{self.node}")

    @property
    def lock_root(self) -> Path:
        return storage.scratch_root()

    @property
    def data_root(self) -> Path:
        """This attempt's own output directory: built in scratch, then published under its prefix."""
        return self.work

    def localize(self, inputs: dict[str, str]) -> dict[str, str]:
        """S3 inputs downloaded into this attempt's own scratch (freed with it)."""
        return {k: storage.localize(v, self.scratch / "inputs") for k, v in inputs.items()}

    def publish(self, result: dict, downloaded: dict[str, str]) -> dict:
        """Upload the finished stage's directory to this attempt's prefix (checkpoints are there already),
        `result.json` last, with every local path in it turned into its URI (downloaded inputs named by where they
        came from). Returns the rewritten result."""
        work = self.work
        prefixes = {str(work.resolve()): self.uri, str(work): self.uri, **downloaded}
        result = _rewrite(result, prefixes)
        atomic_write_json(work / RESULT_FILE, result)
        storage.upload_dir(work, self.uri, last=(RESULT_FILE,), skip_top=("checkpoints",))
        print(f"[storage] uploaded {work} -> {self.uri}", flush=True)
        return result

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
