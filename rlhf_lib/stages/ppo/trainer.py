"""Our PPO: the loop, checkpoints and resume (CleanRL-style: one readable file; the math is in losses.py).

    python -m rlhf_lib.stages.ppo --config run.json --output DIR \\
        --input sft_model=MERGED_SFT_DIR --input reward_model=DIR --input prompts=LAKE_URI [--resume-from CKPT]
    (or --input reward_function=function:module:fn in place of reward_model: a Python reward, rlhf_lib/scoring.py)

Policy: the merged SFT model with a fresh LoRA adapter and a value head on its last hidden state.
Reference: the same model with the adapter disabled (no second copy in memory). Each step:

  1. rollout: a batch of prompts; responses sampled (top_k=0, top_p=1) to lengths drawn from [min, max];
     scored by the reward on the decoded query + response (a reward model through its own tokenizer);
     the policy's log-probs, entropy and values come from generation itself (the sampler is the policy);
  2. reference log-probs of the responses: one forward with the adapter off (no grad);
  3. per-token rewards -beta * KL plus the score on the last token; GAE advantages, whitened over the global
     batch, and returns;
  4. ppo_epochs passes over shuffled optimizer steps of mini_batch_size x gradient_accumulation_steps rollouts:
     clipped policy loss + vf_coef * clipped value loss, each the mean over the step's tokens;
  5. the adaptive KL controller moves beta toward the per-sequence KL target, fed the global batch's KL.

The update is defined on the global batch (`ppo.batch_size` prompts per step, whatever the layout): N processes
(GPUs, or nodes) each generate batch_size / N of them, and compute exactly what one process computes on the whole
batch — the same whitening, the same KL controller update, the same gradient (each process's loss is its share of
the global token mean; the gradients are summed across processes, not averaged) and the same shuffle (one global
permutation per epoch; each process works on its members of each mini-batch). `tests/test_ppo_layout.py` checks
2 processes against 1 in float64.

Dropout stays off throughout (model.eval()): with dropout on, the importance ratio of the first mini-batch
would not be 1, and the same rollout would score differently on every pass.

Outputs: DIR/checkpoints/step-N (adapter, value head, optimizer, KL controller, RNG states, data cursor, stats;
atomic, last `keep_checkpoints` kept), DIR/snapshots/step-N (the adapter alone at every checkpoint, all kept: the
evaluation's over-optimisation curve), DIR/adapter, DIR/value_head.safetensors, DIR/merged (standalone model),
DIR/result.json.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from rlhf_lib import checkpoints, precision, sampling, storage, uploads
from rlhf_lib.data import lake
from rlhf_lib.stages import contract
from rlhf_lib.stages.ppo import losses
from rlhf_lib.stages.ppo.policy import VALUE_HEAD_FILE, save_weights, setup_policy, trainable_parameters
from rlhf_lib.stages.ppo.processes import Processes
from rlhf_lib.stages.ppo.prompts import PromptOrder

STATE_FILE = "training_state.pt"


# ------------------------------------------------------------------ one PPO step


# A forward pass without gradients keeps no activations: it takes this many mini-batches of rows at once.
NO_GRAD_CHUNK_MINIBATCHES = 4


@torch.no_grad()
def _score_rollout(policy, batch: sampling.RolloutBatch, chunk: int) -> dict[str, torch.Tensor]:
    """The rollout scored before the update: the reference log-probs (adapter off), and — unless generation already
    gave them — the policy's old log-probs, values and entropy, in chunks to bound memory."""
    ids_all, am_all, P = batch.input_ids, batch.attention_mask, batch.prompt_length
    parts: dict[str, list] = {"ref_logprobs": []} if batch.sampled else {
        "logprobs": [], "values": [], "entropy": [], "ref_logprobs": []}
    for i in range(0, len(ids_all), chunk):
        ids, am = ids_all[i:i + chunk], am_all[i:i + chunk]
        if not batch.sampled:
            lp, v, ent = sampling.response_logprobs(policy, ids, am, P, with_entropy=True)
            parts["logprobs"].append(lp), parts["values"].append(v), parts["entropy"].append(ent)
        with policy.lm.disable_adapter():
            parts["ref_logprobs"].append(sampling.response_logprobs(policy, ids, am, P)[0])
    return {**(batch.sampled or {}), **{k: torch.cat(v) for k, v in parts.items()}}


