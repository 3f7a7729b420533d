"""ReST — Reinforced Self-Training (Gulcehre et al. 2023): Grow a dataset from the policy, Improve on its best part.

    python -m rlhf_lib.stages.rest --config run.json --output DIR \\
        --input sft_model=MERGED_SFT_DIR --input reward_model=DIR --input prompts=LAKE_URI
    (or --input reward_function=function:module:fn in place of reward_model)

`rest.grow_steps` iterations of:
  Grow     sample `samples_per_prompt` completions for `prompts_per_grow` training prompts from the current
           policy and score them with the reward model; the grown set is kept as a Deep Lake dataset
           (DIR/grow-N), so the data a policy learned from can be inspected;
  Improve  for each threshold of the rising schedule, keep the samples scoring at or above it and fine-tune the
           policy on them (TRL SFTTrainer, loss on the completion only), before the next Grow.
Thresholds are quantiles of the *first* Grow's scores, turned into fixed reward-model scores: the bar rises
with each Improve, and a policy that improves keeps more of its later Grows (the paper's fixed thresholds on a
normalised reward).

The policy is the merged SFT model with one LoRA adapter trained through every Improve. After each Improve a
checkpoint (adapter + loop state) is written atomically; a retried or resumed task continues after the newest.
Writes DIR/grow-N, DIR/checkpoints, DIR/snapshots/step-N (the adapter after each Improve, for the evaluation's
over-optimisation curve), DIR/adapter, DIR/merged and DIR/result.json.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from rlhf_lib import checkpoints, precision, storage, uploads
from rlhf_lib.stages import contract, hf

STATE_FILE = "rest_state.json"
GROWN_DIR = "grown"


def absolute_thresholds(scores: torch.Tensor, quantiles: list[float]) -> list[float]:
    """The schedule's quantiles of a Grow's scores, as reward-model scores (non-decreasing)."""
    return [float(torch.quantile(scores.float(), q)) for q in quantiles]


def keep_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Improve's filter: the samples scoring at or above the threshold."""
    return scores >= threshold


def improve_schedule(grow_steps: int, n_thresholds: int) -> list[tuple[int, int]]:
    """(grow iteration, threshold index) of every Improve, in order; a checkpoint is written after each."""
    return [(g, j) for g in range(1, grow_steps + 1) for j in range(n_thresholds)]


def grow(policy, tokenizer, reward, prompts: list[str], cfg, iteration: int) -> list[dict]:
    """One Grow: sampled completions of a fresh draw of prompts, each with its reward (`rlhf_lib.scoring.Reward`)."""
    from rlhf_lib import sampling

    r = cfg.rest
    rng = random.Random(f"rest-grow-{cfg.run.seed}-{iteration}")
    chosen = rng.sample(prompts, min(r.prompts_per_grow, len(prompts)))
    repeated = [p for p in chosen for _ in range(r.samples_per_prompt)]
    policy.eval()
    answers, _ = sampling.sample_answers(sampling.TransformersSampler(policy, tokenizer), repeated, r.max_new_tokens,
                                          seed=cfg.run.seed + iteration)
    scores = reward(repeated, answers).cpu()
    return [{"prompt": p, "response": a, "reward": float(s)} for p, a, s in zip(repeated, answers, scores)]


