"""Run a stage module as a subprocess: under `accelerate launch` on several GPUs, as a plain process otherwise.

One process per GPU the stage's step asked for (multi-GPU data parallel, `accelerate launch`), across machines
with accelerate's multi-machine launch or torch.distributed.run; one process on one GPU or on the CPU, started as
`python -m rlhf_lib.stages.<stage>` with the settings accelerate's launcher would give it (its launcher would add
nothing else but a second interpreter start, ~4 s a stage). The stage's output is streamed live to this process's
stdout (so Metaflow's logs show training progress) and kept in `<output>/stage.log`; a non-zero exit raises
StageFailed carrying the last lines of that log.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rlhf_lib.compute import stage_gpus
from rlhf_lib.stages.contract import RESULT_FILE


ACCELERATE = "accelerate.commands.launch"  # the launchers a stage may run under (stage_command)
TORCHRUN = "torch.distributed.run"


class StageFailed(RuntimeError):
    """A stage subprocess exited non-zero or left no result.json."""

    def __init__(self, stage: str, returncode: int, log_tail: str, log_path: Path):
        self.stage, self.returncode, self.log_tail, self.log_path = stage, returncode, log_tail, log_path
        super().__init__(f"stage {stage!r} failed (exit code {returncode}); full log: {log_path}\n"
                         f"--- last lines ---\n{log_tail}")


class MachineUnfit(RuntimeError):
    """The machine a stage runs on lacks what the stage's step asked for (GPUs, disk); the message names the key."""


def cuda_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def visible_gpus() -> int:
    """GPUs this process can use. A CUDA installation that cannot count its devices is an error, not "no GPU": a
    GPU pod with broken drivers must not quietly train on its CPU."""
    import torch

    try:
        return torch.cuda.device_count()
    except Exception as err:
        raise MachineUnfit(f"cannot count this machine's GPUs ({type(err).__name__}: {err}); fix the CUDA "
                           f"installation, or set run.gpus = 0 to run on the CPU") from err


HF_DATASETS_CACHE = ".hf-datasets-cache"

@dataclasses.dataclass(frozen=True)
class Nodes:
    """The machines one stage spans (Metaflow `@parallel`): how many, which one this is, where rank 0 listens."""

    count: int = 1
    index: int = 0
    main_ip: str = "127.0.0.1"
    port: int = 29500

    @classmethod
    def of(cls, parallel, key: str = "", environ=None) -> "Nodes":
        """From `current.parallel`. The port is the one Metaflow opened for the gang (`MF_MASTER_PORT`: a JobSet's,
        from @kubernetes(port=...)) where it gives one; else derived from `key` (the run id), so that two gangs on
        one machine (local runs, tests) do not collide and every node derives the same one."""
        environ = os.environ if environ is None else environ
        given = environ.get("MF_MASTER_PORT")
        if not given:
            return cls(parallel.num_nodes, parallel.node_index, parallel.main_ip,
                       20000 + int(hashlib.sha1(key.encode()).hexdigest(), 16) % 20000)
        if not given.isdigit() or not 0 < int(given) < 65536:
            # Metaflow writes str(None) when the gang step declares no port (decorators.StepCompute gives it one)
            raise MachineUnfit(f"MF_MASTER_PORT is {given!r}, not a port: the gang step declared none; set "
                               f"run.master_port (which becomes @kubernetes(port=...)) or METAFLOW_KUBERNETES_PORT")
        return cls(parallel.num_nodes, parallel.node_index, parallel.main_ip, int(given))


def stage_command(stage: str, stage_args: list[str], num_gpus: int, nodes: Nodes | None = None,
                  module: str | None = None) -> list[str]:
    """The command that runs a stage (module `rlhf_lib.stages.<stage>` unless `module` names another) on
    `num_gpus` GPUs (0: the CPU): plain python for one process; accelerate for several GPUs of one machine; across
    machines, accelerate's multi-machine launch on GPUs, torch.distributed.run (gloo) on CPUs (accelerate wants mpirun
    for multi-node CPU)."""
    gpus = stage_gpus(stage, num_gpus)
    module = ["-m", module or f"rlhf_lib.stages.{stage}", *stage_args]
    if nodes is not None and nodes.count > 1:
        if gpus == 0:
            return [sys.executable, "-m", TORCHRUN, "--nnodes", str(nodes.count), "--node_rank",
                    str(nodes.index), "--nproc_per_node", "1", "--master_addr", nodes.main_ip, "--master_port",
                    str(nodes.port), *module]
        return [sys.executable, "-m", ACCELERATE, "--multi_gpu", "--num_machines",
                str(nodes.count), "--machine_rank", str(nodes.index), "--main_process_ip", nodes.main_ip,
                "--main_process_port", str(nodes.port), "--num_processes", str(nodes.count * gpus),
                "--mixed_precision", "no", "--dynamo_backend", "no", *module]
    if gpus <= 1:  # one process: nothing for a launcher to do (single_process_env gives its settings)
        return [sys.executable, *module]
    return [sys.executable, "-m", ACCELERATE, "--num_machines", "1", "--dynamo_backend", "no",
            "--num_processes", str(gpus), "--mixed_precision", "no", "--multi_gpu", *module]


def stage_process(pid: int, stage: str):
    """The innermost `rlhf_lib.stages.<stage>` process under `pid` (not a launcher that wraps it), or None: what a
    test or a benchmark kills to stand for a crashed stage."""
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue  # it ended while we looked
        if f"rlhf_lib.stages.{stage}" in cmd and ACCELERATE not in cmd and TORCHRUN not in cmd:
            return child
    return None


