"""Preemption at the recipe's scale: resume is a collective, a storage fault is never "no checkpoint", a torn
snapshot is refused, an attempt prunes only while it holds the lease, and a run cleans up after itself. Against
the local S3 server (moto's), through a proxy that answers chosen requests with errors (tests/faulty_proxy.py)."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, _free_port
from faulty_proxy import FaultyProxy
from rlhf_lib import checkpoints, cleanup, storage


def _checkpoint(root: Path, step: int, marker: bool = True) -> Path:
    path = root / f"step-{step:06d}"
    path.mkdir(parents=True)
    (path / "weights.bin").write_text("w" * 100)
    (path / "state.json").write_text(json.dumps({"step": step}))
    if marker:
        (path / checkpoints.MARKER).write_text(json.dumps({"step": step}))
    return path


def _load(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def _stored(s3_env, tmp_path, steps=(2, 4), run="17") -> str:
    remote = f"s3://{s3_env['BUCKET']}/rlhf/RLHFFlow/{run}/ppo/attempt-0/checkpoints"
    for step in steps:
        checkpoints.publish(_checkpoint(tmp_path / "written", step), remote)
    return remote


LARGE = storage.BULK_BYTES + 2**20  # a checkpoint this large moves through metaflow.S3's workers, not boto3's


def _checkpoint_of(root: Path, step: int, size: int) -> Path:
    path = _checkpoint(root, step)
    with open(path / "weights.bin", "wb") as fh:  # incompressible, as weights are
        fh.write(os.urandom(size))
    return path


@contextlib.contextmanager
def _small_disk(where: Path, megabytes: int, full: bool):
    """A tmpfs of `megabytes` at `where` (filled up when `full`): a disk that runs out. Needs root (mount)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a full disk is simulated with a tmpfs mount, which needs root")
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)], check=True)
    try:
        if full:
            with open(where / "filler", "wb") as fh:
                with contextlib.suppress(OSError):
                    while True:
                        fh.write(b"x" * 2**16)
                        fh.flush()
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("size", [100, LARGE], ids=["small-boto3", "32MB-metaflow.S3"])
@pytest.mark.parametrize("fault", ["403", "503", "disk-full"])
def test_a_storage_fault_reading_a_checkpoint_fails_the_stage(fault, size, s3_env, tmp_path, capsys, monkeypatch):
    """A persistent AccessDenied (a permissions slip), SlowDown past every retry (throttling) or a full disk, while
    the newest checkpoint downloads — on boto3's path (a small checkpoint) and on metaflow.S3's (one of 32 MB or
    more, as every full-size checkpoint is): the stage fails naming the location and the error; it neither falls
    back to an older checkpoint nor starts at step 0."""
    import metaflow.metaflow_config as metaflow_config
    from metaflow.plugins.datatools.s3 import s3 as metaflow_s3

    remote = f"s3://{s3_env['BUCKET']}/rlhf/RLHFFlow/17/ppo/attempt-0/checkpoints"
    for step in (2, 4):
        checkpoints.publish(_checkpoint_of(tmp_path / "written", step, size), remote)
    proxy = None
    if fault != "disk-full":
        upstream = s3_env["METAFLOW_S3_ENDPOINT_URL"].rsplit(":", 1)
        proxy = FaultyProxy(upstream[0].removeprefix("http://"), int(upstream[1]), status=int(fault),
                            match=lambda line: line.startswith(b"GET") and b"/step-000004/weights.bin" in line)
        monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", proxy.url)
    # Retries cut short (a persistent fault outlasts any number): boto3's, and metaflow.S3's in this process and
    # in its worker processes (which read the environment).
    monkeypatch.setattr(metaflow_config, "S3_CLIENT_RETRY_CONFIG", {"max_attempts": 2, "mode": "standard"})
    monkeypatch.setenv("METAFLOW_S3_CLIENT_RETRY_CONFIG", json.dumps({"max_attempts": 2, "mode": "standard"}))
    for name in ("S3_RETRY_COUNT", "S3_TRANSIENT_RETRY_COUNT"):
        monkeypatch.setattr(metaflow_s3, name, 1)
        monkeypatch.setenv(f"METAFLOW_{name}", "1")
    disk = _small_disk(tmp_path / "disk", 8, full=size < LARGE) if fault == "disk-full" else \
        contextlib.nullcontext(tmp_path)
    try:
        with disk as where, pytest.raises(Exception) as raised:
            checkpoints.resume_point("ppo", [remote], where / "attempt-1", _load)
    finally:
        if proxy:
            proxy.close()
    assert not checkpoints.unusable(raised.value), raised.value
    printed = capsys.readouterr().out
    said = [line for line in printed.splitlines() if f"checkpoint {remote}/step-000004 could not be read (" in line]
    assert said and said[0].endswith("failing the stage rather than starting over"), printed
    assert type(raised.value).__name__ in said[0]
    assert "starting at step 0" not in printed and "trying" not in printed
    assert proxy is None or proxy.matched >= 1


