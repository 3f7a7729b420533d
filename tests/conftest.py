"""Shared fixtures. Everything runs offline on CPU; stage outputs go under pytest's tmp dirs."""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_lib import env  # noqa: E402
from rlhf_lib.config import dump_toml  # noqa: E402

env.configure()
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the test suite may touch the network
os.environ["WANDB_MODE"] = "offline"
# The ML stack before any metaflow.Runner call: after Runner has loaded the flow file in this process, a first
# import of torch.export (which peft pulls in) picks up metaflow's vendored typing_extensions and fails with
# "Type parameter ~_R without a default follows type parameter with a default".
import peft  # noqa: E402,F401
import torch  # noqa: E402,F401
import torch.export  # noqa: E402,F401
import transformers  # noqa: E402,F401

SHARED = ROOT.parent / "shared"
TEST_CONFIG = ROOT / "configs" / "test.toml"


def deep_merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def one_node_steps() -> set[str]:
    """The steps a run on one node takes: the chain's, and each method's (a gang method's one-node route)."""
    from rlhf_lib import methods

    steps = {"start", "data", "sft", "merge", "rlaif", "reward", "evaluate", "end"}
    for m in methods.REGISTRY.values():
        steps |= {m.name, f"{m.name}_train", m.last_step} if m.gang else {m.name}
    return steps


# A method the test profile does not size (one just added to the registry) trains this much in the tests' runs.
SMOKE_SIZE = {"max_steps": 6, "save_steps": 3, "eval_steps": 6, "logging_steps": 2, "batch_size": 4}


def smoke_sections(sized) -> dict[str, dict]:
    """SMOKE_SIZE, as far as its settings have those fields, for every method of the registry not in `sized`."""
    from rlhf_lib import methods

    return {m.name: {k: v for k, v in SMOKE_SIZE.items() if k in m.settings.model_fields}
            for m in methods.REGISTRY.values() if m.name not in sized and m.settings is not None}


def write_config(path: Path, overrides: dict | None = None, base: Path = TEST_CONFIG) -> Path:
    """configs/test.toml with `overrides` merged in, written to `path`. The test profile runs every method of the
    registry unless `overrides` names them; a method it does not size trains SMOKE_SIZE."""
    from rlhf_lib import methods

    data = tomllib.loads(base.read_text())
    if base == TEST_CONFIG:
        data["run"]["methods"] = methods.names()
        data.update(smoke_sections(set(data) | set(overrides or {})))
    data = deep_merge(data, overrides or {})
    path.write_text(dump_toml(data))
    return path


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> str:
    """A small tiny-OPT policy (built and briefly pretrained once per session)."""
    from rlhf_lib import models
    from rlhf_lib.config import TinyModelSpec

    root = tmp_path_factory.mktemp("models")
    spec = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, ffn_dim=64, vocab_size=512, max_positions=128,
                         pretrain_steps=20)
    return models.prepare("tiny", spec, "policy", root, seed=0)


@pytest.fixture(scope="session")
def flow_run(tmp_path_factory):
    """One whole run of the flow (test profile, offline), shared by the tests: the README's quick-start command
    itself (`python flows/rlhf_flow.py run`, read from the README), with the test profile given the way Metaflow
    takes a config from the environment (METAFLOW_FLOW_CONFIG) so the command's text is what runs."""
    import re
    import shlex
    import subprocess

    from metaflow import Run

    store = tmp_path_factory.mktemp("store")
    # The storage root reached through a symlink (a home directory on another volume, a mounted share): `end` must
    # still see every output the artifacts name as its own (tests/test_flow.py).
    (store / "real").mkdir()
    (store / "link").symlink_to(store / "real")
    # Live cards redrawn every second at first: the test profile's PPO trains for seconds (tests/test_flow.py reads
    # its card while it does).
    cfg = write_config(store / "test.toml", {"run": {"storage_root": str(store / "link"), "card_refresh_s": 1}})
    command = readme_run_command()
    argv = shlex.split(command)
    assert argv[0] == "python", command
    env_vars = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
                "METAFLOW_FLOW_CONFIG": json.dumps({"config": str(cfg)})}
    log = store / "flow.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *argv[1:]], cwd=ROOT, env=env_vars, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        LIVE["ppo_train"] = watch_live_card(proc, log, "ppo_train")
        proc.wait(timeout=1800)
    output = LIVE["output"] = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    run_id = re.search(r"Workflow starting \(run-id (\w+)\)", output).group(1)
    yield Run(f"RLHFFlow/{run_id}")


# What the flow fixture saw while its run ran: the run's output, and each state of ppo_train's live card read from
# the datastore while that step was still running (tests/test_flow.py).
LIVE: dict = {}


def watch_live_card(proc, log: Path, step: str) -> list[str]:
    """Each distinct state of `step`'s card read from the datastore, twice a second, while its task runs in `proc` (a
    flow run whose output goes to `log`)."""
    import re

    from rlhf_lib import live

    def run_id():
        found = re.search(r"Workflow starting \(run-id (\w+)\)", log.read_text())
        return found.group(1) if found else None

    return live.watch_card(lambda: proc.poll() is None, run_id, step, every_s=0.5)


def readme_run_command() -> str:
    """The last command of the README's quick-start install-and-run line: how a user runs the default job."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return block.strip().splitlines()[0].split(" && ")[-1].strip()


# ------------------------------------------------------------------ a real S3 server (moto's) on 127.0.0.1
# CI starts one and exports RLHF_TEST_S3_ENDPOINT (.ci/run); without it the fixture starts its own.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-store",
                  "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """The URL of a running S3 server on 127.0.0.1."""
    import subprocess
    import time
    import urllib.request

    endpoint = os.environ.get("RLHF_TEST_S3_ENDPOINT")
    proc = None
    if not endpoint:
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            if time.time() > deadline:
                raise RuntimeError(f"no S3 server at {endpoint}")
            time.sleep(0.2)
    yield endpoint
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Environment for talking to the test S3 server (also applied to this process), and a fresh bucket."""
    import uuid

    import boto3

    values = {**S3_CREDENTIALS, "METAFLOW_S3_ENDPOINT_URL": s3_endpoint}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    bucket = f"rlhf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return {**values, "BUCKET": bucket}


