"""The config rejects unknown keys, wrong types and impossible values, naming the key."""

import subprocess
import sys
import time

import pytest

from conftest import ROOT, write_config
from rlhf_lib import config
from rlhf_lib.config import ConfigError


PROFILES = sorted(p.stem for p in (ROOT / "configs").glob("*.toml"))


def test_every_profile_is_tested():
    assert {"tiny", "compare", "opt-1.3b", "opt-1.3b-rehearsal", "test", "real-cpu", "rlaif", "rule-reward",
            "sentiment", "sentiment-overoptimise"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_shipped_profiles_validate(name):
    cfg = config.load(ROOT / "configs" / f"{name}.toml")
    assert cfg.run.name == name.removesuffix("-rehearsal")
    for section in (cfg.data.sft, cfg.data.preference, cfg.data.prompts):  # sources in the repository exist
        if section.source.startswith("configs/"):
            assert (ROOT / section.source).is_file(), section.source


def test_seed_recipe_hyperparameters():
    """opt-1.3b.toml is the seed lesson's recipe."""
    cfg = config.load(ROOT / "configs" / "opt-1.3b.toml")
    assert cfg.policy.model == "facebook/opt-1.3b" and cfg.reward_model.model == "microsoft/deberta-v3-base"
    assert (cfg.sft.lora.r, cfg.sft.lora.alpha, cfg.sft.lora.dropout) == (16, 32, 0.05)
    assert cfg.sft.quantize_4bit and cfg.run.gpus == 8
    p = cfg.ppo
    assert (p.learning_rate, p.batch_size, p.mini_batch_size, p.ppo_epochs) == (1.41e-5, 32, 4, 4)
    assert (p.init_kl_coef, p.adaptive_kl, p.kl_target, p.target_kl) == (0.2, True, 6.0, 0.1)
    assert (p.min_response_length, p.max_response_length, p.save_freq) == (32, 400, 50)


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config.validate(raw)
    return str(info.value)


def test_unknown_key_is_named():
    msg = _error({"sft": {"lora_rank": 8}})
    assert "unknown config key `sft.lora_rank`" in msg


def test_unknown_section_is_named():
    assert "unknown config key `training`" in _error({"training": {}})


def test_wrong_type_is_named():
    msg = _error({"sft": {"max_steps": "10"}})
    assert "`sft.max_steps`" in msg and "integer" in msg


def test_min_length_above_max_is_rejected():
    msg = _error({"ppo": {"min_response_length": 50, "max_response_length": 10}})
    assert "ppo.min_response_length" in msg and "min <= max" in msg


@pytest.mark.parametrize("raw, key", [
    ({"ppo": {"batch_size": 30, "mini_batch_size": 4}}, "ppo.mini_batch_size"),
    ({"sft": {"learning_rate": -1.0}}, "sft.learning_rate"),
    ({"policy": {"tiny": {"hidden_size": 30, "num_heads": 4}}}, "policy.tiny"),
    ({"run": {"wandb_mode": "sometimes"}}, "run.wandb_mode"),
    ({"sft": {"lora": {"dropout": 1.5}}}, "sft.lora.dropout"),
])
def test_impossible_values_are_named(raw, key):
    assert key in _error(raw)


def test_bad_toml_is_reported():
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.parse_toml("[sft\nmax_steps = 1")


def test_flow_refuses_bad_config_before_running(tmp_path):
    """The CLI fails within seconds, names the key, and writes no stage output."""
    bad = write_config(tmp_path / "bad.toml", {"run": {"storage_root": str(tmp_path / "store")},
                                               "sft": {"lora_rank": 8}})
    started = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "rlhf_flow.py"), "--config", "config", str(bad), "run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "sft.lora_rank" in proc.stdout + proc.stderr
    assert time.time() - started < 60
    assert not (tmp_path / "store").exists()