def test_a_fault_listing_the_checkpoints_fails_the_stage(s3_env, tmp_path, capsys, monkeypatch):
    """SlowDown past every retry on the newest checkpoint's marker, read while the checkpoints are listed."""
    import metaflow.metaflow_config as metaflow_config
    from botocore.exceptions import ClientError

    remote = _stored(s3_env, tmp_path)
    upstream = s3_env["METAFLOW_S3_ENDPOINT_URL"].rsplit(":", 1)
    proxy = FaultyProxy(upstream[0].removeprefix("http://"), int(upstream[1]), status=503,
                        match=lambda line: line.startswith(b"GET") and b"/step-000004/COMPLETE" in line)
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", proxy.url)
    monkeypatch.setattr(metaflow_config, "S3_CLIENT_RETRY_CONFIG", {"max_attempts": 2, "mode": "standard"})
    try:
        with pytest.raises(ClientError, match="SlowDown"):
            checkpoints.resume_point("ppo", [remote], tmp_path / "attempt-1", _load)
    finally:
        proxy.close()
    printed = capsys.readouterr().out
    assert f"the checkpoints in {remote} could not be read (ClientError" in printed
    assert "starting at step 0" not in printed


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"), MemoryError(),
                                   PermissionError(13, "Permission denied"), KeyboardInterrupt()])
def test_an_error_nobody_classified_is_a_fault_not_a_corrupt_checkpoint(error):
    assert not checkpoints.unusable(error)


def test_what_is_not_there_or_does_not_parse_is_a_corrupt_checkpoint(tmp_path):
    import torch

    torn = tmp_path / "state.pt"
    torn.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # a torn torch archive: torch says RuntimeError
    with pytest.raises(checkpoints.Corrupt) as raised:
        checkpoints.parse_file(torn, lambda f: torch.load(f, weights_only=True))
    for err in (raised.value, storage.Gone("x"), FileNotFoundError("x"), json.JSONDecodeError("x", "", 0)):
        assert checkpoints.unusable(err), err


def test_a_checkpoint_without_its_marker_falls_back_to_the_one_before(s3_env, tmp_path, capsys):
    remote = _stored(s3_env, tmp_path, steps=(2,))
    storage.upload_dir(_checkpoint(tmp_path / "torn", 4, marker=False), f"{remote}/step-000004")  # cut off
    with pytest.warns(UserWarning, match="step-000004"):
        path, state = checkpoints.resume_point("ppo", [remote], tmp_path / "attempt-1", _load)
    assert state == {"step": 2} and path.name == "step-000002"


def test_a_snapshot_without_its_marker_is_skipped_by_evaluate(tmp_path, capsys):
    from rlhf_lib.stages.evaluate import snapshots

    good = _checkpoint(tmp_path / "snapshots", 2)
    _checkpoint(tmp_path / "snapshots", 4, marker=False)  # preempted while it was written or copied
    assert snapshots(str(tmp_path / "snapshots")) == [(2, good)]
    assert (f"[evaluate] snapshot {tmp_path / 'snapshots' / 'step-000004'} has no COMPLETE marker (cut off while it "
            f"was written): skipped") in capsys.readouterr().out


