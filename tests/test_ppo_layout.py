"""PPO means the same thing at any layout: 2 processes x batch b (gloo) compute exactly the update 1 process computes
on batch 2b, gradient accumulation is a larger mini-batch, and the rollout's old log-probs taken from generation
equal a full forward's."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

WORKER = str(ROOT / "tests" / "ppo_layout_worker.py")


@pytest.fixture(scope="module")
def fixed_rollout(tiny_policy, tmp_path_factory):
    """A global batch of 8 rollouts (sampled once, responses of different lengths, stopped at EOS) and scores."""
    from rlhf_lib import models
    from rlhf_lib import sampling

    tokenizer = models.load_tokenizer(tiny_policy)
    model = models.load_causal_lm(tiny_policy).eval()
    torch.manual_seed(3)
    prompts = [f"Question: What is {w}?\n\nAnswer:" for w in ("big", "the capital of Peru", "red", "ice", "a cow",
                                                               "two plus two", "the sun", "rain")]
    batch = sampling.TransformersSampler(model, tokenizer).sample(
        prompts, [6, 9, 12, 5, 12, 7, 10, 8], stop_at_eos=True, max_prompt_length=32)
    assert batch.response_mask.sum(1).unique().numel() > 2  # lengths really differ
    path = tmp_path_factory.mktemp("layout") / "sampling.pt"
    torch.save({"model_path": tiny_policy, "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "response_mask": batch.response_mask, "prompt_length": batch.prompt_length,
                "scores": torch.randn(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2},
               path)
    return path


def _run(rollout_path, out, mini: int, accumulation: int, processes: int = 1) -> dict:
    args = [str(rollout_path), str(out), str(mini), str(accumulation)]
    if processes == 1:
        cmd = [sys.executable, WORKER, *args]
    else:
        port = 20000 + os.getpid() % 20000
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(port), WORKER, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _assert_same_update(got: dict, expected: dict) -> None:
    assert got["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-6, msg=name)
    assert got["beta"] == pytest.approx(expected["beta"], rel=0, abs=1e-9)
    for key in ("score_mean", "kl", "policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac", "entropy"):
        assert got["stats"][key] == pytest.approx(expected["stats"][key], rel=0, abs=1e-6), key
    assert got["stats"]["samples"] == expected["stats"]["samples"] == 8


def test_two_processes_compute_the_update_of_one(fixed_rollout, tmp_path):
    """2 processes x 4 rollouts over gloo = 1 process x 8, in float64: the same advantages (whitened over the
    global batch), the same KL controller update, the same adapter and value head afterwards."""
    one = _run(fixed_rollout, tmp_path / "one.pt", mini=2, accumulation=1)
    two = _run(fixed_rollout, tmp_path / "two.pt", mini=2, accumulation=1, processes=2)
    _assert_same_update(two, one)
    moved = sum(float((one["params"][n] - _initial(fixed_rollout)[n]).abs().max()) for n in one["params"])
    assert moved > 1e-3  # the step really changed the parameters


def test_gradient_accumulation_is_a_larger_mini_batch(fixed_rollout, tmp_path):
    """Mini-batch 2 x accumulation 2 = mini-batch 4: the loss is the mean over the optimizer step's tokens."""
    accumulated = _run(fixed_rollout, tmp_path / "acc.pt", mini=2, accumulation=2)
    larger = _run(fixed_rollout, tmp_path / "large.pt", mini=4, accumulation=1)
    _assert_same_update(accumulated, larger)


