"""Every bench/ script BENCHMARKS.md quotes runs here, as its command, on its own smallest inputs, so a change that
breaks one fails the suite instead of the next measurement (two did: bench/ppo_vs_trl.py's Path into hub.is_local,
bench/recipe_rehearsal.py's report). The figures are not checked here (BENCHMARKS.md holds them); that each script
runs to its table is. Elsewhere: bench/recipe_rehearsal.py and bench/memory_model.py --resources
(tests/test_rehearsal.py), bench/ppo_golden_trace.py's fixture (tests/test_ppo_golden.py). The scripts that start
whole flows (flow_timing, gpu_smoke, storage_overhead) run here on a finished run (the flow fixture's) in seconds;
their whole runs are under `-m bench` (`python -m pytest -m bench`: storage_overhead's two flows here, gpu_smoke's
in tests/test_gpu_smoke.py), for which CI's 30 minutes have no room."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, write_config

BENCH = ROOT / "bench"
SHARED = ROOT.parent / "shared"


def _run(args: list[str], timeout: int = 600) -> str:
    # the scripts run `python` and the flow as a user does: this interpreter's, first on PATH
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _smallest_config(path) -> str:
    """The test profile cut to the fewest steps that still run every stage of the default chain (PPO only)."""
    return str(write_config(path, {
        "run": {"methods": ["ppo"], "wandb_mode": "disabled"},
        "sft": {"max_steps": 2, "save_steps": 2, "eval_steps": 2, "logging_steps": 1},
        "reward": {"max_steps": 2, "save_steps": 2, "eval_steps": 2, "logging_steps": 1},
        "ppo": {"steps": 2, "save_freq": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1,
                "min_response_length": 4, "max_response_length": 8},
        "eval": {"num_prompts": 4, "curve_prompts": 2, "max_new_tokens": 8}}))


def test_memory_model_prints_its_stages_and_the_rehearsals_predictions():
    out = _run([sys.executable, str(BENCH / "memory_model.py"), "--check-rehearsal"])
    assert "GPU memory per process" in out and "CPU rehearsal, predicted host peak per stage" in out
    assert "Assumed, not measured" in out


def test_ppo_vs_trl_times_ours_on_the_tiny_size(tmp_path):
    """Ours only (`--without-trl`): the trl 1.12 environment it builds for the comparison is a download."""
    out = _run([sys.executable, str(BENCH / "ppo_vs_trl.py"), "--sizes", "tiny", "--repeats", "1", "--steps", "2",
                "--without-trl", "--out", str(tmp_path)])
    assert "| tiny | ours |" in out and "tiny: ours only" in out


@pytest.mark.skipif(not (SHARED / "data" / "hh_rlhf_pairs_2666.jsonl.gz").exists(), reason="needs ../shared")
def test_reward_learning_curve_and_reward_real_data_train_on_the_real_pairs(tmp_path):
    out = _run([sys.executable, str(BENCH / "reward_learning_curve.py"), "--lrs", "1e-4", "--steps", "2",
                "--eval-every", "2", "--batch-size", "2", "--max-length", "64", "--out", str(tmp_path)])
    assert "| 0.0001 |" in out and (tmp_path / "reward_learning_curve.png").exists()
    out = _run([sys.executable, str(BENCH / "reward_real_data.py"), "--steps", "2", "--max-length", "64",
                "--batch-size", "2"])
    assert "| MiniLM-L6 (pretrained) |" in out


def test_gpu_smoke_builds_its_models_and_config_and_reports_a_finished_run(flow_run, tmp_path):
    """bench/gpu_smoke.sh's own code in seconds: the tiny models, the smoke config (validated against today's schema)
    and the report, of the flow fixture's run (`--from-run`). What it skips is starting the run (its `run_flow`, a
    metaflow.Runner call like flow_timing's); the whole smoke run is tests/test_gpu_smoke.py, under `-m bench`."""
    import json
    import re

    out = _run(["bash", str(BENCH / "gpu_smoke.sh"), "--tiny", "--methods", "ppo", "--response-length", "96",
                "--out", str(tmp_path), "--from-run", flow_run.id])
    table = out.split("## GPU smoke", 1)[1]
    for step in ("sft", "merge", "reward", "ppo_train", "evaluate"):
        assert re.search(rf"\| {step} \| [\d.]+ \| — \| [\d.]+ \|", table), step  # seconds, no GPU, peak RSS
    config = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert config["sft"]["quantize_4bit"] is True and config["ppo"]["max_response_length"] == 96
    assert config["run"]["methods"] == ["ppo"] and (tmp_path / "models" / "opt-policy" / "config.json").exists()


def test_storage_overhead_replays_a_finished_run_through_s3(flow_run):
    """bench/storage_overhead.py's own code in seconds: its S3 server, and a finished run's outputs (the flow
    fixture's) to S3 and back through rlhf_lib.storage (`--replay-run`); and its reading of a run's figures, from the
    fixture's real output. What it skips is starting its two flows; those run under `-m bench`."""
    sys.path.insert(0, str(BENCH))
    import storage_overhead

    from conftest import LIVE

    out = _run([sys.executable, str(BENCH / "storage_overhead.py"), "--replay-run", flow_run.id])
    for stage in ("sft", "merge", "reward", "ppo", "evaluate"):
        assert f"| {stage} | " in out, stage
    assert "a lower bound of what S3 storage adds" in out
    assert "win-rate vs SFT" in storage_overhead.figures(LIVE["output"])


def test_flow_timing_reports_a_finished_run(flow_run, tmp_path):
    """The report, from the flow fixture's run (`--from-run`); what it skips is starting the run (six lines of
    metaflow.Runner, which tests/test_data_shapes.py's runs go through too)."""
    out = _run([sys.executable, str(BENCH / "flow_timing.py"), "--from-run", flow_run.id, "--plot",
                str(tmp_path / "curve.png")])
    assert f"run {flow_run.id}" in out and "| ppo_train |" in out and (tmp_path / "curve.png").exists()


@pytest.mark.slow
def test_method_sweep_tries_a_setting_on_a_finished_run(flow_run, tmp_path):
    out = _run([sys.executable, str(BENCH / "method_sweep.py"), "--run", flow_run.id, "--method", "grpo",
                "--setting", "max_steps=2 save_steps=2", "--work", str(tmp_path)])
    assert "| max_steps=2 save_steps=2 |" in out and "SFT perplexity" in out


@pytest.mark.slow
@pytest.mark.bench  # two whole flows (~150 s): outside the default run, which CI must finish in 30 minutes
def test_storage_overhead_runs_local_and_s3_and_compares(tmp_path):
    out = _run([sys.executable, str(BENCH / "storage_overhead.py"), "--config", _smallest_config(tmp_path / "s.toml"),
                "--rounds", "1"], timeout=900)
    assert "| S3 (moto on 127.0.0.1) |" in out and "same figures: True" in out