def test_a_reader_fences_the_pruning_of_the_checkpoints_it_reads(tmp_path, capsys):
    """A run resumed from another marks the checkpoint it reads; from then on the origin's attempts (a pod of the
    origin still running) do not delete that one — checked right before each delete — and prune the rest."""
    origin = tmp_path / "RLHFFlow" / "5" / "ppo" / "attempt-0" / "checkpoints"
    for step in (1, 2, 3):
        checkpoints.save(origin, step, lambda tmp: (tmp / "state.json").write_text("{}"), keep=2)
    assert [s for s, _ in checkpoints.list_checkpoints(origin)] == [2, 3]
    resumed = tmp_path / "RLHFFlow" / "6" / "ppo" / "attempt-0"
    found = checkpoints.resume_point("ppo", [str(origin)], resumed, lambda p: p,
                                     own_uri=str(resumed / "checkpoints"))
    assert found and found[0].name == "step-000003"
    mark = tmp_path / "RLHFFlow" / "5" / "ppo" / checkpoints.READING / "RLHFFlow-6-ppo-attempt-0"
    assert mark.read_text().strip() == str(origin / "step-000003")
    for step in (4, 5, 6):  # the origin's pod goes on writing
        checkpoints.save(origin, step, lambda tmp: (tmp / "state.json").write_text("{}"), keep=2)
    assert [s for s, _ in checkpoints.list_checkpoints(origin)] == [3, 5, 6]
    assert f"RLHFFlow-6-ppo-attempt-0 read(s) {origin / 'step-000003'}: keeping it" in capsys.readouterr().out


def test_a_mark_removed_while_the_marks_are_read_protects_nothing(tmp_path, monkeypatch):
    """A reader's run that ends takes its mark away; a pruner that listed the mark just before reads nothing of
    it and goes on (a mark that is gone is not a storage fault)."""
    stage = tmp_path / "RLHFFlow" / "5" / "ppo"
    root = stage / "attempt-0" / "checkpoints"
    for step in (1, 2):
        checkpoints.save(root, step, lambda tmp: (tmp / "state.json").write_text("{}"))
    checkpoints.mark_reading(str(root / "step-000001"), "RLHFFlow-6-ppo-attempt-0")
    read_text = storage.read_text

    def vanishing(uri):
        if checkpoints.READING in str(uri):
            raise FileNotFoundError(uri)
        return read_text(uri)

    monkeypatch.setattr(storage, "read_text", vanishing)
    assert checkpoints.readers(root) == {}
    checkpoints.prune(root, 1, "local")
    assert [s for s, _ in checkpoints.list_checkpoints(root)] == [2]


def test_retried_attempts_keep_pruning_their_own_checkpoints(tmp_path):
    """Each retry continues from its predecessor's newest checkpoint (marking it as read) and still holds
    keep_checkpoints in its own directory: its own mark protects what it read, not what it writes."""
    stage = tmp_path / "RLHFFlow" / "9" / "ppo"
    write = lambda tmp: (tmp / "state.json").write_text("{}")  # noqa: E731
    for step in (1, 2, 3):
        checkpoints.save(stage / "attempt-0" / "checkpoints", step, write, keep=2)
    for attempt in (1, 2):
        out = stage / f"attempt-{attempt}"
        (out / checkpoints.STARTED).parent.mkdir(parents=True)
        (out / checkpoints.STARTED).write_text("x")
        roots = [str(stage / f"attempt-{k}" / "checkpoints") for k in reversed(range(attempt))]
        found = checkpoints.resume_point("ppo", roots, out, lambda p: p, own_uri=str(out / "checkpoints"))
        start = checkpoints.step_of(found[0].name)
        assert start == 3 * attempt
        for step in range(start + 1, start + 4):
            checkpoints.save(out / "checkpoints", step, write, keep=2)
        assert [s for s, _ in checkpoints.list_checkpoints(out / "checkpoints")] == [start + 2, start + 3]
    assert len(list((stage / checkpoints.READING).iterdir())) == 2


