"""Our PPO computes what the reference computes: trl 1.12's PPOTrainer (the last TRL PPO) traced on one step
(`tests/fixtures/ppo_golden_trl112.json`, made by `python bench/ppo_golden_trace.py` in trl 1.12's own environment;
nothing here needs trl) — the same tensors fed to `stages/ppo/losses.py` and to the trainer's step, in float64.

Where we differ from TRL on purpose, both sides get the same inputs at that boundary (docs/methods.md, "PPO"):
- TRL ends an episode one token *after* the last response token: the score sits on the first padding position
  and the value is trained there (`padding_mask_p1`), while the policy loss and the whitening use the response
  tokens only (`padding_mask`). We end the episode at the last response token (EOS when it stops there). Fed
  TRL's two masks, our functions give TRL's numbers; on full-length responses the masks coincide and the
  trainer's own functions are compared end to end.
- approx-KL: TRL averages ½(log r)² over every position of the micro-batch, padding included; we average over
  response tokens. The same number up to that count.
- a value head on the policy's hidden state, not a separate value model: the values are inputs here.
"""

import json

import pytest
import torch

from conftest import ROOT

FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "ppo_golden_trl112.json").read_text())
TOL = dict(rtol=0.0, atol=1e-6)


def D(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def masks(rollout: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's masks as ours: (policy tokens = response tokens, value tokens = one more)."""
    return (~torch.tensor(rollout["padding_mask"], dtype=torch.bool)).double(), \
        (~torch.tensor(rollout["padding_mask_p1"], dtype=torch.bool)).double()


def ppo_section():
    from rlhf_lib.config import PPOSection

    c = FIXTURE["ppo"]
    return PPOSection(init_kl_coef=c["kl_coef"], cliprange=c["cliprange"], vf_coef=c["vf_coef"],
                      cliprange_value=c["cliprange_value"], gamma=c["gamma"], lam=c["lam"], batch_size=8,
                      mini_batch_size=4, ppo_epochs=2)


@pytest.mark.parametrize("name", ["eos", "full"])
def test_kl_penalised_rewards_gae_whitening_and_returns(name):
    from rlhf_lib.stages.ppo import losses

    r, c = FIXTURE["traces"][name]["rollout"], FIXTURE["ppo"]
    policy_mask, value_mask = masks(r)
    rewards, kl = losses.per_token_rewards(D(r["scores"]), D(r["logprobs"]), D(r["ref_logprobs"]), value_mask,
                                           c["kl_coef"])
    torch.testing.assert_close(kl, D(r["kl"]), **TOL)
    torch.testing.assert_close(rewards, D(r["rewards"]), **TOL)
    advantages, returns = losses.gae(D(r["rewards"]), D(r["values"]), value_mask, c["gamma"], c["lam"])
    torch.testing.assert_close(advantages, D(r["advantages_gae"]), **TOL)
    torch.testing.assert_close(returns, D(r["returns"]), **TOL)
    torch.testing.assert_close(losses.masked_whiten(D(r["advantages_gae"]), policy_mask), D(r["advantages"]), **TOL)


@pytest.mark.parametrize("name", ["eos", "full"])
def test_every_minibatch_loss_clip_fraction_and_approx_kl(name):
    from rlhf_lib.stages.ppo import losses

    t, c = FIXTURE["traces"][name], FIXTURE["ppo"]
    r = t["rollout"]
    policy_mask, value_mask = masks(r)
    assert len(t["minibatches"]) == 4
    for m in t["minibatches"]:
        idx = torch.tensor(m["micro_batch_inds"])
        torch.testing.assert_close(D(m["mb_advantage"]), D(r["advantages"])[idx], rtol=0, atol=0)  # same batch
        pg_loss, pg_stats = losses.policy_loss(D(m["new_logprobs"]), D(m["mb_logprobs"]), D(m["mb_advantage"]),
                                               policy_mask[idx], c["cliprange"])
        vf_loss, vf_stats = losses.value_loss(D(m["vpred"]), D(m["mb_values"]), D(m["mb_return"]), value_mask[idx],
                                              c["cliprange_value"])
        assert float(pg_loss) == pytest.approx(m["pg_loss"], rel=0, abs=1e-6)
        assert float(vf_loss) == pytest.approx(m["vf_loss"], rel=0, abs=1e-6)
        assert float(pg_stats["clipfrac"]) == pytest.approx(m["pg_clipfrac"], rel=0, abs=1e-6)
        assert float(vf_stats["vf_clipfrac"]) == pytest.approx(m["vf_clipfrac"], rel=0, abs=1e-6)
        # TRL's approx-KL averages over every position, padding included (where log r is 0); ours over tokens.
        share = float(policy_mask[idx].sum()) / policy_mask[idx].numel()
        assert float(pg_stats["approx_kl"]) * share == pytest.approx(m["approxkl"], rel=0, abs=1e-6)
    clipped = [m["pg_clipfrac"] for m in t["minibatches"]] + [m["vf_clipfrac"] for m in t["minibatches"]]
    assert max(clipped) > 0  # the trace exercises the clipping, not only its absence


def test_the_trainers_step_end_to_end_on_full_length_responses():
    """Where TRL's masks and ours coincide (no response ends early), the trainer's own functions — rewards,
    advantages whitened over the batch, returns, and each optimizer step's objective — give TRL's numbers."""
    from rlhf_lib.stages.ppo import trainer

    t = FIXTURE["traces"]["full"]
    r, p = t["rollout"], ppo_section()
    mask = torch.ones(len(r["scores"]), len(r["logprobs"][0]), dtype=torch.float64)
    assert not any(map(any, r["padding_mask_p1"]))
    old = {"logprobs": D(r["logprobs"]), "ref_logprobs": D(r["ref_logprobs"]), "values": D(r["values"])}
    advantages, returns, kl = trainer.advantages_and_returns(D(r["scores"]), old, mask, p.init_kl_coef, p)
    torch.testing.assert_close(advantages, D(r["advantages"]), **TOL)
    torch.testing.assert_close(returns, D(r["returns"]), **TOL)
    torch.testing.assert_close(kl, D(r["kl"]), **TOL)
    for m in t["minibatches"]:
        idx = torch.tensor(m["micro_batch_inds"])
        loss, stats = trainer.minibatch_objective(D(m["new_logprobs"]), D(m["vpred"]), old["logprobs"][idx],
                                                  old["values"][idx], advantages[idx], returns[idx], mask[idx],
                                                  mask[idx].sum(), p)
        assert float(loss) == pytest.approx(m["loss"], rel=0, abs=1e-6)
        got = dict(zip(trainer.STAT_KEYS, stats.tolist()))
        assert got["policy_loss"] == pytest.approx(m["pg_loss"], rel=0, abs=1e-6)
        assert got["value_loss"] == pytest.approx(m["vf_loss"], rel=0, abs=1e-6)
        assert got["clipfrac"] == pytest.approx(m["pg_clipfrac"], rel=0, abs=1e-6)
        assert got["vf_clipfrac"] == pytest.approx(m["vf_clipfrac"], rel=0, abs=1e-6)
        assert got["approx_kl"] == pytest.approx(m["approxkl"], rel=0, abs=1e-6)


def test_adaptive_kl_controller_follows_trl_0_11():
    """trl 1.12 has only a fixed KL coefficient; the adaptive rule (Ziegler et al. 2019) as trl 0.11.4 wrote it."""
    from rlhf_lib.stages.ppo import losses

    ref = FIXTURE["kl_controller"]
    assert "np.clip(current / target - 1, -0.2, 0.2)" in ref["class_source"]
    ctl = losses.AdaptiveKLController(ref["init_kl_coef"], ref["target"], ref["horizon"])
    for update in ref["updates"]:
        assert ctl.update(update["kl"], update["n"]) == pytest.approx(update["value"], rel=1e-12)


def test_the_fixture_says_how_it_was_made():
    assert FIXTURE["command"] == "python bench/ppo_golden_trace.py"
    assert FIXTURE["made_with"]["trl"] == "1.12.0"
    assert (ROOT / "bench" / "ppo_golden_trace.py").is_file()