def advantages_and_returns(scores, scored: dict, mask, kl_coef: float, p, processes: Processes = Processes()):
    """Per-token rewards (score on the last token, -beta * KL on every token), GAE advantages whitened over the
    global batch, and returns. Returns (advantages, returns, per-token KL)."""
    rewards, kl = losses.per_token_rewards(scores, scored["logprobs"], scored["ref_logprobs"], mask, kl_coef)
    advantages, returns = losses.gae(rewards, scored["values"], mask, p.gamma, p.lam)
    return losses.masked_whiten(advantages, mask, reduce=processes.reduce), returns, kl


STAT_KEYS = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac")


def minibatch_objective(logprobs, values, old_logprobs, old_values, advantages, returns, mask, tokens, p):
    """PPO's objective on one micro-batch from the policy's new log-probs and values: clipped policy loss +
    vf_coef x clipped value loss, each its share of the optimizer step's global token mean (`tokens`); and the
    stats (STAT_KEYS) on the same footing."""
    pg_loss, pg_stats = losses.policy_loss(logprobs, old_logprobs, advantages, mask, p.cliprange, tokens)
    vf_loss, vf_stats = losses.value_loss(values, old_values, returns, mask, p.cliprange_value, tokens)
    return pg_loss + p.vf_coef * vf_loss, torch.stack([pg_loss, vf_loss, pg_stats["clipfrac"],
                                                       pg_stats["approx_kl"], vf_stats["vf_clipfrac"]]).detach()


def minibatch_loss(policy, ids, am, P, old_logprobs, old_values, advantages, returns, mask, tokens, p):
    """The loss of one micro-batch (a forward of the policy, then `minibatch_objective`) and its stats."""
    logprobs, values, _ = sampling.response_logprobs(policy, ids, am, P)
    return minibatch_objective(logprobs, values, old_logprobs, old_values, advantages, returns, mask, tokens, p)


def ppo_step(policy, optimizer, batch: sampling.RolloutBatch, kl_ctl, p, *, processes: Processes = Processes(),
             shuffle_seed: int = 0) -> dict[str, float]:
    """PPO on one rollout batch (this process's slice of the global batch): rewards with the KL penalty, GAE,
    then ppo_epochs passes of optimizer steps over mini_batch_size x gradient_accumulation_steps rollouts of the
    global batch, in one global shuffle per epoch seeded by `shuffle_seed` (the same on every process)."""
    ids, am, P, scores = batch.input_ids, batch.attention_mask, batch.prompt_length, batch.scores
    scored = _score_rollout(policy, batch, p.mini_batch_size * NO_GRAD_CHUNK_MINIBATCHES)
    mask = batch.response_mask.to(scored["values"].dtype)
    advantages, returns, kl = advantages_and_returns(scores, scored, mask, kl_ctl.value, p, processes)

    b = len(ids)
    first = processes.rank * b  # this process's rows in the global batch
    step_size = p.mini_batch_size * p.gradient_accumulation_steps  # global rollouts per optimizer step
    params = trainable_parameters(policy)
    generator = torch.Generator().manual_seed(shuffle_seed)
    step_stats: list[torch.Tensor] = []
    early_stopped = False
    for _ in range(p.ppo_epochs):
        order = torch.randperm(b * processes.world, generator=generator)
        for start in range(0, len(order), step_size):
            members = order[start:start + step_size]
            mine = members[(members >= first) & (members < first + b)] - first
            tokens = processes.reduce(mask[mine].sum())  # the step's tokens on every process: the loss's denominator
            sums = torch.zeros(len(STAT_KEYS), dtype=mask.dtype, device=mask.device)
            for micro in members.split(p.mini_batch_size):
                idx = micro[(micro >= first) & (micro < first + b)] - first
                if len(idx) == 0:  # this process holds none of this micro-batch
                    continue
                loss, contribution = minibatch_loss(policy, ids[idx], am[idx], P, scored["logprobs"][idx],
                                                    scored["values"][idx], advantages[idx], returns[idx], mask[idx],
                                                    tokens, p)
                loss.backward()
                sums += contribution
            processes.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            step_stats.append(sums)
            if p.early_stopping and float(processes.reduce(sums[3])) > 1.5 * p.target_kl:
                early_stopped = True  # every process sees the same global approx-KL, so all stop together
                break
        if early_stopped:
            break

    stats, samples = step_stats_of(scores, kl, mask, scored["entropy"], step_stats, kl_ctl.value, processes)
    stats = {**stats, "early_stopped": early_stopped, "samples": samples}  # samples: the global batch
    kl_ctl.update(stats["kl"], samples)
    return stats