def _resume_gang(root: str, tmp_path: Path, fail_rank: int | None = None, timeout: int = 300,
                 group_timeout: int = 60) -> list:
    """Four processes on two "nodes" (two torch.distributed.run launchers of two processes each, gloo), each node
    with its own stage directory, resuming from `root`. Returns (exit code, output) of each node's launcher."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(ROOT / "tests" / "resume_worker.py"), root, str(tmp_path / f"node-{node}")]
        cmd += [str(fail_rank)] if fail_rank is not None else []
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1",
                                           "RESUME_WORKER_GROUP_TIMEOUT_S": str(group_timeout)}))
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


def test_four_processes_resume_as_one_or_fail_together(s3_env, tmp_path):
    """Resume is a collective: rank 0 chooses, each node downloads the checkpoint once, every rank continues from
    the same step. When one rank's copy is gone before it loads, every rank fails, loudly — none hangs."""
    remote = _stored(s3_env, tmp_path, steps=(2, 4))
    ok = _resume_gang(remote, tmp_path / "ok")
    assert [code for code, _ in ok] == [0, 0], ok
    for node, (_, log) in enumerate(ok):
        assert log.count(f"downloading checkpoint {remote}/step-000004") == 1, log  # once per node
        ranks = (0, 1) if node == 0 else (2, 3)
        assert sorted(line for line in log.splitlines() if line.startswith("RESUMED")) == \
            [f"RESUMED {r} 4" for r in ranks]
    failed = _resume_gang(remote, tmp_path / "failed", fail_rank=3, timeout=180)
    assert all(code != 0 for code, _ in failed), failed
    assert all("do not agree on the checkpoint to continue from" in log for _, log in failed), failed


def test_a_fault_on_rank_zero_ends_every_process_of_the_gang_naming_it(s3_env, tmp_path, monkeypatch):
    """Rank 0 chooses and downloads before it tells the others; when its download is refused (a persistent 403),
    every rank of a four-process gang exits within a minute naming that error — none waits out the process
    group's timeout at the broadcast."""
    import time

    remote = _stored(s3_env, tmp_path, steps=(2, 4))
    upstream = s3_env["METAFLOW_S3_ENDPOINT_URL"].rsplit(":", 1)
    proxy = FaultyProxy(upstream[0].removeprefix("http://"), int(upstream[1]), status=403,
                        match=lambda line: line.startswith(b"GET") and b"/step-000004/weights.bin" in line)
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", proxy.url)
    started = time.monotonic()
    try:
        failed = _resume_gang(remote, tmp_path / "failed", timeout=120, group_timeout=600)
    finally:
        proxy.close()
    assert time.monotonic() - started < 60, failed
    assert all(code != 0 for code, _ in failed), failed
    assert "AccessDenied" in failed[0][1] and "failing the stage rather than starting over" in failed[0][1]
    for rank in (1, 2, 3):
        node_log = failed[0 if rank < 2 else 1][1]
        assert f"rank {rank} fails the stage with it" in node_log and "rank 0 failed choosing" in node_log
    assert proxy.matched >= 1