def improve(policy, tokenizer, rows: list[dict], cfg, out: Path, tag: str) -> float:
    """One Improve: SFT on the kept samples (prompt -> completion), continuing the policy's adapter."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["response"].strip()}
                                       for r in rows])
    kwargs = hf.training_kwargs(cfg, cfg.rest, "rest", out / "improve" / tag)
    # The loop checkpoints itself after each Improve and logs to one W&B run; the inner trainers need neither.
    kwargs.update(save_strategy="no", eval_strategy="no", report_to=[])
    args = SFTConfig(**kwargs, max_length=cfg.rest.max_length, packing=False, completion_only_loss=True)
    trainer = SFTTrainer(model=policy, args=args, train_dataset=data, processing_class=tokenizer)
    precision.keep_trained_in_fp32(trainer.model)
    loss = trainer.train().training_loss
    policy.eval()
    return float(loss)


def _save(root: Path, index: int, policy, state: dict, keep: int = 2, mirror: str | None = None) -> Path:
    def write(tmp: Path) -> None:
        policy.save_pretrained(tmp / "adapter", safe_serialization=True)
        (tmp / STATE_FILE).write_text(json.dumps(state))
        # The grown sets travel with the checkpoint: a resume on another machine has no `out/grow-N` to read.
        for uri in state["grown"].values():
            shutil.copytree(uri, tmp / GROWN_DIR / Path(uri).name)

    return checkpoints.save(root, index, write, keep=keep, mirror=mirror)


def _load(path: Path) -> dict:
    from rlhf_lib import models

    state = json.loads((Path(path) / STATE_FILE).read_text())
    state["adapter"] = models.adapter_weights(Path(path) / "adapter")
    return state


# ------------------------------------------------------------------ the recipe: setup, resume, loop, finish


def setup(run: contract.StageRun):
    """(policy: the merged SFT model with a fresh adapter, its tokenizer, the reward, the training prompts)."""
    from rlhf_lib import models, scoring
    from rlhf_lib.data import lake

    cfg = run.cfg
    sft_model, prompts_uri = run.paths
    base, tokenizer = models.policy_on_device(sft_model, cfg.run.trust_remote_code, padding_side="left")
    policy = models.attach_lora(base, cfg.rest.lora)
    reward = scoring.load_reward(run.inputs, cfg.rest.reward_max_length, cfg.run.trust_remote_code)
    return policy, tokenizer, reward, lake.rl_prompts(prompts_uri, cfg.data.stream_batch_size, cfg.data.prompt_format)


def resume(run: contract.StageRun, policy) -> dict:
    """The loop's state: fresh, or the newest checkpoint's (its adapter put back into `policy`)."""
    from rlhf_lib import models

    state = {"improves_done": 0, "thresholds": None, "iterations": [], "grown": {}}
    found = checkpoints.resume_point("rest", run.args.resume_from, run.out, _load, run.args.checkpoint_uri)
    if found:
        path, state = found
        models.restore_adapter(policy, state.pop("adapter"))
        for g, uri in state["grown"].items():  # from a checkpoint written on another machine (or run)
            if not Path(uri).exists():
                state["grown"][g] = str(shutil.copytree(Path(path) / GROWN_DIR / Path(uri).name,
                                                        run.out / Path(uri).name))
        run.say(f"resumed from step {state['improves_done']} ({path})")
    return state


def grown_rows(run: contract.StageRun, policy, tokenizer, reward, prompts, state: dict, g: int, j: int) -> list:
    """Grow g's rows (sampled and scored now at its first Improve, read back from its Deep Lake set after)."""
    from rlhf_lib.data import lake

    if j == 0 or str(g) not in state["grown"]:
        rows = grow(policy, tokenizer, reward, prompts, run.cfg, g)
        grown = lake.write_rows(run.out / f"grow-{g}", rows, ["prompt", "response", "reward"], numeric=("reward",))
        state["grown"][str(g)] = grown["uri"]
        if state["thresholds"] is None:
            quantiles = run.cfg.rest.thresholds
            state["thresholds"] = absolute_thresholds(torch.tensor([x["reward"] for x in rows]), quantiles)
            run.say(f"thresholds (quantiles {quantiles} of Grow 1): {[round(t, 3) for t in state['thresholds']]}")
    return list(lake.stream(state["grown"][str(g)], ["prompt", "response", "reward"]))