def local_gang_nodes() -> list[int]:
    """The pids of the other nodes of a local `@parallel` gang: Metaflow's local runtime starts them from node 0's
    task process (`step ... --split-index K`), so they are this process's children. None in a pod."""
    import psutil

    found = []
    for child in psutil.Process().children():
        try:
            if "--split-index" in child.cmdline():
                found.append(child.pid)
        except psutil.ZombieProcess:  # a node that already ended (its command line is gone): its status tells
            found.append(child.pid)
        except psutil.Error:
            continue
    return found


def exit_status(pid: int) -> int | None:
    """A child's exit status if it has ended (a signal as its negative number), None while it runs; the child
    stays waitable (WNOWAIT), so its parent — Metaflow's runtime — still collects it."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None or info.si_pid == 0:
        return None
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


def watch_local_gang(proc: subprocess.Popen, stage: str, poll_s: float = 1.0) -> None:
    """On node 0 of a local gang: end this node's stage as soon as another node ends with an error — before it
    joined the rendezvous (a crash at import, a kill), node 0 would otherwise wait out torch's store timeout
    (900 s). On a cluster the JobSet's failure policy ends every pod of the gang instead."""
    import threading
    import time

    if not hasattr(os, "waitid"):
        return
    peers = local_gang_nodes()

    def watch() -> None:
        while proc.poll() is None:
            for pid in peers:
                status = exit_status(pid)
                if status:
                    print(f"[launch] another node of the {stage} gang (pid {pid}) ended with exit status {status} "
                          f"before the gang finished: ending this node too (that node's log says why)", flush=True)
                    proc.terminate()
                    return
            time.sleep(poll_s)

    if peers:
        threading.Thread(target=watch, name=f"{stage}-gang-watch", daemon=True).start()


def single_process_env(gpus: int) -> dict[str, str]:
    """What `accelerate launch --num_processes 1` would set for one process on one GPU or on the CPU. Mixed
    precision is "no" for the launcher on every device: the stage's precision plan (run.precision,
    rlhf_lib/precision.py) decides its autocast itself, so a launcher's bf16 cannot add an autocast to an fp32 plan."""
    if gpus:
        return {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
    return {"ACCELERATE_USE_CPU": "true", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}


@contextlib.contextmanager
def machine_lock(root: Path, name: str):
    """Hold `<root>/.stage.lock` while a stage runs: one stage at a time on this machine. An OS file lock
    (filelock: flock on Linux and macOS), released when the holder exits however it exits, so a killed step never
    leaves a stale lock."""
    from filelock import FileLock, Timeout

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / ".stage.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[{name}] waiting for another stage on this machine to finish", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def launch(stage: str, config_json: str, output: Path, inputs: dict[str, str], *, run_id: str = "standalone",
           resume_from: list[str] | str | None = None, env: dict[str, str] | None = None, tail_lines: int = 40,
           extra_args: list[str] | None = None, checkpoint_uri: str | None = None,
           nodes: Nodes | None = None, module: str | None = None, gpus: int = 0) -> dict | None:
    """Run `rlhf_lib.stages.<stage>` on `gpus` GPUs (0: on the CPU, every GPU hidden from it) and return its parsed
    result.json. `resume_from`: checkpoint directories or prefixes to continue from (the newest that loads).
    `checkpoint_uri`: this attempt's own checkpoint location (in S3 the stage also stores each checkpoint there as it
    writes it). `nodes`: this machine's place in a multi-machine stage; only node 0 (global rank 0) writes a
    result, the others return None."""
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
    for root in [resume_from] if isinstance(resume_from, str) else resume_from or []:
        stage_args += ["--resume-from", root]
    if checkpoint_uri:
        stage_args += ["--checkpoint-uri", checkpoint_uri]
    stage_args += extra_args or []
    cmd = stage_command(stage, stage_args, gpus, nodes=nodes, module=module)
    log_path = output / "stage.log"
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    child_env = {**os.environ, **(env or {})}
    used = stage_gpus(stage, gpus)
    if (nodes is None or nodes.count == 1) and used <= 1:  # stage_command: no launcher, one process
        child_env.update(single_process_env(used))
    if gpus == 0:  # run.gpus = 0 means the CPU, even on a machine that has GPUs
        child_env["CUDA_VISIBLE_DEVICES"] = ""
    # Hugging Face datasets writes Arrow copies of what a stage streams; they live as long as the stage does, in its
    # own directory, not in ~/.cache/huggingface/datasets for ever.
    datasets_cache = output / HF_DATASETS_CACHE
    child_env["HF_DATASETS_CACHE"] = str(datasets_cache)
    # The stage must import this checkout's rlhf_lib whatever the caller's working directory is.
    root = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH")) if p)
    print(f"[launch] {' '.join(cmd)}", flush=True)
    try:
        with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                          env=child_env, text=True, bufsize=1) as proc:
            if nodes is not None and nodes.count > 1 and nodes.index == 0:
                watch_local_gang(proc, stage)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                tail.append(line.rstrip("\n"))
            returncode = proc.wait()
    finally:
        shutil.rmtree(datasets_cache, ignore_errors=True)
    writes_result = nodes is None or nodes.index == 0
    if returncode != 0 or (writes_result and not result_path.exists()):
        raise StageFailed(stage, returncode, "\n".join(tail), log_path)
    if not writes_result:
        return None
    return json.loads(result_path.read_text())