def test_a_finished_run_keeps_only_what_its_artifacts_reference(s3_env, tmp_path):
    """`end`: a failed attempt (checkpoints, snapshots), the READING marks and an upload a killed pod left open
    go; the attempts the artifacts point into stay; with run.keep_failed_attempts the failed attempt stays too."""
    import boto3

    root = f"s3://{s3_env['BUCKET']}/rlhf"
    run = f"{root}/RLHFFlow/21"
    for attempt in (0, 1):
        checkpoints.publish(_checkpoint(tmp_path / f"a{attempt}", 3), f"{run}/ppo/attempt-{attempt}/checkpoints")
        storage.upload_dir(_checkpoint(tmp_path / f"s{attempt}", 3), f"{run}/ppo/attempt-{attempt}/snapshots/s")
    storage.upload_dir(_checkpoint(tmp_path / "m", 1), f"{run}/merge/attempt-0/merged")
    storage.write_text(f"{run}/ppo/{checkpoints.READING}/RLHFFlow-21-ppo-attempt-1", "x")
    s3 = boto3.client("s3", endpoint_url=s3_env["METAFLOW_S3_ENDPOINT_URL"])
    s3.create_multipart_upload(Bucket=s3_env["BUCKET"], Key="rlhf/RLHFFlow/21/ppo/attempt-0/merged/model.bin")
    artifacts = {"ppo_model_path": f"{run}/ppo/attempt-1/merged", "sft_merged_path": f"{run}/merge/attempt-0/merged",
                 "datasets": {"x": {"uri": f"{run}/merge/attempt-0/merged"}}, "seed": 3}

    kept = cleanup.clean_run(root, "21", artifacts, keep_failed=True)
    assert kept == {"removed": [], "aborted_uploads": 1, "warnings": []}
    assert cleanup.unreferenced(run, cleanup.paths_in(artifacts)) == [f"{run}/ppo/attempt-0"]

    done = cleanup.clean_run(root, "21", artifacts)
    assert done["removed"] == [f"{run}/ppo/attempt-0"]
    left = storage.list_files(run)
    assert left and all(f.startswith(("ppo/attempt-1/", "merge/attempt-0/")) for f in left), left
    assert not s3.list_multipart_uploads(Bucket=s3_env["BUCKET"]).get("Uploads")


def _ppo_gang(cfg: Path, inputs: dict, out: Path, checkpoint_uri: str, resume_from: str | None = None,
              nodes: int = 2, env: dict | None = None) -> list:
    """The PPO stage as two processes on each of `nodes` "nodes" (a torch.distributed.run launcher each, gloo),
    each node writing to its own directory, rank 0 storing checkpoints at `checkpoint_uri`."""
    port = _free_port()
    procs = []
    for node in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node),
               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "rlhf_lib.stages.ppo", "--config", str(cfg), "--output", str(out / f"node-{node}"),
               "--checkpoint-uri", checkpoint_uri, *[a for k, v in inputs.items() for a in ("--input", f"{k}={v}")]]
        cmd += ["--resume-from", resume_from] if resume_from else []
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                                           **(env or {})}))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * nodes, "\n".join(log[-3000:] for log in logs)
    return logs


def _ppo_inputs(tiny_policy: str, tmp_path: Path, steps: int = 6, **run) -> tuple[Path, dict]:
    """A small PPO stage's config (run.json) and inputs: the tiny policy, a tiny reward model, sample prompts."""
    from conftest import write_config
    from rlhf_lib import config, models
    from rlhf_lib.config import DatasetSource, TinyModelSpec
    from rlhf_lib.data import lake

    reward = models.prepare("tiny", TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, ffn_dim=64,
                                                  vocab_size=400, max_positions=128), "reward", tmp_path, seed=0)
    prompts = lake.materialise("prompts", DatasetSource(), "train", tmp_path, seed=0, sample_rows=80)["uri"]
    toml = write_config(tmp_path / "cfg.toml", {
        "run": {"cpu_threads": 1, "wandb_mode": "disabled", "process_group_timeout_s": 120, **run},
        "ppo": {"steps": steps, "save_freq": 2, "keep_checkpoints": 3, "batch_size": 8, "mini_batch_size": 2,
                "ppo_epochs": 1, "min_response_length": 4, "max_response_length": 8, "stop_at_eos": False,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}})
    (tmp_path / "run.json").write_text(config.load(toml).to_json())
    return tmp_path / "run.json", {"sft_model": tiny_policy, "reward_model": reward, "prompts": prompts}


def _assert_same_stats(got: list[dict], expected: list[dict]) -> None:
    import math

    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        for key, value in b.items():
            if isinstance(value, float):
                assert math.isclose(a[key], value, rel_tol=1e-4, abs_tol=1e-4), (a["step"], key, a[key], value)


