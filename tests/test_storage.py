"""Stage outputs and checkpoints in S3 (a real S3 server: moto's, on 127.0.0.1), and the checks `start` makes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, S3_CREDENTIALS, TEST_CONFIG, write_config
from rlhf_lib import checkpoints, config, pipeline, storage, workspace


def _ckpt(root: Path, name: str, step: int, payload: str = "w") -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(payload * 100)
    (path / "state.json").write_text(json.dumps({"step": step}))
    return path


def test_directory_round_trip(s3_env, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    (src / "result.json").write_text("{}")
    uri = f"s3://{s3_env['BUCKET']}/x/stage"
    storage.upload_dir(src, uri, last=("result.json",))
    assert storage.list_files(uri) == ["a.txt", "result.json", "sub/b.txt"]
    got = storage.download_dir(uri, tmp_path / "dst")
    assert (got / "sub" / "b.txt").read_text() == "b"
    assert not list(tmp_path.glob(".tmp-*"))  # the download went through a temporary sibling
    assert storage.localize(uri, tmp_path / "scratch") != uri
    assert storage.localize("/local/path") == "/local/path"
    assert storage.localize("facebook/opt-1.3b") == "facebook/opt-1.3b"  # a hub id passes through


def test_torn_checkpoint_upload_is_never_chosen(s3_env, tmp_path):
    remote = f"s3://{s3_env['BUCKET']}/run/ppo/attempt-0/checkpoints"
    checkpoints.publish(_ckpt(tmp_path / "local", "step-000002", 2), remote)
    # A newer checkpoint whose upload died before its marker: files there, no COMPLETE object.
    storage.upload_dir(_ckpt(tmp_path / "torn", "step-000004", 4), f"{remote}/step-000004")
    with pytest.warns(UserWarning, match="step-000004"):
        found = checkpoints.newest_first([remote])
    assert [s for s, _ in found] == [2]
    fetched = checkpoints.fetch(found[0][1], tmp_path / "fresh")
    assert fetched.name == "step-000002" and checkpoints.marked_step(fetched) == 2


def test_a_checkpoint_pruned_while_it_downloads_is_refused(s3_env, tmp_path):
    remote = f"s3://{s3_env['BUCKET']}/run/ppo/attempt-0/checkpoints"
    where = checkpoints.publish(_ckpt(tmp_path / "local", "step-000002", 2), remote)
    real_download = storage.download_dir

    def download_then_prune(uri, local):  # an earlier attempt, still running, prunes it meanwhile
        out = real_download(uri, local)
        storage.delete(uri, [checkpoints.MARKER])
        return out

    storage.download_dir = download_then_prune
    try:
        with pytest.raises(storage.StorageError, match="removed or changed while it was being downloaded"):
            checkpoints.fetch(where, tmp_path / "fresh")
    finally:
        storage.download_dir = real_download
    assert not (tmp_path / "fresh" / "step-000002").exists()


def test_hf_checkpoints_get_a_marker_and_old_ones_are_pruned(s3_env, tmp_path):
    remote = f"s3://{s3_env['BUCKET']}/run/sft/attempt-0/checkpoints"
    for step in (10, 20, 30):
        checkpoints.publish(_ckpt(tmp_path, f"checkpoint-{step}", step), remote, keep=2)
    assert [(s, w.rsplit("/", 1)[1]) for s, w in checkpoints.list_checkpoints(remote)] == \
        [(20, "checkpoint-20"), (30, "checkpoint-30")]
    assert storage.list_files(f"{remote}/checkpoint-10") == []  # every file of the pruned one is gone


def _cfg(root: str):
    return config.validate({**config.load(TEST_CONFIG).model_dump(),
                            "run": {**config.load(TEST_CONFIG).run.model_dump(), "storage_root": root}})


def test_check_root_names_a_missing_bucket(s3_env):
    started = time.time()
    problem = storage.check_root("s3://no-such-bucket-here/rlhf")
    assert "bucket 'no-such-bucket-here' does not exist" in problem and "create it" in problem
    assert time.time() - started < 10
    assert storage.check_root(f"s3://{s3_env['BUCKET']}/rlhf") is None
    assert storage.list_files(f"s3://{s3_env['BUCKET']}/rlhf") == []  # the write probe left nothing behind


@pytest.mark.parametrize("request_line, permission", [
    ((b"GET", b"uploads"), "s3:ListBucketMultipartUploads"), ((b"DELETE", b"uploadId="), "s3:AbortMultipartUpload")])
def test_check_root_names_a_missing_cleanup_permission(request_line, permission, s3_env, monkeypatch):
    """Credentials that may write but not list or abort multipart uploads (what `end`'s cleanup does): `start`
    says which permission is missing and what needs it, instead of the run failing in `end` hours later."""
    from faulty_proxy import FaultyProxy

    method, part = request_line
    upstream = s3_env["METAFLOW_S3_ENDPOINT_URL"].rsplit(":", 1)
    proxy = FaultyProxy(upstream[0].removeprefix("http://"), int(upstream[1]), status=403,
                        match=lambda line: line.startswith(method) and part in line.split(b" ")[1])
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", proxy.url)
    try:
        problem = storage.check_root(f"s3://{s3_env['BUCKET']}/rlhf")
    finally:
        proxy.close()
    assert proxy.matched == 1 and problem
    assert f"denied (AccessDenied) for {permission}, which the cleanup at the end of the run" in problem
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", f"http://{upstream[0].removeprefix('http://')}:{upstream[1]}")
    assert storage.list_files(f"s3://{s3_env['BUCKET']}/rlhf") == []  # the probe object went all the same


def test_check_root_names_an_unreachable_endpoint(monkeypatch):
    from conftest import _free_port

    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    started = time.time()
    problem = storage.check_root("s3://some-bucket/rlhf")
    assert "cannot reach the S3 endpoint" in problem and "some-bucket" in problem
    assert time.time() - started < 15


def test_check_root_names_missing_credentials(s3_endpoint, monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", s3_endpoint)
    problem = storage.check_root("s3://some-bucket/rlhf")
    assert "no AWS credentials" in problem and "AWS_ACCESS_KEY_ID" in problem


def test_unsupported_scheme_is_refused():
    assert "cannot write" in storage.check_root("gs://bucket/rlhf")
    assert storage.check_root("/tmp/anything") is None


def test_resume_with_unreachable_origin_checkpoints_fails_loudly(s3_env, tmp_path):
    from rlhf_lib.workspace import OriginUnreachable, Workspace

    # S3: the origin's bucket is gone (or the credentials cannot read it): never a silent step 0.
    with pytest.raises(OriginUnreachable, match="s3://bucket-that-is-gone/rlhf/RLHFFlow/17/ppo"):
        Workspace.of(_cfg("s3://bucket-that-is-gone/rlhf"), "18", "ppo").checkpoint_roots("17")
    # Local: the origin run's directory is not on this machine.
    with pytest.raises(OriginUnreachable, match=str(tmp_path / "RLHFFlow" / "17")):
        Workspace.of(_cfg(str(tmp_path)), "18", "ppo").checkpoint_roots("17")
    # Reachable, but the origin never ran this stage: nothing to continue from (the stage says so and starts at 0).
    assert Workspace.of(_cfg(f"s3://{s3_env['BUCKET']}/rlhf"), "18", "ppo").checkpoint_roots("17") == []


def test_checkpoint_roots_are_the_earlier_attempts_then_the_origin_runs(tmp_path):
    """A retry (attempt 2) of a resumed run looks at its own attempts 1 and 0, then every attempt of the origin."""
    from rlhf_lib.workspace import Workspace

    cfg = _cfg(str(tmp_path))
    for attempt in (0, 1):
        (tmp_path / "RLHFFlow" / "17" / "sft" / f"attempt-{attempt}").mkdir(parents=True)
    roots = Workspace.of(cfg, "18", "sft", attempt=2).checkpoint_roots("17")
    base = tmp_path / "RLHFFlow"
    assert roots == [str(base / "18" / "sft" / "attempt-1" / "checkpoints"),
                     str(base / "18" / "sft" / "attempt-0" / "checkpoints"),
                     str(base / "17" / "sft" / "attempt-1" / "checkpoints"),
                     str(base / "17" / "sft" / "attempt-0" / "checkpoints")]
    assert Workspace.of(cfg, "18", "sft").checkpoint_roots(None) == []


def test_a_stage_continues_from_s3_and_falls_back_past_a_checkpoint_that_fails_to_load(s3_env, tmp_path, capsys):
    """The newest checkpoint in S3 is corrupt: the stage says so and downloads the one before it; the chosen one
    is adopted with the snapshots the earlier attempt kept up to its step."""
    remote = f"s3://{s3_env['BUCKET']}/rlhf/RLHFFlow/17/ppo/attempt-0/checkpoints"
    snaps = f"s3://{s3_env['BUCKET']}/rlhf/RLHFFlow/17/ppo/attempt-0/snapshots"
    for step in (1, 2, 4):
        if step != 1:
            checkpoints.publish(_ckpt(tmp_path / "written", f"step-{step:06d}", step), remote)
        snapshot = _ckpt(tmp_path / "snaps", f"step-{step:06d}", step)
        if step != 1:  # snapshot 1 was cut off before its marker
            (snapshot / checkpoints.MARKER).write_text(json.dumps({"step": step}))
        storage.upload_dir(snapshot, f"{snaps}/step-{step:06d}")
    storage.upload_dir(_ckpt(tmp_path / "bad", "step-000004", 4, payload="corrupt"), f"{remote}/step-000004")

    def load(path):
        if "corrupt" in (path / "weights.bin").read_text():
            raise ValueError("truncated weights")
        return json.loads((path / "state.json").read_text())

    out = tmp_path / "attempt-1"
    path, state = checkpoints.resume_point("ppo", [remote], out, load)
    assert state == {"step": 2} and path == out / "checkpoints" / "step-000002"
    printed = capsys.readouterr().out
    assert f"downloading checkpoint {remote}/step-000004" in printed
    assert f"checkpoint {remote}/step-000004 failed to load (ValueError: truncated weights): trying " \
           f"{remote}/step-000002" in printed
    assert f"continuing from {remote}/step-000002 (step 2; 1 snapshot(s) of the curve with it)" in printed
    assert f"snapshot {snaps}/step-000001 has no COMPLETE marker (cut off while it was written): skipped" in printed
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-000002"]


def test_no_checkpoint_anywhere_is_said(tmp_path, capsys):
    assert checkpoints.resume_point("ppo", [str(tmp_path / "attempt-0" / "checkpoints")], tmp_path / "a1",
                               lambda p: p) is None
    assert f"no checkpoint in {tmp_path / 'attempt-0' / 'checkpoints'}: starting at step 0" in capsys.readouterr().out


def test_stage_outputs_go_to_s3(s3_env, tiny_policy, tmp_path, monkeypatch):
    """A real stage (merge) through run_stage with an S3 root: it reads its inputs from S3, its result and files
    end up under <root>/RLHFFlow/<run>/<stage>/attempt-0/ with URIs in the result, and the attempt's scratch
    directory (downloaded inputs included) is freed."""
    from peft import get_peft_model

    from rlhf_lib import models
    from rlhf_lib.config import LoraSection

    monkeypatch.setenv("RLHF_SCRATCH_DIR", str(tmp_path / "scratch"))
    root = f"s3://{s3_env['BUCKET']}/rlhf"
    adapter = tmp_path / "adapter"
    get_peft_model(models.load_causal_lm(tiny_policy), models.lora_config(LoraSection(r=2, alpha=4))
                   ).save_pretrained(adapter)
    storage.upload_dir(adapter, f"{root}/inputs/adapter")
    result = pipeline.run_stage(_cfg(root), "merge", "42", {"base_model": tiny_policy,
                                                            "adapter": f"{root}/inputs/adapter"})
    stage = f"{root}/RLHFFlow/42/merge/attempt-0"
    assert result["merged_path"] == f"{stage}/merged"
    assert result["adapter_path"] == f"{root}/inputs/adapter"  # named by where it came from, not the download
    files = storage.list_files(stage)
    assert {"result.json", "merged/model.safetensors", "stage.log", "STARTED"} <= set(files)
    assert json.loads(storage.read_text(f"{stage}/result.json")) == result
    assert not (tmp_path / "scratch" / "RLHFFlow" / "42" / "merge" / "attempt-0").exists()  # inputs included


def test_start_fails_fast_on_a_missing_bucket(s3_env, tmp_path):
    """`run.storage_root = "s3://…"` with no such bucket: `start` fails in seconds naming the bucket, and
    nothing is written anywhere (before the fix it became a local directory named `s3:`)."""
    cfg = write_config(tmp_path / "cfg.toml", {"run": {"storage_root": "s3://missing-bucket-xyz/rlhf"}})
    env = {**os.environ, **{k: v for k, v in s3_env.items() if k != "BUCKET"}, "HF_HUB_OFFLINE": "1"}
    started = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "rlhf_flow.py"), "--config", "config", str(cfg),
                           "run"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "bucket 'missing-bucket-xyz' does not exist" in proc.stdout + proc.stderr
    assert time.time() - started < 60
    assert not (tmp_path / "s3:").exists() and not (ROOT / "s3:").exists()


def test_storage_follows_an_s3_datastore(monkeypatch):
    """A local run.storage_root with Metaflow's S3 datastore means the datastore's bucket (pods share no disk)."""
    import metaflow.metaflow_config as metaflow_config

    monkeypatch.setattr(metaflow_config, "DATASTORE_SYSROOT_S3", "s3://team-bucket/metaflow")
    local = _cfg("artifacts/x")
    assert workspace.resolve_storage_root(local, "s3") == "s3://team-bucket/metaflow/rlhf"
    assert workspace.resolve_storage_root(local, "local") == str(ROOT / "artifacts" / "x")
    assert workspace.resolve_storage_root(_cfg("s3://mine/x/"), "local") == "s3://mine/x"
    monkeypatch.setattr(metaflow_config, "DATASTORE_SYSROOT_S3", None)
    with pytest.raises(storage.StorageError, match="METAFLOW_DATASTORE_SYSROOT_S3"):
        workspace.resolve_storage_root(local, "s3")


def test_transfers_survive_a_store_that_fails_one_request_in_five(s3_env, tmp_path, monkeypatch):
    """Every fifth request to S3 fails (a 503 SlowDown, or a connection dropped with no answer): uploads and
    downloads — small ones through Metaflow's boto3 client, a large one through metaflow.S3's workers — retry
    and end with identical files."""
    import os as _os
    from urllib.parse import urlparse

    from faulty_proxy import FaultyProxy

    upstream = urlparse(s3_env["METAFLOW_S3_ENDPOINT_URL"])
    proxy = FaultyProxy(upstream.hostname, upstream.port, every=5)
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", proxy.url)
    try:
        small, large = tmp_path / "small", tmp_path / "large"
        for d, sizes in ((small, [10, 2000, 70_000]), (large, [9_000_000] * 4)):
            (d / "sub").mkdir(parents=True)
            for i, size in enumerate(sizes):
                (d / ("sub" if i % 2 else "") / f"f{i}.bin").write_bytes(_os.urandom(size))
            (d / "result.json").write_text('{"done": true}')
        assert sum(p.stat().st_size for p in large.rglob("*") if p.is_file()) >= storage.BULK_BYTES
        for d in (small, large):
            uri = f"s3://{s3_env['BUCKET']}/flaky/{d.name}"
            storage.upload_dir(d, uri, last=("result.json",))
            got = storage.download_dir(uri, tmp_path / f"back-{d.name}")
            files = sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file())
            assert sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file()) == files
            for rel in files:
                assert (got / rel).read_bytes() == (d / rel).read_bytes(), rel
        assert proxy.failed["503"] >= 2 and proxy.failed["dropped"] >= 2, proxy.failed
    finally:
        proxy.close()


def test_an_unreadable_metaflow_config_is_an_error_not_a_switch_to_aws(tmp_path):
    """Reading Metaflow's configuration for the S3 endpoint fails: say so, never quietly talk to AWS instead."""
    (tmp_path / "config.json").write_text("{not json")
    env = {k: v for k, v in os.environ.items() if k != "METAFLOW_S3_ENDPOINT_URL"}
    probe = "from rlhf_lib import storage; print(storage.endpoint_url())"
    proc = subprocess.run([sys.executable, "-c", probe], env={**env, "METAFLOW_HOME": str(tmp_path),
                                                              "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "cannot read Metaflow's configuration to find the S3 endpoint" in proc.stderr
    assert "METAFLOW_S3_ENDPOINT_URL" in proc.stderr
