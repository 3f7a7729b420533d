"""The whole flow through metaflow.Runner, offline, with the cut-down test profile."""

from pathlib import Path


def test_steps_chain_in_order(flow_run):
    steps = [s.id for s in flow_run]
    assert set(steps) == {"start", "data", "sft", "merge", "reward", "ppo", "evaluate", "end"}


def test_dataset_artifacts(flow_run):
    datasets = flow_run.data.datasets
    assert set(datasets) == {f"{k}_{s}" for k in ("sft", "preference", "prompts") for s in ("train", "eval")}
    for info in datasets.values():
        assert Path(info["uri"]).is_dir() and info["rows"] > 0 and info["columns"]


def test_sft_and_merge_artifacts_load(flow_run):
    from peft import PeftConfig

    from rlhf_lib import models

    data = flow_run.data
    assert PeftConfig.from_pretrained(data.sft_adapter_path).r == 16
    assert data.sft_metrics["eval_loss"] > 0 and data.sft_config["quantize_4bit"] is True
    merged = models.load_causal_lm(data.sft_merged_path)
    assert merged.config.model_type == "opt"


def test_reward_model_ranks_held_out_pairs(flow_run):
    from rlhf_lib import models

    data = flow_run.data
    assert models.load_reward_model(data.reward_model_path).config.num_labels == 1
    assert data.reward_metrics["eval_accuracy"] >= 0.9


def test_ppo_raises_mean_reward(flow_run):
    stats = flow_run.data.ppo_stats
    assert [s["step"] for s in stats] == list(range(1, len(stats) + 1))
    keys = {"step", "score_mean", "score_std", "kl", "beta", "entropy", "clipfrac", "policy_loss", "value_loss",
            "response_length_mean"}
    assert keys <= set(stats[0])
    quarter = len(stats) // 4
    first = sum(s["score_mean"] for s in stats[:quarter]) / quarter
    last = sum(s["score_mean"] for s in stats[-quarter:]) / quarter
    assert last > first
    assert Path(flow_run.data.ppo_model_path, "model.safetensors").exists()
    assert Path(flow_run.data.ppo_adapter_path, "adapter_model.safetensors").exists()


def test_evaluate_report(flow_run):
    report = flow_run.data.eval_report
    assert set(report["sft"]) >= {"mean_score", "perplexity"}
    assert set(report["ppo"]) >= {"mean_score", "win_rate_vs_sft", "kl_vs_sft", "perplexity"}
    assert report["ppo"]["mean_score"] > report["sft"]["mean_score"]
    assert report["ppo"]["win_rate_vs_sft"] > 0.5
    samples = flow_run.data.eval_samples
    assert samples and {"prompt", "sft_answer", "ppo_answer", "sft_score", "ppo_score"} <= set(samples[0])


def test_ppo_card_exists(flow_run):
    from metaflow.cards import get_cards

    assert len(get_cards(flow_run["ppo"].task)) == 1
