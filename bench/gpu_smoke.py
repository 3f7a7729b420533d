"""GPU smoke test of the seed's recipe with nothing downloaded: OPT-1.3B- and DeBERTa-v3-base-shaped models
built from their configurations (random weights, tokenizers trained here), then the flow with the opt-1.3b
profile's settings at small step counts and every method of the registry — NF4 4-bit SFT, bf16 merge, reward, 2
PPO steps with responses of 400 tokens, DPO, ReST, GRPO and RLOO for a few steps each, evaluation on 16 prompts.
Prints seconds per step and the peak memory of every stage.

    bash bench/gpu_smoke.sh                 # on a GPU machine (no internet needed); target: under 10 minutes
    bash bench/gpu_smoke.sh --tiny          # the same path at tiny sizes, on a CPU
    bash bench/gpu_smoke.sh --tiny --methods ppo   # what the test runs (every method runs in the flow tests)
    bash bench/gpu_smoke.sh --tiny --from-run RUN_ID   # models and config, then the report of a finished run
    bash bench/gpu_smoke.sh --recipe        # the recipe rehearsal (bench/recipe_rehearsal.py) on this machine's
                                            # GPUs: the stand-ins as the hub ships them, bf16, one process per GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_lib import env  # noqa: E402

env.configure()

import torch  # noqa: E402  (before metaflow's client, see tests/conftest.py)

# facebook/opt-1.3b and microsoft/deberta-v3-base, from their published configurations.
OPT_1_3B = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                max_position_embeddings=2048, word_embed_proj_dim=2048, vocab_size=50272)
DEBERTA_V3_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       max_position_embeddings=512, vocab_size=128100, position_buckets=256)
TINY_OPT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                max_position_embeddings=512, word_embed_proj_dim=64, vocab_size=1024)
TINY_DEBERTA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                    max_position_embeddings=512, vocab_size=1024, position_buckets=64)


def build_models(out: Path, tiny: bool) -> tuple[str, str]:
    """Random-weight models of the recipe's shapes, saved as safetensors with tokenizers trained on sample text."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, OPTConfig, OPTForCausalLM

    from rlhf_lib import models
    from rlhf_lib.data import sample

    text = list(sample.pretraining_text(2000, 0))
    policy_dir, reward_dir = out / "models" / "opt-policy", out / "models" / "deberta-reward"
    if not (policy_dir / "config.json").exists():
        tok = models._train_bpe_tokenizer(text, 1024 if tiny else 8000)
        shape = TINY_OPT if tiny else OPT_1_3B
        config = OPTConfig(**shape, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, dropout=0.0)
        torch.manual_seed(0)
        OPTForCausalLM(config).save_pretrained(policy_dir, safe_serialization=True)
        tok.save_pretrained(policy_dir)
    if not (reward_dir / "config.json").exists():
        tok = models._train_wordpiece_tokenizer(text, 1024 if tiny else 8000)
        shape = TINY_DEBERTA if tiny else DEBERTA_V3_BASE
        config = DebertaV2Config(**shape, type_vocab_size=0, pad_token_id=tok.pad_token_id, relative_attention=True,
                                 position_biased_input=False, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                                 share_att_key=True, num_labels=1)
        torch.manual_seed(0)
        DebertaV2ForSequenceClassification(config).save_pretrained(reward_dir, safe_serialization=True)
        tok.save_pretrained(reward_dir)
    return str(policy_dir), str(reward_dir)


def smoke_config(out: Path, policy: str, reward: str, tiny: bool, response_length: int,
                 methods_to_run: list[str]) -> Path:
    """configs/opt-1.3b.toml at small step counts, on sample data, with the built models."""
    import copy

    from rlhf_lib.config import validate

    raw = copy.deepcopy(tomllib.loads((ROOT / "configs" / "opt-1.3b.toml").read_text()))
    raw["run"].update(name="gpu-smoke", storage_root=str(out), gpus=torch.cuda.device_count(), min_free_disk_gb=1.0,
                      methods=methods_to_run)
    raw["data"] = {"sample_rows": 256, "stream_batch_size": 256,
                   **{k: {"source": "sample", "eval_rows": 16} for k in ("sft", "preference", "prompts")}}
    raw["policy"] = {"model": policy}
    raw["reward_model"] = {"model": reward}
    raw["sft"].update(max_steps=4, warmup_steps=0, save_steps=2, eval_steps=4, logging_steps=1,
                      max_length=256 if tiny else 1024)
    raw["reward"].update(max_steps=4, save_steps=2, eval_steps=4, logging_steps=1)
    raw["ppo"].update(steps=2, min_response_length=response_length, max_response_length=response_length,
                      save_freq=1)
    small = dict(max_steps=2, save_steps=1, logging_steps=1)
    raw["dpo"] = {**raw.get("dpo", {}), **small, "eval_steps": 2, "batch_size": 4, "max_length": 256}
    raw["rest"] = {**raw.get("rest", {}), **small, "grow_steps": 1, "prompts_per_grow": 8, "samples_per_prompt": 2,
                   "max_new_tokens": 64, "thresholds": [0.5], "batch_size": 4, "max_length": 256}
    for name in ("grpo", "rloo"):
        raw[name] = {**raw.get(name, {}), **small, "batch_size": 8, "num_generations": 4,
                     "max_completion_length": min(response_length, 128)}
    raw["eval"] = {"num_prompts": 16, "max_new_tokens": 128, "reward_max_length": 512}
    validate(raw)
    path = out / "gpu-smoke.json"
    path.write_text(json.dumps(raw))
    return path


