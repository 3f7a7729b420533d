"""A Python reward function in place of the reward model — the verifiable-reward setting: PPO and GRPO optimise the
sample data's rule (`rlhf_lib.judges:rule_reward`, texts in, floats out) from the run's SFT model, and beat SFT by
that rule."""

import pytest

from conftest import TEST_CONFIG
from rlhf_lib import config, launch

pytestmark = pytest.mark.slow  # uses the whole flow run's SFT model

RULE = "rlhf_lib.judges:rule_reward"


def test_ppo_and_grpo_rewarded_by_the_rule_beat_sft_by_it(flow_run, tmp_path):
    data = flow_run.data
    raw = config.load(TEST_CONFIG).model_dump()
    raw["run"].update(wandb_mode="disabled", methods=["ppo", "grpo"])
    raw["ppo"]["steps"], raw["grpo"]["max_steps"] = 40, 24  # a margin over SFT that thread counts cannot flip
    raw["reward"]["function"] = RULE
    cfg = config.validate(raw)
    inputs = {"sft_model": data.sft_merged_path, "prompts": data.datasets["prompts_train"]["uri"],
              "reward_function": f"function:{RULE}"}
    trained = {m: launch.launch(m, cfg.to_json(), tmp_path / m, inputs) for m in ("ppo", "grpo")}
    assert all(r["reward"] == f"reward function {RULE}" for r in trained.values())
    report = launch.launch("evaluate", cfg.to_json(), tmp_path / "evaluate", {
        "policy_sft": data.sft_merged_path, **{f"policy_{m}": r["model_path"] for m, r in trained.items()},
        "reward_function": f"function:{RULE}", "prompts": data.datasets["prompts_eval"]["uri"],
        "sft_eval": data.datasets["sft_eval"]["uri"]})
    assert report["gold_judge"] == "rule" and report["proxy"] == f"reward function {RULE}"
    for method in ("ppo", "grpo"):
        row = report["eval_report"][method]
        assert row["proxy_win_rate"] > 0.5 and row["gold_win_rate"] > 0.5, (method, row)
        assert row["proxy_score"] > report["eval_report"]["sft"]["proxy_score"], (method, row)