@pytest.mark.slow
def test_four_ppo_processes_resumed_from_s3_end_as_an_uninterrupted_run(s3_env, tiny_policy, tmp_path):
    """PPO on 4 processes (2 nodes x 2), its checkpoints in S3; its newest checkpoint lost (died before it was
    stored); a new attempt of 4 processes resumes: every rank continues from the same step, each node downloads the
    checkpoint once, and the stats equal the uninterrupted run's."""
    cfg, inputs = _ppo_inputs(tiny_policy, tmp_path)
    task = f"s3://{s3_env['BUCKET']}/rlhf/RLHFFlow/31/ppo"
    _ppo_gang(cfg, inputs, tmp_path / "whole", f"{task}/attempt-0/checkpoints")
    whole = json.loads((tmp_path / "whole" / "node-0" / "result.json").read_text())
    storage.delete_tree(f"{task}/attempt-0/checkpoints/step-000006")  # lost: the attempt died before storing it

    logs = _ppo_gang(cfg, inputs, tmp_path / "again", f"{task}/attempt-1/checkpoints",
                     resume_from=f"{task}/attempt-0/checkpoints")
    resumed = json.loads((tmp_path / "again" / "node-0" / "result.json").read_text())
    for node, log in enumerate(logs):
        assert log.count(f"downloading checkpoint {task}/attempt-0/checkpoints/step-000004") == 1, log[-3000:]
        for rank in ((0, 1) if node == 0 else (2, 3)):
            assert f"[ppo] rank {rank}/4: continuing from step 4" in log, log[-3000:]
    assert resumed["resumed_from_step"] == 4 and resumed["metrics"]["ranks"] == 4
    assert len(resumed["stats"]) == 6
    _assert_same_stats(resumed["stats"], whole["stats"])


@pytest.mark.slow
def test_a_gang_survives_an_upload_slower_than_its_process_group_timeout(s3_env, tiny_policy, tmp_path):
    """Two PPO processes with an 8 s process-group timeout; every checkpoint's upload held 10 s by a proxy. Rank 0
    stores checkpoints in the background, so no rank waits at a collective for an upload: the stage ends, with the
    stats of the same stage whose uploads were not held, and every checkpoint in S3."""
    cfg, inputs = _ppo_inputs(tiny_policy, tmp_path, steps=4, process_group_timeout_s=8)
    task = f"s3://{s3_env['BUCKET']}/rlhf/RLHFFlow/41/ppo"
    _ppo_gang(cfg, inputs, tmp_path / "quick", f"{task}/attempt-0/checkpoints", nodes=1)
    upstream = s3_env["METAFLOW_S3_ENDPOINT_URL"].removeprefix("http://").split(":")
    slow = FaultyProxy(upstream[0], int(upstream[1]), delay=10.0,
                       match=lambda line: line.startswith(b"PUT") and line.split(b" ")[1].endswith(b"/COMPLETE")
                       and b"/checkpoints/step-" in line)
    try:
        _ppo_gang(cfg, inputs, tmp_path / "slow", f"{task}/attempt-1/checkpoints", nodes=1,
                  env={"METAFLOW_S3_ENDPOINT_URL": slow.url})
    finally:
        slow.close()
    assert slow.matched == 2  # steps 2 and 4, each held past the timeout
    got = json.loads((tmp_path / "slow" / "node-0" / "result.json").read_text())
    _assert_same_stats(got["stats"], json.loads((tmp_path / "quick" / "node-0" / "result.json").read_text())["stats"])
    assert [s for s, _ in checkpoints.list_checkpoints(f"{task}/attempt-1/checkpoints")] == [2, 4]


def test_a_refused_cleanup_ends_the_run_with_a_warning_naming_the_permission(s3_env, tmp_path, monkeypatch):
    """The credentials may write but not list or abort multipart uploads: `end`'s cleanup says so — the
    permission and the command that cleans up later — and the run still ends."""
    root = f"s3://{s3_env['BUCKET']}/rlhf"
    storage.upload_dir(_checkpoint(tmp_path / "m", 1), f"{root}/RLHFFlow/23/merge/attempt-0/merged")
    upstream = s3_env["METAFLOW_S3_ENDPOINT_URL"].rsplit(":", 1)
    proxy = FaultyProxy(upstream[0].removeprefix("http://"), int(upstream[1]), status=403,
                        match=lambda line: line.startswith(b"GET") and b"uploads" in line.split(b" ")[1])
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", proxy.url)
    try:
        done = cleanup.clean_run(root, "23", {"m": f"{root}/RLHFFlow/23/merge/attempt-0/merged"})
    finally:
        proxy.close()
    assert proxy.matched >= 1 and len(done["warnings"]) == 1, done
    assert "s3:ListBucketMultipartUploads and s3:AbortMultipartUpload" in done["warnings"][0]
    assert "python -m rlhf_lib.cleanup 23" in done["warnings"][0]


