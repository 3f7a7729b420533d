"""bench/gpu_smoke.sh runs the seed recipe's path (NF4 SFT, merge, reward, PPO with 400-token responses, every
other method, evaluate) on models built from configurations; here at tiny sizes on the CPU with PPO only and
96-token responses (the CI budget: every method runs in the flow tests, and the length is a flag), as the GPU run
does at full size with all of them."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# A whole flow run of a bench script, on the CPU; the GPU run is the real check (BENCHMARKS "GPU"). Not in the
# default run (CI's 30 minutes): the flow tests cover this path; `python -m pytest -q -m bench` runs it.
pytestmark = [pytest.mark.slow, pytest.mark.bench]
LENGTH = 96


def test_gpu_smoke_runs_at_tiny_sizes(tmp_path):
    out = tmp_path / "smoke"
    # the script runs `python`: this interpreter's, as in the activated environment a user runs it from
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--tiny", "--methods", "ppo", "--response-length",
                           str(LENGTH), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("## GPU smoke", 1)[1]
    for step in ("sft", "merge", "reward", "ppo_train", "evaluate"):
        assert f"| {step} | " in table, step
    assert "| **flow (wall)** |" in table
    (run_dir,) = (out / "RLHFFlow").iterdir()
    ppo = json.loads((run_dir / "ppo" / "attempt-0" / "result.json").read_text())
    assert len(ppo["stats"]) == 2
    assert all(s["response_length_mean"] == LENGTH for s in ppo["stats"])  # generated to length, EOS not banned
    sft = json.loads((run_dir / "sft" / "attempt-0" / "result.json").read_text())
    assert sft["peak_memory"]["cpu_rss_gb"] > 0
    config = json.loads((out / "gpu-smoke.json").read_text())
    assert config["sft"]["quantize_4bit"] is True and config["ppo"]["stop_at_eos"] is False
