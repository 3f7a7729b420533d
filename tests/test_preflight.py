"""start's checks: unreachable models and bad sources fail in seconds, naming the fix."""

import json
import time

import pytest

from rlhf_lib import config, models, preflight
from conftest import TEST_CONFIG


def _cfg(**sections):
    raw = config.load(TEST_CONFIG).model_dump()
    for section, values in sections.items():
        raw[section].update(values)
    return config.validate(raw)


def test_offline_hub_id_fails_at_once(tmp_path, monkeypatch):
    from rlhf_lib import hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    started = time.time()
    with pytest.raises(models.ModelError, match="HF_HUB_OFFLINE=1") as info:
        hub.check_loadable("facebook/opt-1.3b", "policy.model")
    assert time.time() - started < 5
    assert "hf download facebook/opt-1.3b" in str(info.value)


def test_missing_model_directory_is_named(tmp_path):
    problems = preflight.check(_cfg(policy={"model": str(tmp_path / "no-such-model"), "tiny": {}}))
    assert any(p.startswith("policy.model") and "not a model directory" in p for p in problems)


def test_missing_and_malformed_sources_are_named(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"chosen": "a", "reject": "b"}) + "\n")
    cfg = _cfg(data={"sft": {"source": str(tmp_path / "absent.jsonl"), "eval_rows": 4},
                     "preference": {"source": str(tmp_path / "p.jsonl"), "eval_rows": 4}})
    problems = preflight.check(cfg)
    assert any("data.sft.source" in p and "does not exist" in p for p in problems)
    assert any("data.preference.source" in p and "rejected" in p for p in problems)


def test_causal_lm_is_not_a_reward_model(tiny_policy):
    problems = preflight.check(_cfg(reward_model={"model": tiny_policy, "tiny": {}}))
    assert any("reward_model.model" in p and "causal LM" in p for p in problems)


def test_default_config_passes():
    assert preflight.check(config.load(TEST_CONFIG)) == []


def test_online_wandb_without_a_key_fails_in_start(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    online = _cfg(run={"wandb_mode": "online"})
    problems = preflight.wandb_key(online)
    assert len(problems) == 1 and "WANDB_API_KEY" in problems[0] and "run.wandb_mode" in problems[0]
    assert problems[0] in preflight.check(online)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k" + "0" * 39 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert preflight.wandb_key(online) == []
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    (tmp_path / ".netrc").unlink()
    assert preflight.wandb_key(online) == [] and preflight.wandb_key(_cfg()) == []
