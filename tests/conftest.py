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


def write_config(path: Path, overrides: dict | None = None, base: Path = TEST_CONFIG) -> Path:
    """configs/test.toml with `overrides` merged in, written to `path`."""
    data = deep_merge(tomllib.loads(base.read_text()), overrides or {})
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
    """One whole run of the flow (test profile, offline) through metaflow.Runner, shared by the tests."""
    from metaflow import Runner

    store = tmp_path_factory.mktemp("store")
    cfg = write_config(store / "test.toml", {"run": {"storage_root": str(store)}})
    with Runner(str(ROOT / "flows" / "rlhf_flow.py"), show_output=False, config=[("config", str(cfg))],
                env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}) as runner:
        result = runner.run()
        assert result.status == "successful", result.stderr[-4000:]
        yield result.run