def step_stats_of(scores, kl, mask, entropy, step_stats: list[torch.Tensor], beta: float, processes: Processes
                  ) -> tuple[dict, int]:
    """A PPO step's stats over the global batch — score, KL, beta, entropy, length, and each optimizer step's loss
    statistics (STAT_KEYS) averaged — and the global batch's size."""
    per_step = processes.reduce(torch.stack(step_stats)).mean(0)  # each optimizer step's global means, averaged
    local = torch.stack([scores.float(), kl.sum(1).float(), mask.sum(1).float()], dim=1)
    gathered = processes.gather(local.to(mask.device)).cpu()
    g_scores, g_kl, g_len = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    ent = processes.reduce(torch.stack([(entropy * mask).sum(), mask.sum()]).float())
    return {
        "score_mean": float(g_scores.mean()),
        "score_std": float(g_scores.std()) if len(g_scores) > 1 else 0.0,
        "kl": float(g_kl.mean()),
        "beta": beta,
        "entropy": float(ent[0] / ent[1].clamp(min=1)),
        "response_length_mean": float(g_len.mean()),
        **{k: float(v) for k, v in zip(STAT_KEYS, per_step)},
    }, len(g_scores)


def score_rollout(reward, tokenizer, prompts: list[str], batch: sampling.RolloutBatch, shared_tokenizer: bool
                  ) -> torch.Tensor:
    """The reward of each rollout: from its token ids when the reward model shares the policy's tokenizer, else
    from the decoded text through the reward's own tokenizer (or function)."""
    if shared_tokenizer:
        return reward.score_ids(batch.input_ids, batch.attention_mask)
    return reward(prompts, sampling.decode_responses(tokenizer, batch))


def shuffle_seed(run_seed: int, step: int) -> int:
    """The seed of step `step`'s mini-batch shuffle: the same on every process, and needing no saved state."""
    return run_seed * 1_000_003 + step


# ------------------------------------------------------------------ checkpoints


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, policy, optimizer, kl_ctl, prompt_order, length_gen, stats, keep: int,
                    mirror: str | None = None, rng_by_rank: list[dict] | None = None) -> Path:
    """A checkpoint of everything the loop holds. `rng_by_rank`: every process's RNG states (each samples its own
    rollouts from its own stream), rank 0's alone when None."""
    rng_by_rank = rng_by_rank or [_rng_state()]

    def write(tmp: Path) -> None:
        save_weights(policy, tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "kl_ctl": kl_ctl.state_dict(),
                    "sampler": prompt_order.state_dict(), "length_rng": length_gen.get_state(), "rng": rng_by_rank[0],
                    "rng_by_rank": rng_by_rank, "stats": stats}, tmp / STATE_FILE)

    return checkpoints.save(root, step, write, keep=keep, mirror=mirror)


def load_checkpoint(path: Path) -> dict:
    """Everything needed to continue from a checkpoint; raises on a corrupt file (safetensors, weights_only)."""
    from safetensors.torch import load_file

    from rlhf_lib import models

    path = Path(path)
    state = checkpoints.parse_file(path / STATE_FILE, lambda f: torch.load(f, map_location="cpu", weights_only=True))
    state["value_head"] = load_file(path / VALUE_HEAD_FILE)
    state["adapter"] = models.adapter_weights(path / "adapter")
    return state


def _restore(state: dict, policy, optimizer, kl_ctl, prompt_order, length_gen,
             processes: Processes = Processes()) -> None:
    """Put a checkpoint back; each process takes its own RNG states when the checkpoint has one per process of this
    layout (else rank 0's: a different layout samples differently anyway)."""
    from rlhf_lib import models

    models.restore_adapter(policy.lm, state["adapter"])
    policy.v_head.load_state_dict(state["value_head"])
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    prompt_order.load_state_dict(state["sampler"])
    length_gen.set_state(state["length_rng"])
    by_rank = state.get("rng_by_rank") or []
    _set_rng_state(by_rank[processes.rank] if len(by_rank) == processes.world else state["rng"])


