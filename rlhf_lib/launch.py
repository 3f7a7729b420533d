"""Run a stage module under `accelerate launch` as a subprocess.

One process per visible GPU (multi-GPU data parallel), one CPU process otherwise. The stage's output is
streamed live to this process's stdout (so Metaflow's logs show training progress) and kept in
`<output>/stage.log`; a non-zero exit raises StageFailed carrying the last lines of that log.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from rlhf_lib.stages.common import RESULT_FILE


class StageFailed(RuntimeError):
    """A stage subprocess exited non-zero or left no result.json."""

    def __init__(self, stage: str, returncode: int, log_tail: str, log_path: Path):
        self.stage, self.returncode, self.log_tail, self.log_path = stage, returncode, log_tail, log_path
        super().__init__(f"stage {stage!r} failed (exit code {returncode}); full log: {log_path}\n"
                         f"--- last lines ---\n{log_tail}")


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def accelerate_command(stage: str, stage_args: list[str], num_gpus: int | None = None) -> list[str]:
    gpus = visible_gpus() if num_gpus is None else num_gpus
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]
    if gpus > 0:
        cmd += ["--num_processes", str(gpus), "--mixed_precision", "bf16"]
        if gpus > 1:
            cmd += ["--multi_gpu"]
    else:
        cmd += ["--cpu", "--num_processes", "1", "--mixed_precision", "no"]
    return cmd + ["-m", f"rlhf_lib.stages.{stage}", *stage_args]


@contextlib.contextmanager
def machine_lock(root: Path, name: str):
    """Hold `<root>/.stage.lock` while a stage runs: one stage at a time on this machine. The lock is released
    when the holder exits, however it exits (a killed step never leaves a stale lock)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".stage.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[{name}] waiting for another stage on this machine to finish", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def launch(stage: str, config_json: str, output: Path, inputs: dict[str, str], *, run_id: str = "standalone",
           resume_from: str | None = None, env: dict[str, str] | None = None, tail_lines: int = 40,
           extra_args: list[str] | None = None) -> dict:
    """Run `rlhf_lib.stages.<stage>` and return its parsed result.json."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config_path = output / "run_config.json"
    config_path.write_text(config_json)
    result_path = output / RESULT_FILE
    if result_path.exists():  # a stale result from an earlier attempt must not be mistaken for this one's
        result_path.unlink()
    stage_args = ["--config", str(config_path), "--output", str(output), "--run-id", run_id]
    for name, path in inputs.items():
        stage_args += ["--input", f"{name}={path}"]
    if resume_from:
        stage_args += ["--resume-from", resume_from]
    stage_args += extra_args or []
    cmd = accelerate_command(stage, stage_args)
    log_path = output / "stage.log"
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    child_env = {**os.environ, **(env or {})}
    # The stage must import this checkout's rlhf_lib whatever the caller's working directory is.
    root = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH")) if p)
    print(f"[launch] {' '.join(cmd)}", flush=True)
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      env=child_env, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail.append(line.rstrip("\n"))
        returncode = proc.wait()
    if returncode != 0 or not result_path.exists():
        raise StageFailed(stage, returncode, "\n".join(tail), log_path)
    return json.loads(result_path.read_text())
