"""Stage outputs and checkpoints in S3 (a real S3 server: moto's, on 127.0.0.1), and the checks `start` makes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, S3_CREDENTIALS, TEST_CONFIG, write_config
from rlhf_lib import checkpoints, config, pipeline, storage


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
    remote = f"s3://{s3_env['BUCKET']}/run/ppo/checkpoints"
    checkpoints.publish(_ckpt(tmp_path / "local", "step-000002", 2), remote)
    # A newer checkpoint whose upload died before its marker: files there, no COMPLETE object.
    storage.upload_dir(_ckpt(tmp_path / "torn", "step-000004", 4), f"{remote}/step-000004")
    assert [s for s, _ in checkpoints.remote_complete(remote)] == [2]
    fetched = checkpoints.fetch_latest(remote, tmp_path / "fresh")
    assert fetched.name == "step-000002" and checkpoints.marked_step(fetched) == 2


def test_hf_checkpoints_get_a_marker_and_old_ones_are_pruned(s3_env, tmp_path):
    remote = f"s3://{s3_env['BUCKET']}/run/sft/checkpoints"
    for step in (10, 20, 30):
        checkpoints.publish(_ckpt(tmp_path, f"checkpoint-{step}", step), remote, keep=2)
    assert checkpoints.remote_complete(remote) == [(20, "checkpoint-20"), (30, "checkpoint-30")]
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


def test_resume_with_unreachable_origin_checkpoints_fails_loudly(s3_env, tmp_path, capsys):
    # S3: the origin's bucket is gone (or the credentials cannot read it): never a silent step 0.
    with pytest.raises(pipeline.OriginUnreachable, match="s3://bucket-that-is-gone/rlhf/RLHFFlow/17/ppo/checkpoints"):
        pipeline.origin_checkpoints(_cfg("s3://bucket-that-is-gone/rlhf"), "17", "ppo")
    # Local: the origin run's directory is not on this machine.
    with pytest.raises(pipeline.OriginUnreachable, match=str(tmp_path / "RLHFFlow" / "17")):
        pipeline.origin_checkpoints(_cfg(str(tmp_path)), "17", "ppo")
    # Reachable, but the origin never checkpointed this stage: a normal start, and it says so.
    assert pipeline.origin_checkpoints(_cfg(f"s3://{s3_env['BUCKET']}/rlhf"), "17", "ppo") is None
    assert "left no ppo checkpoint: starting from step 0" in capsys.readouterr().out


def test_local_origin_checkpoints_of_either_kind_are_found(tmp_path, capsys):
    """A local origin run's own (`step-N` + marker) and HF Trainer (`checkpoint-N`) checkpoints are both found."""
    cfg = _cfg(str(tmp_path))
    hf = tmp_path / "RLHFFlow" / "17" / "sft" / "checkpoints" / "checkpoint-20"
    hf.mkdir(parents=True)
    (hf / "trainer_state.json").write_text("{}")
    assert pipeline.origin_checkpoints(cfg, "17", "sft") == str(hf.parent)
    checkpoints.save(tmp_path / "RLHFFlow" / "17" / "ppo" / "checkpoints", 4, lambda d: (d / "w").write_text("w"))
    assert pipeline.origin_checkpoints(cfg, "17", "ppo").endswith("RLHFFlow/17/ppo/checkpoints")
    assert pipeline.origin_checkpoints(cfg, "17", "dpo") is None  # never checkpointed: a normal start
    assert "left no dpo checkpoint: starting from step 0" in capsys.readouterr().out


def test_origin_checkpoints_are_downloaded_from_s3(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_SCRATCH_DIR", str(tmp_path / "scratch"))
    cfg = _cfg(f"s3://{s3_env['BUCKET']}/rlhf")
    remote = storage.join(pipeline.stage_uri(cfg, "17", "ppo"), "checkpoints")
    for step in (2, 4):
        checkpoints.publish(_ckpt(tmp_path / "written", f"step-{step:06d}", step), remote)
    local = pipeline.origin_checkpoints(cfg, "17", "ppo")
    assert [p.name for p in checkpoints.list_complete(local)] == ["step-000004"]
    assert Path(local).is_relative_to(tmp_path / "scratch")


def test_stage_outputs_go_to_s3(s3_env, tiny_policy, tmp_path, monkeypatch):
    """A real stage (merge) through run_stage with an S3 root: it reads its inputs from S3, its result and files
    end up under <root>/RLHFFlow/<run>/<stage>/ with URIs in the result, and the scratch directory is freed."""
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
    assert result["merged_path"] == f"{root}/RLHFFlow/42/merge/merged"
    assert result["adapter_path"] == f"{root}/inputs/adapter"  # named by where it came from, not the cache
    files = storage.list_files(f"{root}/RLHFFlow/42/merge")
    assert "result.json" in files and "merged/model.safetensors" in files and "stage.log" in files
    assert json.loads(storage.read_text(f"{root}/RLHFFlow/42/merge/result.json")) == result
    assert not (tmp_path / "scratch" / "RLHFFlow" / "42" / "merge").exists()


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
    assert pipeline.resolve_storage_root(local, "s3") == "s3://team-bucket/metaflow/rlhf"
    assert pipeline.resolve_storage_root(local, "local") == str(ROOT / "artifacts" / "x")
    assert pipeline.resolve_storage_root(_cfg("s3://mine/x/"), "local") == "s3://mine/x"
    monkeypatch.setattr(metaflow_config, "DATASTORE_SYSROOT_S3", None)
    with pytest.raises(storage.StorageError, match="METAFLOW_DATASTORE_SYSROOT_S3"):
        pipeline.resolve_storage_root(local, "s3")