# ------------------------------------------------------------------ the recipe: setup, resume, train, finish


class PPORun:
    """Everything one PPO stage holds: its config, processes, policy, reward, prompt order, optimizer, KL
    controller, the response-length generator, and the stats so far."""

    def __init__(self, stage: contract.StageRun):
        from accelerate import Accelerator

        from rlhf_lib import scoring

        self.stage, self.cfg, self.p = stage, stage.cfg, stage.cfg.ppo
        self.sft_model, prompts_uri = stage.paths
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        # The process group (its timeout from run.process_group_timeout_s) and this process's device.
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=self.cfg.run.process_group_timeout_s))
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[timeout])
        self.processes = Processes(self.accelerator.process_index, self.accelerator.num_processes)
        from rlhf_lib.methods import ppo_batch_problem

        problem = ppo_batch_problem(self.p.batch_size, self.processes.world)
        if problem:
            raise SystemExit(problem)
        self.local_batch = self.p.batch_size // self.processes.world
        self.policy, self.tokenizer = setup_policy(self.cfg, self.sft_model, self.accelerator.device)
        self.reward = scoring.load_reward(stage.inputs, self.p.reward_max_length, self.cfg.run.trust_remote_code,
                                          self.accelerator.device)
        self.shared_tokenizer = isinstance(self.reward, scoring.ModelReward) and \
            self.reward.shares_tokenizer(self.tokenizer)
        prompts = lake.rl_prompts(prompts_uri, self.cfg.data.stream_batch_size, self.cfg.data.prompt_format)
        self.prompt_order = PromptOrder(prompts, self.cfg.run.seed, self.processes.rank, self.processes.world)
        self.sampler = sampling.TransformersSampler(self.policy, self.tokenizer)  # what generates the rollouts
        self.optimizer = torch.optim.Adam(trainable_parameters(self.policy), lr=self.p.learning_rate)
        self.kl_ctl = (losses.AdaptiveKLController(self.p.init_kl_coef, self.p.kl_target, self.p.kl_horizon)
                       if self.p.adaptive_kl else losses.FixedKLController(self.p.init_kl_coef))
        self.length_gen = torch.Generator().manual_seed(self.cfg.run.seed)
        self.stats: list[dict] = []
        self.start_step = 0

    def describe(self) -> None:
        p, rank, b = self.p, self.processes.rank, self.local_batch
        self.stage.say(f"rank {rank}/{self.processes.world}: prompts [{rank * b}, {(rank + 1) * b}) of each global "
                       f"batch of {p.batch_size}; optimizer steps of {p.mini_batch_size * p.gradient_accumulation_steps} "
                       f"rollouts (mini-batch {p.mini_batch_size} x accumulation {p.gradient_accumulation_steps}); "
                       f"rank 0 writes checkpoints")


def resume(run: PPORun) -> None:
    """Continue from the newest checkpoint that loads (its weights, optimizer, controller, data cursor, RNGs)."""
    found = checkpoints.resume_point("ppo", run.stage.args.resume_from, run.stage.out, load_checkpoint,
                                     run.stage.args.checkpoint_uri)
    if found:
        path, state = found
        _restore(state, run.policy, run.optimizer, run.kl_ctl, run.prompt_order, run.length_gen, run.processes)
        run.start_step, run.stats = state["step"], list(state["stats"])
        run.accelerator.print(f"[ppo] resumed from step {run.start_step} ({path})")
    run.policy.eval()


def rollout_step(run: PPORun, step: int, samples: list | None = None) -> dict:
    """One PPO step: a rollout of this process's share of the global batch, scored, then the update. `samples`: a
    list to put this step's first two (prompt, response, score) in, for the live card."""
    p, rank, b = run.p, run.processes.rank, run.local_batch
    prompts = run.prompt_order.next_batch(b)
    # Lengths are drawn for the global batch, then sliced: the same lengths whatever the layout.
    lengths = sampling.sample_lengths(p.batch_size, p.min_response_length, p.max_response_length,
                                     run.length_gen)[rank * b:(rank + 1) * b]
    batch = run.sampler.sample(prompts, lengths, stop_at_eos=p.stop_at_eos, max_prompt_length=p.max_prompt_length)
    batch.scores = score_rollout(run.reward, run.tokenizer, prompts, batch, run.shared_tokenizer)
    if samples is not None:
        P = batch.prompt_length
        samples += [{"prompt": prompts[i], "response": run.tokenizer.decode(
            batch.input_ids[i, P:][batch.response_mask[i].bool()], skip_special_tokens=True),
            "score": round(float(batch.scores[i]), 3)} for i in range(min(2, len(prompts)))]
    stats = ppo_step(run.policy, run.optimizer, batch, run.kl_ctl, p, processes=run.processes,
                     shuffle_seed=shuffle_seed(run.cfg.run.seed, step))
    run.sampler.policy_changed()  # the adapter moved in this process; an engine elsewhere would load a saved one
    return {"step": step + 1, **stats}


