"""PPO's pieces against hand-computed values (see the comments for the arithmetic)."""

import pytest
import torch

from rlhf_lib import sampling
from rlhf_lib.stages.ppo import losses

T = torch.tensor


def test_gae_three_tokens():
    # gamma=1, lam=0.95; deltas: 0+0.6-0.5=0.1, 0+0.7-0.6=0.1, 1+0-0.7=0.3
    # A2=0.3, A1=0.1+0.95*0.3=0.385, A0=0.1+0.95*0.385=0.46575; returns = A + V
    adv, ret = losses.gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, T([[0.46575, 0.385, 0.3]]))
    torch.testing.assert_close(ret, T([[0.96575, 0.985, 1.0]]))


def test_gae_ends_the_episode_at_the_last_real_token():
    # The padded third token's reward and value (9.9) must not leak: A1 = 1 + 0 - 0.6 = 0.4, A0 = 0.1 + 0.95*0.4
    adv, ret = losses.gae(T([[0.0, 1.0, 9.9]]), T([[0.5, 0.6, 9.9]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, T([[0.48, 0.4, 0.0]]))
    torch.testing.assert_close(ret, T([[0.98, 1.0, 0.0]]))


def test_gae_discount():
    # gamma=0.5, lam=1: A1 = 1 - 0 = 1; A0 = 0 + 0.5*0 - 0 + 0.5*1 = 0.5
    adv, _ = losses.gae(T([[0.0, 1.0]]), T([[0.0, 0.0]]), T([[1.0, 1.0]]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, T([[0.5, 1.0]]))


@pytest.mark.parametrize("ratio, advantage, loss, clipfrac", [
    (1.3, 1.0, -1.2, 1.0),   # beyond 1+eps with A>0: the clipped term wins, no gradient
    (1.2, 1.0, -1.2, 0.0),   # exactly at the boundary: not counted as clipped
    (1.3, -1.0, 1.3, 0.0),   # A<0: the pessimistic unclipped term wins
    (0.7, 1.0, -0.7, 0.0),   # below 1-eps with A>0: unclipped is the pessimistic one
    (0.7, -1.0, 0.8, 1.0),   # below 1-eps with A<0: clipped at 0.8
])
def test_clipped_policy_loss_at_the_boundary(ratio, advantage, loss, clipfrac):
    new = torch.log(T([[ratio]]))
    got, stats = losses.policy_loss(new, T([[0.0]]), T([[advantage]]), T([[1.0]]), cliprange=0.2)
    assert got.item() == pytest.approx(loss, abs=1e-6)
    assert stats["clipfrac"].item() == clipfrac


def test_clipped_value_loss():
    # old 0, new 0.5, return 1, clip 0.2: clipped value 0.2; errors 0.25 vs 0.64 -> 0.5 * 0.64
    loss, stats = losses.value_loss(T([[0.5]]), T([[0.0]]), T([[1.0]]), T([[1.0]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.32)
    assert stats["vf_clipfrac"].item() == 1.0
    loss, stats = losses.value_loss(T([[0.1]]), T([[0.0]]), T([[1.0]]), T([[1.0]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.81) and stats["vf_clipfrac"].item() == 0.0


@pytest.mark.parametrize("kl, expected", [
    (12.0, 0.2 * (1 + 0.2 * 32 / 10000)),   # error clipped at +0.2
    (3.0, 0.2 * (1 - 0.2 * 32 / 10000)),    # error -0.5 clipped at -0.2
    (6.6, 0.2 * (1 + 0.1 * 32 / 10000)),    # error 6.6/6 - 1 = 0.1
    (6.0, 0.2),                             # on target: unchanged
])
def test_adaptive_kl_controller(kl, expected):
    ctl = losses.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(kl, n=32) == pytest.approx(expected, rel=1e-12)


def test_kl_controller_state_round_trips():
    ctl = losses.AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(12.0, 32)
    other = losses.AdaptiveKLController(1.0, 1.0, 1)
    other.load_state_dict(ctl.state_dict())
    assert other == ctl
    assert losses.FixedKLController(0.3).update(100.0, 32) == 0.3


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    # kl = [0.5, 0, (masked)]; rewards = -0.1 * kl, + score 2.0 on token 1 (the last real one)
    rewards, kl = losses.per_token_rewards(T([2.0]), T([[-1.0, -2.0, -3.0]]), T([[-1.5, -2.0, -2.0]]),
                                           T([[1.0, 1.0, 0.0]]), beta=0.1)
    torch.testing.assert_close(kl, T([[0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, T([[-0.05, 2.0, 0.0]]))


def test_masked_whiten_ignores_padding():
    x, mask = T([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]]), T([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = losses.masked_whiten(x, mask)
    assert w[:, 2].abs().sum() == 0
    assert losses.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)


def test_response_mask_lengths_and_eos():
    responses = T([[5, 2, 7, 8], [5, 6, 7, 8]])
    m = sampling.response_mask(responses, [4, 3], eos_token_id=2, stop_at_eos=True)
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]  # EOS is kept as the last action, the rest dropped
    m = sampling.response_mask(responses, [4, 3], eos_token_id=2, stop_at_eos=False)
    assert m.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]  # the seed's mode: EOS is just another token


def test_left_padding_does_not_change_response_logprobs(tiny_policy):
    """A short prompt left-padded in a batch scores its response exactly as it does alone."""
    from rlhf_lib import models
    from rlhf_lib.sampling import response_logprobs
    from rlhf_lib.stages.ppo.policy import PolicyWithValueHead

    tok = models.load_tokenizer(tiny_policy, padding_side="left")
    policy = PolicyWithValueHead(models.load_causal_lm(tiny_policy), 32).eval()
    torch.nn.init.normal_(policy.v_head.weight)  # zero-initialised values would compare equal trivially
    prompts = ["Question: What is big?\n\nAnswer:", "Question: What is the capital of Peru today?\n\nAnswer:"]
    response = tok([" The opposite"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert enc["attention_mask"][0, 0] == 0  # the first prompt really is left-padded
    P = enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"], response.repeat(2, 1)], 1)
    am = torch.cat([enc["attention_mask"], torch.ones_like(response.repeat(2, 1))], 1)
    with torch.no_grad():
        batched, values, _ = response_logprobs(policy, ids, am, P)
        alone_ids = torch.cat([tok(prompts[:1], return_tensors="pt")["input_ids"], response], 1)
        alone, alone_values, _ = response_logprobs(policy, alone_ids, torch.ones_like(alone_ids),
                                                   alone_ids.shape[1] - response.shape[1])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[0], alone_values[0], atol=1e-5, rtol=1e-5)


def test_rollout_samples_from_the_policy_itself_when_eos_is_ignored(tiny_policy):
    """stop_at_eos=False: generation goes on to the drawn length, but EOS is never banned — the log-probs of
    the sampled tokens under the sampling distribution equal the policy's own (what PPO's ratios use)."""
    from rlhf_lib import models, rl

    model, tokenizer = models.load_causal_lm(tiny_policy).eval(), models.load_tokenizer(tiny_policy)
    enc = tokenizer(["Question: What sound does a cow make?\n\nAnswer:"] * 16, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    config = sampling.generation_config(model, tokenizer, 24, stop_at_eos=False)
    config.output_scores, config.return_dict_in_generate = True, True
    out = model.generate(**enc, generation_config=config)
    P = enc["input_ids"].shape[1]
    tokens = out.sequences[:, P:]
    assert tokens.shape[1] == 24  # never stopped early
    sampling_logp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)
    assert torch.isfinite(sampling_logp[..., tokenizer.eos_token_id]).all(), "EOS must not be banned"
    am = torch.ones_like(out.sequences)
    logits = model(input_ids=out.sequences, attention_mask=am, position_ids=rl.position_ids(am)).logits
    policy_lp = rl.logprobs_from_logits(logits[:, P - 1:-1], tokens)
    sampled_lp = torch.gather(sampling_logp, 2, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(sampled_lp, policy_lp, atol=1e-4, rtol=1e-4)

    # The rollout keeps every token up to each drawn length, EOS or not.
    batch = sampling.TransformersSampler(model, tokenizer).sample(
        ["Question: Hi?\n\nAnswer:"] * 4, [5, 9, 12, 3], stop_at_eos=False, max_prompt_length=32)
    assert batch.response_mask.sum(1).tolist() == [5, 9, 12, 3]
