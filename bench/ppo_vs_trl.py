"""Our PPO against the last TRL PPO (trl 1.12.0, `trl.experimental.ppo`) on identical inputs, side by side.

    python bench/ppo_vs_trl.py                         # tiny OPT and an OPT of hidden 1024 x 12 layers
    python bench/ppo_vs_trl.py --sizes tiny --repeats 3 --steps 4

Both get the same policy (a causal LM), the same reward model (sharing the policy's tokenizer: TRL's PPO only
takes that), the same prompts, batch 32, mini-batch 8, 4 PPO epochs, exactly 40 response tokens, LoRA r=16 on
the same modules, a fixed KL coefficient of 0.2, fp32, one CPU thread each. trl 1.12.0 goes into its own
virtual environment (bench/.venv-trl112, made on first use). Runs alternate ours/TRL/ours/TRL/…, each in a fresh
process; the first PPO step of each run is a warm-up and is not timed. Prints samples/s (median, min, max),
the time per step spent generating vs the rest (scoring, log-probs, PPO updates), and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = ROOT / "bench" / ".venv-trl112"
TRL_PACKAGES = ["torch==2.13.0", "trl==1.12.0", "peft==0.21.2", "accelerate==1.15.0"]
BATCH, MINI_BATCH, EPOCHS, RESPONSE_LENGTH, KL_COEF, LR = 32, 8, 4, 40, 0.2, 1e-5
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none")
SIZES = {"tiny": None, "large": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, ffn_dim=4096)}


# ------------------------------------------------------------------ inputs (project environment)


def prepare_inputs(size: str, out: Path) -> dict:
    """Policy, reward model (same tokenizer), prompts: written once under `out`, read by both workers."""
    sys.path.insert(0, str(ROOT))
    from rlhf_lib import env

    env.configure()
    import torch
    from transformers import OPTConfig, OPTForCausalLM, OPTForSequenceClassification

    from rlhf_lib import config, models
    from rlhf_lib.data import formatting, sample

    out.mkdir(parents=True, exist_ok=True)
    cfg = config.load(ROOT / "configs" / "tiny.toml")
    tiny = models.prepare("tiny", cfg.policy.tiny, "policy", out, cfg.run.seed)  # the default profile's policy
    policy_dir, reward_dir = out / f"policy-{size}", out / f"reward-{size}"
    if not (policy_dir / "config.json").exists():
        tokenizer = models.load_tokenizer(tiny)
        if SIZES[size] is None:
            model = OPTForCausalLM.from_pretrained(tiny)
        else:  # where weights dominate: random init, the tiny tokenizer
            base = OPTConfig.from_pretrained(tiny)
            shape = {**SIZES[size], "word_embed_proj_dim": SIZES[size]["hidden_size"]}
            torch.manual_seed(0)
            model = OPTForCausalLM(OPTConfig(**{**base.to_dict(), **shape}))
        model.save_pretrained(policy_dir, safe_serialization=True)
        tokenizer.save_pretrained(policy_dir)
    if not (reward_dir / "config.json").exists():
        torch.manual_seed(1)
        rm = OPTForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
        rm.config.pad_token_id = models.load_tokenizer(policy_dir).pad_token_id
        rm.save_pretrained(reward_dir, safe_serialization=True)
        models.load_tokenizer(policy_dir).save_pretrained(reward_dir)
    prompts = [formatting.rl_prompt(r) for r in sample.alpaca_orca_rows(512, "train", 0)]
    (out / "prompts.json").write_text(json.dumps(prompts))
    return {"policy": str(policy_dir), "reward": str(reward_dir), "prompts": str(out / "prompts.json")}


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        print(f"[bench] creating {TRL_VENV} with {' '.join(TRL_PACKAGES)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    return python


# ------------------------------------------------------------------ workers (one process per run)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_ours(inputs: dict, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from rlhf_lib import env

    env.configure()
    import torch

    from rlhf_lib import config, scoring
    from rlhf_lib import sampling
    from rlhf_lib.stages.ppo import losses, trainer
    from rlhf_lib.stages.ppo import policy as policy_module

    torch.set_num_threads(1)
    raw = config.load(ROOT / "configs" / "tiny.toml").model_dump()
    raw["ppo"].update(batch_size=BATCH, mini_batch_size=MINI_BATCH, ppo_epochs=EPOCHS, adaptive_kl=False,
                      init_kl_coef=KL_COEF, learning_rate=LR, min_response_length=RESPONSE_LENGTH,
                      max_response_length=RESPONSE_LENGTH, stop_at_eos=False,
                      lora={"r": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": 0.0,
                            "target_modules": LORA["target_modules"]})
    cfg = config.validate(raw)
    p = cfg.ppo
    device = torch.device("cpu")
    policy, tokenizer = policy_module.setup_policy(cfg, inputs["policy"], device)
    reward = scoring.ModelReward(inputs["reward"], 512, device=device)
    optimizer = torch.optim.Adam(policy_module.trainable_parameters(policy), lr=p.learning_rate)
    shared = reward.shares_tokenizer(tokenizer)
    assert shared, "the bench's reward model shares the policy's tokenizer"
    kl_ctl = losses.FixedKLController(p.init_kl_coef)
    prompts = json.loads(Path(inputs["prompts"]).read_text())
    timings = []
    for step in range(steps):
        batch_prompts = prompts[step * BATCH:(step + 1) * BATCH]
        t0 = time.perf_counter()
        batch = sampling.TransformersSampler(policy, tokenizer).sample(
            batch_prompts, [RESPONSE_LENGTH] * BATCH, stop_at_eos=False, max_prompt_length=64)
        t1 = time.perf_counter()
        batch.scores = trainer.score_rollout(reward, tokenizer, batch_prompts, batch, shared)
        trainer.ppo_step(policy, optimizer, batch, kl_ctl, p, shuffle_seed=step)
        t2 = time.perf_counter()
        timings.append({"generate": t1 - t0, "rest": t2 - t1})
    return {"timings": timings, "peak_rss_mib": _peak_rss_mib()}


def worker_trl(inputs: dict, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    tokenizer = AutoTokenizer.from_pretrained(inputs["policy"], padding_side="left")
    prompts = json.loads(Path(inputs["prompts"]).read_text())[: steps * BATCH]
    train = datasets.Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    # TRL's rollout batch is per_device_train_batch_size x gradient_accumulation_steps, split into num_mini_batches;
    # accumulation would also delay optimizer steps, so: 32 per device, 4 mini-batches of 8, one step each.
    args = PPOConfig(output_dir=str(Path(inputs["prompts"]).parent / "trl-out"), per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=1, num_mini_batches=BATCH // MINI_BATCH, num_ppo_epochs=EPOCHS,
                     response_length=RESPONSE_LENGTH, stop_token=None, temperature=1.0, kl_coef=KL_COEF,
                     learning_rate=LR, total_episodes=steps * BATCH, local_rollout_forward_batch_size=BATCH,
                     num_sample_generations=0, report_to=[], use_cpu=True, bf16=False, fp16=False,
                     save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0)
    policy = AutoModelForCausalLM.from_pretrained(inputs["policy"])
    reward = AutoModelForSequenceClassification.from_pretrained(inputs["reward"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(inputs["reward"], num_labels=1)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=train, peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"))
    assert (args.local_batch_size, args.local_mini_batch_size) == (BATCH, MINI_BATCH), "TRL batch sizes differ"
    # Step boundaries and generation time, measured around TRL's own functions (nothing else changed).
    marks, generate_seconds = [], []
    original_generation = trl_ppo.batch_generation

    def timed_generation(*a, **k):
        marks.append(time.perf_counter())
        out = original_generation(*a, **k)
        generate_seconds.append(time.perf_counter() - marks[-1])
        return out

    trl_ppo.batch_generation = timed_generation
    trainer.train()
    end = time.perf_counter()
    bounds = marks + [end]
    timings = [{"generate": g, "rest": (bounds[i + 1] - bounds[i]) - g} for i, g in enumerate(generate_seconds)]
    return {"timings": timings, "peak_rss_mib": _peak_rss_mib()}


# ------------------------------------------------------------------ driver


def run_worker(kind: str, inputs: dict, steps: int, trl_python: Path) -> dict:
    python = str(trl_python) if kind == "trl" else sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, __file__, "--worker", kind, "--inputs", json.dumps(inputs), "--steps", str(steps)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    rates, generate, rest = [], [], []
    for run in runs:
        timed = run["timings"][1:]  # the first step warms up
        seconds = sum(t["generate"] + t["rest"] for t in timed)
        rates.append(BATCH * len(timed) / seconds)
        generate += [t["generate"] for t in timed]
        rest += [t["rest"] for t in timed]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "generate_s": statistics.mean(generate), "rest_s": statistics.mean(rest),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,large")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="PPO steps per run (the first is a warm-up)")
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "bench-ppo-vs-trl"))
    parser.add_argument("--without-trl", action="store_true",
                        help="time ours only (no trl 1.12 environment to build): the script's own test")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_trl
        print(json.dumps(fn(json.loads(args.inputs), args.steps)))
        return
    kinds = ("ours",) if args.without_trl else ("ours", "trl")
    trl_python = None if args.without_trl else ensure_trl_venv()
    print(f"| size | PPO | samples/s median (min–max) | generate s/step | rest s/step | peak RSS MiB |\n"
          f"|---|---|---|---|---|---|")
    ratios = [compare(size, args, kinds, trl_python) for size in args.sizes.split(",")]
    print()
    for size, speed, memory in ratios:
        print(f"{size}: ours / TRL = {speed:.2f}x samples/s, {memory:.2f}x peak RSS" if speed else
              f"{size}: ours only (--without-trl)")


def compare(size: str, args, kinds: tuple[str, ...], trl_python) -> tuple[str, float | None, float | None]:
    """Our PPO and TRL 1.12's on one size, alternating runs; prints their rows, returns the ratios."""
    inputs = prepare_inputs(size, Path(args.out))
    results = {kind: [] for kind in kinds}
    for i in range(args.repeats):
        for kind in kinds:
            results[kind].append(run_worker(kind, inputs, args.steps, trl_python))
            print(f"[bench] {size} run {i + 1}/{args.repeats} {kind}: "
                  f"{summarise(results[kind][-1:])['median']:.2f} samples/s", file=sys.stderr, flush=True)
    s = {k: summarise(v) for k, v in results.items()}
    for kind in kinds:
        r = s[kind]
        print(f"| {size} | {'ours' if kind == 'ours' else 'TRL 1.12'} | {r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f}) "
              f"| {r['generate_s']:.2f} | {r['rest_s']:.2f} | {r['peak_rss_mib']:.0f} |", flush=True)
    if "trl" not in s:
        return size, None, None
    return size, s["ours"]["median"] / s["trl"]["median"], s["ours"]["peak_rss_mib"] / s["trl"]["peak_rss_mib"]


if __name__ == "__main__":
    main()