def train(run: PPORun, wandb_run) -> None:
    """Every step from where the run stands to ppo.steps; a checkpoint and a snapshot every save_freq steps."""
    from rlhf_lib.progress import Progress

    p, out, main = run.p, run.stage.out, run.accelerator.is_main_process
    progress = Progress("ppo", p.steps, start=run.start_step, out=out, main=main)
    for step in range(run.start_step, p.steps):
        samples = [] if main else None
        with precision.current().autocast_on(run.accelerator.device):  # bf16 forward passes under the bf16 plan
            stats = rollout_step(run, step, samples)
        run.stats.append(stats)
        progress.update(step + 1, shown={k: stats[k] for k in ("score_mean", "kl", "beta")},
                        **{k: v for k, v in stats.items() if k != "step" and isinstance(v, (int, float))})
        if main:
            progress.note(samples=samples, step=step + 1)
        if wandb_run is not None:
            wandb_run.log({f"ppo/{k}": v for k, v in stats.items() if k != "step"}, step=step + 1)
        if (step + 1) % p.save_freq == 0 or step + 1 == p.steps:
            rng_by_rank = run.processes.gather_objects(_rng_state())  # every process's: each samples its own rollouts
            if run.accelerator.is_main_process:
                checkpoints.snapshot_then_checkpoint(
                    run.policy.lm, out, step + 1, run.stage.args.checkpoint_uri,
                    lambda: save_checkpoint(out / "checkpoints", step + 1, run.policy, run.optimizer, run.kl_ctl,
                                            run.prompt_order, run.length_gen, run.stats, p.keep_checkpoints,
                                            mirror=storage.mirror_of(run.stage.args.checkpoint_uri),
                                            rng_by_rank=rng_by_rank))
                progress.note(checkpoint=str(checkpoints.step_dir(out / "checkpoints", step + 1)), step=step + 1)
    run.accelerator.wait_for_everyone()


def finish(run: PPORun) -> None:
    """On the main process: the adapter and value head, the merged model, the result — once every checkpoint and
    snapshot is stored (the other processes have finished: nothing waits for the uploads at a collective)."""
    uploads.UPLOADS.wait()
    out, stats = run.stage.out, run.stats
    save_weights(run.policy, out)
    run.tokenizer.save_pretrained(out / "adapter")
    quarter = max(1, len(stats) // 4)
    first_q = float(np.mean([s["score_mean"] for s in stats[:quarter]])) if stats else math.nan
    last_q = float(np.mean([s["score_mean"] for s in stats[-quarter:]])) if stats else math.nan
    contract.finish_policy(
        run.stage, out / "adapter", run.sft_model, snapshots=True,
        value_head_path=str((out / VALUE_HEAD_FILE).resolve()), reward=run.reward.describe(), stats=stats,
        resumed_from_step=run.start_step,
        summary=f"mean score first quarter {first_q:.3f} -> last quarter {last_q:.3f}",
        metrics={"score_first_quarter": first_q, "score_last_quarter": last_q, "final_beta": run.kl_ctl.value,
                 "steps": len(stats), "ranks": run.processes.world, "global_batch": run.p.batch_size,
                 "precision": precision.record(run.policy)})


def main(argv: list[str] | None = None) -> Path:
    from rlhf_lib import tracking

    run = PPORun(contract.start("ppo", argv, "sft_model", "prompts"))
    run.describe()
    # W&B first: whatever randomness its start-up uses must not come after the restored RNG state.
    with tracking.wandb_run(run.cfg, "ppo", enabled=run.accelerator.is_main_process) as wandb_run:
        resume(run)
        train(run, wandb_run)
    if run.accelerator.is_main_process:
        finish(run)
    return run.stage.out