def report(run, wall: float | None, tiny: bool) -> None:
    """Seconds per step and each stage's peak memory (from its result.json under the run's storage root)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"\n## GPU smoke ({'tiny' if tiny else 'OPT-1.3B / DeBERTa-v3-base shapes'}) on {device}, run {run.id}\n")
    print("| step | seconds | peak GPU memory (GB) | peak RSS (GB) |\n|---|---|---|---|")
    outputs = Path(run.data.storage_root) / "RLHFFlow" / run.id
    for step in reversed(list(run)):
        task = step.task
        attempts = sorted((outputs / {"ppo_train": "ppo"}.get(step.id, step.id)).glob("attempt-*/result.json"))
        peak = json.loads(attempts[-1].read_text()).get("peak_memory", {}) if attempts else {}
        gpu, rss = peak.get("gpu_gb"), peak.get("cpu_rss_gb")
        print(f"| {step.id} | {(task.finished_at - task.created_at).total_seconds():.1f} | "
              f"{'—' if gpu is None else f'{gpu:.2f}'} | {'—' if rss is None else f'{rss:.2f}'} |")
    if wall is not None:
        print(f"| **flow (wall)** | **{wall:.1f}** | | |")


def run_flow(config_path: Path):
    """The flow on the smoke config, its output shown; (the run, its wall seconds)."""
    from metaflow import Runner

    started = time.time()
    with Runner(str(ROOT / "flows" / "rlhf_flow.py"), show_output=True, config=[("config", str(config_path))]) as runner:
        result = runner.run()
    if result.status != "successful":
        sys.exit(f"[gpu-smoke] run {result.run.id} failed")
    return result.run, time.time() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU test of the same path)")
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "gpu-smoke"))
    parser.add_argument("--response-length", type=int, default=400)
    parser.add_argument("--methods", default=None, help="comma-separated methods to run (default: every one)")
    parser.add_argument("--recipe", action="store_true",
                        help="run the recipe rehearsal (configs/opt-1.3b-rehearsal.toml) on every GPU here instead")
    parser.add_argument("--from-run", default=None, metavar="RUN_ID",
                        help="build the models and the config, then report on this finished run instead of starting one")
    args = parser.parse_args(argv)
    if args.recipe:
        import subprocess

        sys.exit(subprocess.call([sys.executable, str(ROOT / "bench" / "recipe_rehearsal.py"), "--gpus",
                                  str(torch.cuda.device_count())]))
    from rlhf_lib import methods
    from rlhf_lib.config import dump_toml

    out = Path(args.out).resolve()
    started = time.time()
    policy, reward = build_models(out, args.tiny)
    print(f"[gpu-smoke] models built in {time.time() - started:.1f} s: {policy}, {reward}", flush=True)
    chosen = args.methods.split(",") if args.methods else methods.names()
    raw = json.loads(smoke_config(out, policy, reward, args.tiny, args.response_length, chosen).read_text())
    toml_path = out / "gpu-smoke.toml"
    toml_path.write_text(dump_toml(raw))
    print(f"[gpu-smoke] config: {toml_path}", flush=True)
    if args.from_run:
        from metaflow import Run, namespace

        namespace(None)
        run, wall = Run(f"RLHFFlow/{args.from_run}"), None
    else:
        run, wall = run_flow(toml_path)
    report(run, wall, args.tiny)
    print(f"\n[gpu-smoke] whole smoke test {time.time() - started:.1f} s; outputs under {run.data.storage_root}")


if __name__ == "__main__":
    main()
