"""Our PPO: the loop, checkpoints and resume (CleanRL-style: one readable file; the math is in losses.py).

    python -m rlhf_lib.stages.ppo --config run.json --output DIR \\
        --input sft_model=MERGED_SFT_DIR --input reward_model=DIR --input prompts=LAKE_URI [--resume-from CKPT]

Policy: the merged SFT model with a fresh LoRA adapter and a value head on its last hidden state.
Reference: the same model with the adapter disabled (no second copy in memory). Each step:

  1. rollout: a batch of prompts; responses sampled (top_k=0, top_p=1) to lengths drawn from [min, max];
     scored by the reward model on the decoded query + response, with the reward model's own tokenizer;
  2. log-probs, values and reference log-probs of the responses (no grad);
  3. per-token rewards -beta * KL plus the score on the last token; GAE advantages (whitened) and returns;
  4. ppo_epochs passes over shuffled mini-batches: clipped policy loss + vf_coef * clipped value loss;
  5. the adaptive KL controller moves beta toward the per-sequence KL target.

Dropout stays off throughout (model.eval()): with dropout on, the importance ratio of the first mini-batch
would not be 1, and the same rollout would score differently on every pass.

Outputs: DIR/checkpoints/step-N (adapter, value head, optimizer, KL controller, RNG states, data cursor, stats;
atomic, last `keep_checkpoints` kept), DIR/adapter, DIR/value_head.safetensors, DIR/merged (standalone model),
DIR/result.json.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rlhf_lib import checkpoints, rl
from rlhf_lib.data import lake
from rlhf_lib.stages import common
from rlhf_lib.stages.ppo import losses, rollout

STATE_FILE = "training_state.pt"
VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyWithValueHead(nn.Module):
    """A causal LM (with its LoRA adapter) and a scalar value head on its last hidden state."""

    def __init__(self, lm: nn.Module, hidden_size: int):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=rl.position_ids(attention_mask), output_hidden_states=True)
        values = self.v_head(out.hidden_states[-1].float()).squeeze(-1)
        return out.logits, values


class PromptSampler:
    """Deterministic, resumable prompt order: a seeded permutation per epoch; the cursor is the data position.

    With several processes, each takes its own slice of every global batch."""

    def __init__(self, prompts: list[str], seed: int, rank: int = 0, world: int = 1):
        self.prompts, self.seed, self.rank, self.world = prompts, seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        return torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def next_batch(self, batch_size: int) -> list[str]:
        global_batch = []
        while len(global_batch) < batch_size * self.world:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            global_batch.append(self._order[self.cursor])
            self.cursor += 1
        mine = global_batch[self.rank * batch_size:(self.rank + 1) * batch_size]
        return [self.prompts[i] for i in mine]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)


# ------------------------------------------------------------------ setup


def _setup_policy(cfg, sft_model: str, device):
    from peft import get_peft_model

    from rlhf_lib import models

    base = models.load_causal_lm(sft_model, trust_remote_code=cfg.run.trust_remote_code)
    lm = get_peft_model(base, models.lora_config(cfg.ppo.lora))
    hidden = getattr(base.config, "word_embed_proj_dim", None) or base.config.hidden_size
    policy = PolicyWithValueHead(lm, hidden).to(device)
    policy.eval()
    tokenizer = models.load_tokenizer(sft_model, cfg.run.trust_remote_code, padding_side="left")
    return policy, tokenizer


def _setup_reward_model(cfg, reward_model: str, device):
    from rlhf_lib import models

    rm = models.load_reward_model(reward_model, cfg.run.trust_remote_code).to(device)
    rm.eval()
    rm.requires_grad_(False)
    return rm, models.load_tokenizer(reward_model, cfg.run.trust_remote_code, padding_side="right")


def _trainable_parameters(policy: PolicyWithValueHead) -> list[nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]


# ------------------------------------------------------------------ one PPO step


def _forward_response(policy: PolicyWithValueHead, input_ids, attention_mask, P: int, with_entropy=False):
    """Log-probs of the response tokens and the values of the states that emitted them."""
    logits, values = policy(input_ids, attention_mask)
    logits = logits[:, P - 1:-1]
    logprobs = rl.logprobs_from_logits(logits, input_ids[:, P:])
    entropy = rl.entropy_from_logits(logits) if with_entropy else None
    return logprobs, values[:, P - 1:-1], entropy


@torch.no_grad()
def _score_rollout(policy, input_ids, attention_mask, P, chunk: int):
    """Old log-probs, values, reference log-probs (adapter off) and entropy, in chunks to bound memory."""
    parts = {"logprobs": [], "values": [], "ref_logprobs": [], "entropy": []}
    lm = policy.lm
    for i in range(0, len(input_ids), chunk):
        ids, am = input_ids[i:i + chunk], attention_mask[i:i + chunk]
        lp, v, ent = _forward_response(policy, ids, am, P, with_entropy=True)
        with lm.disable_adapter():
            ref_lp, _, _ = _forward_response(policy, ids, am, P)
        for key, val in zip(parts, (lp, v, ref_lp, ent)):
            parts[key].append(val)
    return {k: torch.cat(v) for k, v in parts.items()}


def ppo_step(policy, optimizer, accelerator, batch: rollout.RolloutBatch, kl_ctl, p) -> dict[str, float]:
    """PPO on one rollout batch: old log-probs and values, rewards with the KL penalty, GAE, ppo_epochs passes."""
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    mask, P, scores = batch.response_mask.float(), batch.prompt_length, batch.scores
    old = _score_rollout(accelerator.unwrap_model(policy), input_ids, attention_mask, P, p.mini_batch_size)
    rewards, kl = losses.per_token_rewards(scores, old["logprobs"], old["ref_logprobs"], mask, kl_ctl.value)
    advantages, returns = losses.gae(rewards, old["values"], mask, p.gamma, p.lam)
    advantages = losses.masked_whiten(advantages, mask)

    B = len(input_ids)
    # Per-mini-batch stats stay on the device until the step ends: no host sync inside the loop.
    agg: dict[str, list[torch.Tensor]] = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": [],
                                          "vf_clipfrac": []}
    early_stopped = False
    for _ in range(p.ppo_epochs):
        order = torch.randperm(B).tolist()
        for start in range(0, B, p.mini_batch_size):
            idx = order[start:start + p.mini_batch_size]
            with accelerator.accumulate(policy):
                logprobs, values, _ = _forward_response(policy, input_ids[idx], attention_mask[idx], P)
                pg_loss, pg_stats = losses.policy_loss(logprobs, old["logprobs"][idx], advantages[idx], mask[idx],
                                                       p.cliprange)
                vf_loss, vf_stats = losses.value_loss(values, old["values"][idx], returns[idx], mask[idx],
                                                      p.cliprange_value)
                accelerator.backward(pg_loss + p.vf_coef * vf_loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(_trainable_parameters(accelerator.unwrap_model(policy)),
                                                p.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            for key, val in (("policy_loss", pg_loss), ("value_loss", vf_loss), *pg_stats.items(),
                             *vf_stats.items()):
                agg[key].append(val.detach())
            if p.early_stopping and pg_stats["approx_kl"] > 1.5 * p.target_kl:
                early_stopped = True
                break
        if early_stopped:
            break

    seq_kl = kl.sum(1)
    local = torch.stack([scores.float(), seq_kl.float(), mask.sum(1).float()], dim=1)
    gathered = accelerator.gather(local.to(accelerator.device)).cpu()
    g_scores, g_kl, g_len = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    stats = {
        "score_mean": float(g_scores.mean()),
        "score_std": float(g_scores.std()) if len(g_scores) > 1 else 0.0,
        "kl": float(g_kl.mean()),
        "beta": kl_ctl.value,
        "entropy": float(losses.masked_mean(old["entropy"], mask)),
        "response_length_mean": float(g_len.mean()),
        **{k: float(torch.stack(v).mean()) if v else 0.0 for k, v in agg.items()},
        "early_stopped": early_stopped,
        "samples": len(g_scores),  # gathered from every rank
    }
    kl_ctl.update(stats["kl"], len(g_scores))
    return stats


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


def _save_weights(policy: PolicyWithValueHead, directory: Path) -> None:
    from safetensors.torch import save_file

    policy.lm.save_pretrained(directory / "adapter", safe_serialization=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in policy.v_head.state_dict().items()},
              directory / VALUE_HEAD_FILE)


def save_checkpoint(root: Path, step: int, policy, optimizer, kl_ctl, sampler, length_gen, stats, keep: int,
                    mirror: str | None = None) -> Path:
    def write(tmp: Path) -> None:
        _save_weights(policy, tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "kl_ctl": kl_ctl.state_dict(),
                    "sampler": sampler.state_dict(), "length_rng": length_gen.get_state(), "rng": _rng_state(),
                    "stats": stats}, tmp / STATE_FILE)

    return checkpoints.save(root, step, write, keep=keep, mirror=mirror)


def load_checkpoint(path: Path) -> dict:
    """Everything needed to continue from a checkpoint; raises on a corrupt file (safetensors, weights_only)."""
    from safetensors.torch import load_file

    path = Path(path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    state["value_head"] = load_file(path / VALUE_HEAD_FILE)
    state["adapter"] = load_file(path / "adapter" / "adapter_model.safetensors")
    return state


def _restore(state: dict, policy, optimizer, kl_ctl, sampler, length_gen) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(policy.lm, state["adapter"])
    policy.v_head.load_state_dict(state["value_head"])
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    sampler.load_state_dict(state["sampler"])
    length_gen.set_state(state["length_rng"])
    _set_rng_state(state["rng"])


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> Path:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from rlhf_lib import models, tracking
    from rlhf_lib.scoring import score_responses

    started, args, cfg, (sft_model, reward_model, prompts_uri), out = common.start(
        "ppo", argv, "sft_model", "reward_model", "prompts")
    ckpt_root = out / "checkpoints"
    p = cfg.ppo

    accelerator = Accelerator(gradient_accumulation_steps=p.gradient_accumulation_steps, cpu=not torch.cuda.is_available())
    device = accelerator.device
    policy, tokenizer = _setup_policy(cfg, sft_model, device)
    reward, reward_tokenizer = _setup_reward_model(cfg, reward_model, device)
    prompts_all = lake.rl_prompts(prompts_uri, cfg.data.stream_batch_size)
    sampler = PromptSampler(prompts_all, cfg.run.seed, accelerator.process_index,
                            accelerator.num_processes)
    rank, world = accelerator.process_index, accelerator.num_processes
    print(f"[ppo] rank {rank}/{world}: prompts [{rank * p.batch_size}, {(rank + 1) * p.batch_size}) of each global "
          f"batch of {world * p.batch_size}; stats gathered from all ranks; rank 0 writes checkpoints", flush=True)
    optimizer = torch.optim.Adam(_trainable_parameters(policy), lr=p.learning_rate)
    kl_ctl = (losses.AdaptiveKLController(p.init_kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else losses.FixedKLController(p.init_kl_coef))
    length_gen = torch.Generator().manual_seed(cfg.run.seed)
    stats_history: list[dict] = []
    start_step = 0

    # W&B first: whatever randomness its start-up uses must not come after the restored RNG state.
    wandb_run = tracking.init_wandb(cfg, "ppo") if accelerator.is_main_process else None
    found = common.checkpoint_resume_point(args.resume_from, ckpt_root, load_checkpoint, lambda st: st["step"])
    if found:
        path, state = found
        _restore(state, policy, optimizer, kl_ctl, sampler, length_gen)
        start_step, stats_history = state["step"], list(state["stats"])
        accelerator.print(f"[ppo] resumed from step {start_step} ({path})")
    policy, optimizer = accelerator.prepare(policy, optimizer)
    policy.eval()

    bar = tqdm(range(start_step, p.steps), desc="ppo", initial=start_step, total=p.steps,
               disable=not accelerator.is_main_process, mininterval=2)
    for step in bar:
        prompts = sampler.next_batch(p.batch_size)
        lengths = rollout.sample_lengths(len(prompts), p.min_response_length, p.max_response_length, length_gen)
        unwrapped = accelerator.unwrap_model(policy)
        input_ids, attention_mask, r_mask, P = rollout.generate(
            unwrapped.lm, tokenizer, prompts, lengths, stop_at_eos=p.stop_at_eos,
            max_prompt_length=p.max_prompt_length)
        responses = rollout.decode_responses(tokenizer, input_ids, r_mask, P)
        scores = score_responses(reward, reward_tokenizer, prompts, responses, p.reward_max_length)
        batch = rollout.RolloutBatch(input_ids, attention_mask, r_mask, P, scores)
        stats = {"step": step + 1, **ppo_step(policy, optimizer, accelerator, batch, kl_ctl, p)}
        stats_history.append(stats)
        bar.set_postfix(score=f"{stats['score_mean']:.2f}", kl=f"{stats['kl']:.2f}", beta=f"{stats['beta']:.3f}")
        if wandb_run is not None:
            wandb_run.log({f"ppo/{k}": v for k, v in stats.items() if k != "step"}, step=step + 1)
        if (step + 1) % p.save_freq == 0 or step + 1 == p.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(ckpt_root, step + 1, accelerator.unwrap_model(policy), optimizer, kl_ctl, sampler,
                                length_gen, stats_history, p.keep_checkpoints, mirror=args.checkpoint_uri)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return out

    final = accelerator.unwrap_model(policy)
    _save_weights(final, out)
    merged = models.merge_adapter(sft_model, str(out / "adapter"), out / "merged", cfg.run.trust_remote_code)
    tokenizer.save_pretrained(out / "adapter")
    if wandb_run is not None:
        wandb_run.finish()
    quarter = max(1, len(stats_history) // 4)
    first_q = float(np.mean([s["score_mean"] for s in stats_history[:quarter]])) if stats_history else math.nan
    last_q = float(np.mean([s["score_mean"] for s in stats_history[-quarter:]])) if stats_history else math.nan
    result = common.write_result(
        out, "ppo", started, model_path=str(merged.resolve()), adapter_path=str((out / "adapter").resolve()),
        value_head_path=str((out / VALUE_HEAD_FILE).resolve()), checkpoint_dir=str(ckpt_root.resolve()),
        sft_model=sft_model, reward_model=reward_model, stats=stats_history, resumed_from_step=start_step,
        metrics={"score_first_quarter": first_q, "score_last_quarter": last_q,
                 "final_beta": kl_ctl.value, "steps": len(stats_history), "ranks": accelerator.num_processes})
    print(f"[ppo] model: {merged.resolve()}  mean score first quarter {first_q:.3f} -> last quarter {last_q:.3f}  "
          f"({result})", flush=True)
    return out