def improve_step(run: contract.StageRun, policy, tokenizer, rows: list, state: dict, g: int, j: int) -> dict:
    """Improve j of Grow g: keep the rows at or above its threshold and fine-tune on them. Returns its record."""
    scores = torch.tensor([float(x["reward"]) for x in rows])
    threshold = state["thresholds"][j]
    mask = keep_mask(scores, threshold)
    kept = [x for x, k in zip(rows, mask.tolist()) if k]
    loss = improve(policy, tokenizer, kept, run.cfg, run.out, f"g{g}-t{j}") if kept else float("nan")
    record = {"grow": g, "improve": j + 1, "threshold_quantile": run.cfg.rest.thresholds[j], "threshold": threshold,
              "samples": len(rows), "kept": len(kept), "kept_fraction": len(kept) / max(len(rows), 1),
              "mean_reward_all": float(scores.mean()),
              "mean_reward_kept": float(scores[mask].mean()) if kept else float("nan"), "train_loss": loss,
              "grown_set": state["grown"][str(g)]}
    run.say(f"grow {g} improve {j + 1}/{len(run.cfg.rest.thresholds)}: kept {len(kept)}/{len(rows)} "
            f"(score >= {threshold:.3f}), mean reward all {record['mean_reward_all']:.3f}, "
            f"kept {record['mean_reward_kept']:.3f}, loss {loss:.3f}")
    return record


def train(run: contract.StageRun, policy, tokenizer, reward, prompts, state: dict, wandb_run) -> None:
    """Every Improve of the schedule not done yet, each followed by a checkpoint and a snapshot."""
    from rlhf_lib.progress import Progress

    r, main = run.cfg.rest, contract.is_main_process()
    schedule = improve_schedule(r.grow_steps, len(r.thresholds))
    progress = Progress("rest", len(schedule), unit="improve", start=state["improves_done"], out=run.out,
                        main=main)
    for index, (g, j) in enumerate(schedule[state["improves_done"]:], start=state["improves_done"]):
        rows = grown_rows(run, policy, tokenizer, reward, prompts, state, g, j)
        progress.note(samples=[{"prompt": x["prompt"], "response": x["response"],
                                "score": round(float(x["reward"]), 3)} for x in rows[:2]])
        record = improve_step(run, policy, tokenizer, rows, state, g, j)
        state["iterations"].append(record)
        state["improves_done"] = index + 1
        progress.update(index + 1, **{k: v for k, v in record.items() if isinstance(v, (int, float))})
        if wandb_run is not None:
            wandb_run.log({f"rest/{k}": v for k, v in record.items() if isinstance(v, (int, float))},
                          step=index + 1)
        if contract.is_main_process():
            checkpoints.snapshot_then_checkpoint(
                policy, run.out, index + 1, run.args.checkpoint_uri,
                lambda: _save(run.out / "checkpoints", index + 1, policy, state,
                              mirror=storage.mirror_of(run.args.checkpoint_uri)))
    uploads.UPLOADS.wait()


def main(argv: list[str] | None = None) -> Path:
    from rlhf_lib import tracking

    run = contract.start("rest", argv, "sft_model", "prompts")
    policy, tokenizer, reward, prompts = setup(run)
    state = resume(run, policy)
    resumed_from = state["improves_done"]
    with tracking.wandb_run(run.cfg, "rest") as wandb_run:
        train(run, policy, tokenizer, reward, prompts, state, wandb_run)
    if not contract.is_main_process():
        return run.out
    adapter_dir = run.out / "adapter"
    policy.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    iterations = state["iterations"]
    contract.finish_policy(
        run, adapter_dir, run.paths[0], snapshots=True, reward=reward.describe(), grown_sets=state["grown"],
        iterations=iterations, stats=[{"step": i + 1, **it} for i, it in enumerate(iterations)],
        resumed_from_step=resumed_from, summary=f"grown sets: {list(state['grown'].values())}",
        metrics={"thresholds": state["thresholds"], "improves": len(iterations),
                 "mean_reward_first_grow": iterations[0]["mean_reward_all"],
                 "mean_reward_last_grow": iterations[-1]["mean_reward_all"], "precision": precision.record(policy)})
    return run.out


if __name__ == "__main__":
    main()
