"""Benchmark: one method's settings tried side by side on a finished run's SFT model, reward and data.

    python bench/method_sweep.py --run RUN_ID --method grpo \\
        --setting "learning_rate=1e-4 beta=0.04" --setting "learning_rate=3e-4 beta=0.04 max_steps=60"

For each `--setting` (space-separated `key=value`s of the method's config section, the rest as the run had them)
runs the method's stage module standalone (`python -m rlhf_lib.stages.<stage>`) on the run's own inputs — the
ones its registry row names, read from the run's artifacts — then `rlhf_lib.stages.evaluate` on that model
against the run's SFT model, and prints one Markdown row per setting: win-rates over SFT by the proxy and the
gold judge, KL from SFT, perplexity and the stage's seconds. How DPO's, GRPO's and RLOO's tiny-profile settings
were chosen (`BENCHMARKS.md`). Outputs go under `--work` (default: a temporary directory, removed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_lib import env  # noqa: E402

env.configure()

import torch  # noqa: E402,F401  (before metaflow's client, see tests/conftest.py)


def parse_setting(text: str) -> dict:
    """`"lr=1e-4 beta=0.04"` -> {"lr": 1e-4, "beta": 0.04} (values read as JSON where they parse)."""
    out = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--setting takes key=value pairs, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def stage(module: str, config: dict, output: Path, inputs: dict[str, str]) -> dict:
    """Run a stage module standalone; return its result.json."""
    output.parent.mkdir(parents=True, exist_ok=True)
    config_file = output.parent / f"{output.name}.json"
    config_file.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", module, "--config", str(config_file), "--output", str(output)]
    for name, path in inputs.items():
        cmd += ["--input", f"{name}={path}"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((output / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished RLHFFlow run id (its SFT model, reward and data)")
    parser.add_argument("--method", required=True)
    parser.add_argument("--setting", action="append", required=True, metavar='"KEY=VALUE ..."')
    parser.add_argument("--work", default=None, help="keep each setting's outputs here")
    args = parser.parse_args()

    from metaflow import Run, namespace

    from rlhf_lib import methods, pipeline
    from rlhf_lib.config import validate

    namespace(None)
    data = Run(f"RLHFFlow/{args.run}").data
    method = methods.get(args.method)
    base = validate(data.run_config)
    section = method.name
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="method-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"## {method.title} settings on run {args.run} (`{section}` section; the rest as the run had it)\n")
    print("| setting | proxy win | gold win | KL/sequence | KL/token | perplexity | stage s |\n|---|---|---|---|---|---|---|")
    try:
        for i, text in enumerate(args.setting):
            raw = base.model_dump()
            raw["eval"] = {**raw["eval"], "curve": False}
            raw[section] = {**raw[section], **parse_setting(text)}
            cfg = validate(raw).model_dump()
            out = work / f"setting-{i}"
            started = time.time()
            result = stage(method.module, cfg, out / method.name, pipeline.method_inputs(data, method, base))
            seconds = time.time() - started
            eval_inputs = pipeline.evaluation_inputs(data, base, {method.name: result["model_path"]}, {})
            report = stage("rlhf_lib.stages.evaluate", cfg, out / "evaluate", eval_inputs)["eval_report"]
            row = report[method.name]
            gold = row.get("gold_win_rate")
            print(f"| {text} | {row['proxy_win_rate']:.3f} | {'—' if gold is None else f'{gold:.3f}'} | "
                  f"{row['kl_per_sequence']:.2f} | {row['kl_per_token']:.3f} | {row['perplexity']:.2f} | "
                  f"{seconds:.0f} |", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nSFT perplexity {report['sft']['perplexity']:.2f}; gold judge `{data.gold_judge}`.")


if __name__ == "__main__":
    main()
