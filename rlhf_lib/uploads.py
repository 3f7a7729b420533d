"""The background upload pool: checkpoints and snapshots stored elsewhere (S3) while the training goes on."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


class Uploads:
    """Checkpoint and snapshot uploads, on a background thread, one at a time and in order: while rank 0 stores a
    checkpoint the training goes on, so the other ranks never wait at a collective for an upload (a slow one would
    outlast the process group's timeout). Each upload reads a snapshot of its directory (hard links, taken when
    it is submitted), so pruning or the HF Trainer's rotation may delete the checkpoint meanwhile; when uploads fall
    behind the checkpoints, those snapshots wait on the local disk (said). A stage waits for all of them before it
    writes its result (`wait`), when the other processes no longer wait for it; a failed upload fails the stage."""

    def __init__(self):
        self._pool = None
        self._pending: list[tuple[int, object]] = []  # (step, future), oldest first

    def submit(self, step: int, fn, *args, **kwargs) -> None:
        from concurrent.futures import ThreadPoolExecutor

        for _, future in self._pending:
            if future.done():
                future.result()  # a failed upload fails the stage at the next checkpoint
        self._pending = [(s, f) for s, f in self._pending if not f.done()]
        behind = {s for s, _ in self._pending} - {step}
        if len(behind) > 1:
            print(f"[checkpoints] uploads are behind: steps {sorted(behind)} still to store; their checkpoints wait "
                  f"on the local disk", flush=True)
        self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending.append((step, self._pool.submit(fn, *args, **kwargs)))

    def submit_dir(self, step: int, directory: Path, fn, *args, **kwargs) -> None:
        """`fn(snapshot, *args, **kwargs)` in the background, on a hard-linked snapshot of `directory` (removed
        once `fn` returns)."""
        directory = Path(directory)
        snapshot = directory.with_name(f".upload-{directory.name}-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copytree(directory, snapshot, copy_function=os.link)
        except OSError:  # another filesystem: a copy
            shutil.rmtree(snapshot, ignore_errors=True)
            shutil.copytree(directory, snapshot)

        def upload():
            try:
                return fn(snapshot, *args, **kwargs)
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)

        self.submit(step, upload)

    def wait(self) -> None:
        """Until every upload submitted so far is stored; raises the first one's error."""
        pending, self._pending = self._pending, []
        for _, future in pending:
            future.result()


UPLOADS = Uploads()