def _initial(rollout_path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from ppo_layout_worker import build_policy

    data = torch.load(rollout_path, weights_only=True)
    return {n: q.detach() for n, q in build_policy(data["model_path"]).named_parameters() if q.requires_grad}


def test_old_logprobs_from_generation_equal_a_full_forward(tiny_policy):
    """When the sampler is the policy itself, the log-probs, entropy and values kept during generation equal what a
    forward pass over the finished rollout gives; with another sampler there are none, and PPO keeps the forward."""
    from peft import get_peft_model

    from rlhf_lib import models
    from rlhf_lib.config import LoraSection
    from rlhf_lib import sampling
    from rlhf_lib.stages.ppo.policy import PolicyWithValueHead
    from rlhf_lib.stages.ppo.trainer import _score_rollout

    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(tiny_policy)
    base = models.load_causal_lm(tiny_policy)
    policy = PolicyWithValueHead(get_peft_model(base, models.lora_config(LoraSection(r=4, alpha=8, dropout=0.0))),
                                 base.config.hidden_size).eval()
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name or "v_head" in name:
                param.normal_(0, 0.05)
    prompts = ["Question: What is big?\n\nAnswer:", "Question: What is the capital of Peru today?\n\nAnswer:"] * 2
    batch = sampling.TransformersSampler(policy, tokenizer).sample(
        prompts, [7, 12, 16, 9], stop_at_eos=True, max_prompt_length=32)
    assert batch.sampled is not None
    with torch.no_grad():
        logprobs, values, entropy = sampling.response_logprobs(policy, batch.input_ids, batch.attention_mask,
                                                      batch.prompt_length, with_entropy=True)
    mask = batch.response_mask.bool()
    assert mask.sum() > 20
    torch.testing.assert_close(batch.sampled["logprobs"][mask], logprobs[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.sampled["entropy"][mask], entropy[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.sampled["values"][mask], values[mask], atol=1e-4, rtol=1e-4)
    # The rollout's scoring then runs the reference forward only, and keeps generation's numbers.
    scored = _score_rollout(policy, batch, chunk=2)
    assert scored["logprobs"] is batch.sampled["logprobs"] and "ref_logprobs" in scored

    tempered = sampling.generation_config(policy.lm, tokenizer, 16, stop_at_eos=True)
    tempered.temperature = 0.7
    assert not sampling.samples_from_policy(tempered)
    other = sampling.TransformersSampler(policy, tokenizer).sample(
        prompts, [7, 12, 16, 9], stop_at_eos=True, max_prompt_length=32, config=tempered)
    assert other.sampled is None
    scored = _score_rollout(policy, other, chunk=2)
    assert {"logprobs", "values", "entropy", "ref_logprobs"} <= scored.keys()


def test_reward_sharing_the_policys_tokenizer_scores_token_ids_as_it_scores_text(tiny_policy, tmp_path):
    """A reward model with the policy's own tokenizer scores a rollout's token ids (no decode, no re-tokenising)
    exactly as it scores the decoded text, wherever the text tokenizes back to the same ids."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_lib import models, scoring
    from rlhf_lib import sampling

    tokenizer = models.load_tokenizer(tiny_policy)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_policy, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    reward = scoring.ModelReward(str(tmp_path / "rm"), max_length=128)
    assert reward.shares_tokenizer(tokenizer)
    assert not reward.shares_tokenizer(models.load_tokenizer(tiny_policy).__class__.from_pretrained(tiny_policy,
                                                                                                    pad_token="</s>"))
    prompts = ["Question: What is big?\n\nAnswer:", "Question: What is the capital of Peru today?\n\nAnswer:"] * 3
    batch = sampling.TransformersSampler(models.load_causal_lm(tiny_policy).eval(), tokenizer).sample(
        prompts, [4, 9, 12, 6, 3, 10], stop_at_eos=True, max_prompt_length=32)
    texts = sampling.decode_responses(tokenizer, batch)
    by_ids, by_text = reward.score_ids(batch.input_ids, batch.attention_mask), reward(prompts, texts)
    same = [i for i, (p, t) in enumerate(zip(prompts, texts))
            if tokenizer(p + t)["input_ids"] == batch.input_ids[i][batch.attention_mask[i].bool()].tolist()]
    assert len(same) >= 3
    torch.testing.assert_close(by_ids[same], by_text[same], atol=1e-5, rtol=1e-5)