def _attempt(root: Path, run: str, stage: str, attempt: int, *steps: int) -> Path:
    out = root / "RLHFFlow" / run / stage / f"attempt-{attempt}"
    out.mkdir(parents=True)
    for step in steps:
        checkpoints.save(out / "checkpoints", step, lambda tmp: (tmp / "state.json").write_text("{}"))
    return out


def test_cleanup_compares_places_resolved_and_removes_only_its_own_runs_attempts(tmp_path):
    """The storage root is reached through a symlink while the artifacts hold resolved paths: nothing they point
    into goes. A resumed run (6, from 5) removes its own unreferenced attempts and its own READING marks, never
    its origin's attempts (another resume of 5 may still need them) nor another reader's marks."""
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    failed_origin = _attempt(link, "5", "ppo", 0, 2)
    kept = _attempt(link, "6", "ppo", 1, 4)
    failed_own = _attempt(link, "6", "ppo", 0)
    merged = _attempt(link, "5", "merge", 0)
    (real / "RLHFFlow" / "6" / "ORIGIN").write_text("5\n")
    for reader in ("RLHFFlow-6-ppo-attempt-0", "RLHFFlow-7-ppo-attempt-0"):
        checkpoints.mark_reading(str(failed_origin / "checkpoints" / "step-000002"), reader)
    artifacts = {"ppo_model_path": str(real / "RLHFFlow" / "6" / "ppo" / "attempt-1" / "merged"),
                 "sft_merged_path": str(real / "RLHFFlow" / "5" / "merge" / "attempt-0" / "merged")}
    done = cleanup.clean_run(str(link), "6", artifacts, origin_run_id="5")
    assert done["removed"] == [str(failed_own)] and done["warnings"] == []
    assert kept.is_dir() and merged.is_dir() and failed_origin.is_dir()
    assert sorted(p.name for p in (real / "RLHFFlow" / "5" / "ppo" / checkpoints.READING).iterdir()) == \
        ["RLHFFlow-7-ppo-attempt-0"]


def test_a_resume_chain_continues_from_the_first_runs_checkpoints(tmp_path):
    """A -> B -> C: B (resumed from A) died before its first checkpoint; C, resumed from B, continues from A's
    newest checkpoint — each resume records its origin beside its outputs, and the roots follow the chain."""
    from rlhf_lib.workspace import Workspace

    from test_storage import _cfg

    _attempt(tmp_path, "A", "ppo", 0, 3, 6)
    cfg = _cfg(str(tmp_path))
    b = Workspace.of(cfg, "B", "ppo")
    assert b.checkpoint_roots("A") == [str(tmp_path / "RLHFFlow" / "A" / "ppo" / "attempt-0" / "checkpoints")]
    (tmp_path / "RLHFFlow" / "B" / "ppo" / "attempt-0").mkdir(parents=True)  # killed before its first checkpoint
    roots = Workspace.of(cfg, "C", "ppo").checkpoint_roots("B")
    assert roots == [str(tmp_path / "RLHFFlow" / "B" / "ppo" / "attempt-0" / "checkpoints"),
                     str(tmp_path / "RLHFFlow" / "A" / "ppo" / "attempt-0" / "checkpoints")]
    path, _ = checkpoints.resume_point("ppo", roots, tmp_path / "RLHFFlow" / "C" / "ppo" / "attempt-0", lambda p: p)
    assert path.name == "step-000006"
    assert cleanup.readers_of(str(tmp_path), "A") == {"B"} and cleanup.readers_of(str(tmp_path), "B") == {"C"}
