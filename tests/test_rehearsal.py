"""The CPU rehearsal of the seed's recipe (configs/opt-1.3b-rehearsal.toml, bench/recipe_rehearsal.py) is the recipe
at its real size: it differs from configs/opt-1.3b.toml only in step counts, batch sizes, sequence lengths, row
counts, run.gpus and the data sources — and, so that every stage runs, in run.methods, the preference source (AI
feedback) and its judge model. The stand-in models (bench/standins.py) have the published architectures."""

import sys

import pytest

from conftest import ROOT
from rlhf_lib import config

STEP_COUNTS = {"max_steps", "steps", "save_steps", "save_freq", "eval_steps", "logging_steps", "warmup_steps",
               "grow_steps"}
BATCH_SIZES = {"batch_size", "mini_batch_size", "gradient_accumulation_steps", "stream_batch_size"}
LENGTHS = {"max_length", "max_response_length", "min_response_length", "max_prompt_length", "reward_max_length",
           "max_new_tokens", "max_completion_length"}
ROW_COUNTS = {"max_rows", "eval_rows", "sample_rows", "num_prompts", "curve_prompts", "prompts_per_grow",
              "samples_per_prompt", "num_generations"}
SOURCES = {"data.sft.source", "data.sft.eval_source", "data.preference.source", "data.preference.eval_source",
           "data.prompts.source", "data.prompts.eval_source"}
EVERY_STAGE = {"run.methods", "rlaif.judge_model"}  # with data.preference.source = ai_feedback (a source)


def _leaves(value, prefix=""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, value


def test_the_rehearsal_differs_from_the_recipe_only_where_it_may():
    recipe = dict(_leaves(config.load(ROOT / "configs" / "opt-1.3b.toml").model_dump()))
    rehearsal = dict(_leaves(config.load(ROOT / "configs" / "opt-1.3b-rehearsal.toml").model_dump()))
    assert set(recipe) == set(rehearsal)
    changed = {key for key in recipe if recipe[key] != rehearsal[key]}
    allowed = {key for key in changed if key.rsplit(".", 1)[-1] in STEP_COUNTS | BATCH_SIZES | LENGTHS | ROW_COUNTS}
    allowed |= changed & (SOURCES | EVERY_STAGE | {"run.gpus"})
    assert changed - allowed == set()
    assert rehearsal["run.gpus"] == 0 and rehearsal["policy.model"] == "facebook/opt-1.3b"
    assert rehearsal["reward_model.model"] == "microsoft/deberta-v3-base" and rehearsal["sft.quantize_4bit"]
    assert {"sft.max_steps", "ppo.steps", "data.sft.source"} <= changed  # the comparison really sees differences


def test_the_stand_ins_have_the_published_architectures():
    sys.path.insert(0, str(ROOT / "bench"))
    import standins

    opt, deberta = standins.OPT_1_3B, standins.DEBERTA_V3_BASE
    assert (opt["hidden_size"], opt["num_hidden_layers"], opt["num_attention_heads"], opt["ffn_dim"],
            opt["vocab_size"], opt["max_position_embeddings"]) == (2048, 24, 32, 8192, 50272, 2048)
    assert (deberta["hidden_size"], deberta["num_hidden_layers"], deberta["num_attention_heads"],
            deberta["intermediate_size"], deberta["vocab_size"], deberta["position_buckets"],
            deberta["relative_attention"], deberta["position_biased_input"]) == (768, 12, 12, 3072, 128100, 256,
                                                                                  True, False)
    assert standins.OPT_VOCAB == 50265 and standins.SPM_PIECES == 128000
    assert len(standins.commit_of("facebook/opt-1.3b")) == 40


def _resources_of(cfg) -> dict:
    return {kind: {key: getattr(getattr(cfg.resources, kind), key)
                   for key in ("cpu", "memory_mb", "shared_memory_mb", "disk_mb")} for kind in ("train", "infer", "light")}


def test_the_recipes_resources_are_what_the_memory_model_computes():
    """`[resources]` in configs/opt-1.3b.toml is the block `python bench/memory_model.py --resources` prints, key by
    key in MiB — a value typed above or below it fails — and the start step's disk check asks for at least the
    largest stage's disk."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_model

    cfg = config.load(ROOT / "configs" / "opt-1.3b.toml")
    counts = memory_model.parameter_counts()
    assert _resources_of(cfg) == memory_model.resources(cfg, counts)
    needs = memory_model.node_needs(cfg, counts, memory_model.gpu_needs(cfg, counts))
    assert cfg.run.min_free_disk_gb >= max(needs[kind]["disk"] for kind in ("train", "infer"))
    assert needs["train"]["processes"] == cfg.run.gpus == 8


@pytest.mark.parametrize("factor", [2, 0.5])
def test_a_resources_value_off_by_a_factor_either_way_is_caught(tmp_path, factor):
    """configs/opt-1.3b.toml with train.memory_mb doubled, and halved: the comparison above fails on each."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_model

    text = (ROOT / "configs" / "opt-1.3b.toml").read_text()
    cfg = config.load(ROOT / "configs" / "opt-1.3b.toml")
    typed = f"memory_mb = {cfg.resources.train.memory_mb},"
    assert text.count(typed) == 1
    (tmp_path / "changed.toml").write_text(text.replace(typed, f"memory_mb = {int(cfg.resources.train.memory_mb * factor)},"))
    changed = config.load(tmp_path / "changed.toml")
    assert _resources_of(changed) != memory_model.resources(changed, memory_model.parameter_counts())


def test_the_resources_command_prints_the_block_and_labels_what_it_assumes():
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_model.py"), "--resources"], capture_output=True,
                         text=True, check=True).stdout
    cfg = config.load(ROOT / "configs" / "opt-1.3b.toml")
    assert f"train = {{ cpu = {cfg.resources.train.cpu}, memory_mb = {cfg.resources.train.memory_mb}," in out
    assert "Assumed, not measured: CUDA runtime per GPU process" in out and "sizes in MiB" in out


def _rehearsal():
    sys.path.insert(0, str(ROOT / "bench"))
    import recipe_rehearsal

    return recipe_rehearsal


@pytest.mark.slow
def test_the_rehearsal_runs_kills_resumes_and_checks_itself_at_tiny_size(tmp_path):
    """bench/recipe_rehearsal.py itself, end to end, with tiny stand-ins (the same ids, files and key layouts): the
    run with PPO killed after a checkpoint, the resume, the checks, and the results it writes and names."""
    import json
    import os
    import subprocess

    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "recipe_rehearsal.py"), "--tiny", "--work",
                           str(tmp_path / "work"), "--results", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert str(tmp_path / "results" / "rehearsal.md") in last and "checks passed" in last
    summary = json.loads((tmp_path / "results" / "rehearsal.json").read_text())
    assert summary["problems"] == []
    assert summary["killed_after_step"] == summary["resumed_from_step"] >= 1
    assert "rlhf_lib.stages.ppo" in summary["kill"]["cmdline"]
    rows = {(r["step"], r["run"]): r for r in summary["stages"]}
    assert ("ppo_train", "origin") in rows and rows[("ppo_train", "resumed")]["peak_rss_gb"]
    for stage in ("sft", "merge", "rlaif", "reward"):  # the tiny rehearsal runs PPO alone of the methods
        assert rows[(stage, "origin")]["peak_rss_gb"] and rows[(stage, "origin")]["predicted_gb"], stage
    assert all(str(summary["runs"]["resumed"]) in path for path in summary["ppo_artifacts"].values())
    assert "| ppo_train | resumed |" in (tmp_path / "results" / "rehearsal.md").read_text()


def test_a_kill_that_missed_fails_the_rehearsal():
    """What the checks say when the kill did not land where it must (each fails the command: exit 1)."""
    check_kill = _rehearsal().check_kill
    ppo = {"pid": 1, "cmdline": "python -m rlhf_lib.stages.ppo --config x", "attempt_dir": "/nonexistent", "step": 1}
    assert check_kill({"kill": ppo, "rc": 1, "run_id": "1"}, steps=2) == []
    assert "the kill did not land" in check_kill({"kill": None, "rc": 0, "run_id": "1"}, steps=2)[0]
    assert "after PPO's last checkpoint" in check_kill({"kill": {**ppo, "step": 2}, "rc": 1, "run_id": "1"}, 2)[0]
    assert "was not PPO's stage" in check_kill({"kill": {**ppo, "cmdline": "python -m rlhf_lib.stages.dpo"},
                                                "rc": 1, "run_id": "1"}, 2)[0]
    assert "succeeded although" in check_kill({"kill": ppo, "rc": 0, "run_id": "1"}, 2)[0]


def test_a_run_that_failed_before_the_kill_says_why(tmp_path):
    """A run that died before PPO (e.g. refused in start) is reported with its own last words, not just an exit code."""
    log = tmp_path / "run.log"
    log.write_text("Workflow starting\n\n[start] run.storage_root: only 3.0 GB free under /tmp, run.min_free_disk_gb "
                   "is 20.0\nStep failure\n")
    problem = _rehearsal().check_kill({"kill": None, "rc": 1, "run_id": "7", "log": str(log)}, steps=2)[0]
    assert "the kill did not land" in problem and "only 3.0 GB free" in problem and str(log) in problem


def test_the_tiny_rehearsal_asks_for_the_disk_tiny_stand_ins_need(tmp_path):
    """CI's failure: the tiny rehearsal kept the full-size recipe's 20 GB floor and its run was refused in `start`
    on a machine with less room. The tiny rehearsal asks for the default; the full-size one keeps the recipe's."""
    import argparse

    from rlhf_lib import config

    args = argparse.Namespace(size="tiny", work=str(tmp_path), config=str(ROOT / "configs" / "opt-1.3b-rehearsal.toml"),
                              gpus=0)
    _, cfg = _rehearsal().prepare(args)
    assert cfg.run.min_free_disk_gb == config.RunSection.model_fields["min_free_disk_gb"].default <= 1
    assert config.load(args.config).run.min_free_disk_gb == 20


def test_a_peak_above_the_memory_model_by_more_than_a_quarter_fails_the_rehearsal():
    check_peaks = _rehearsal().check_peaks
    row = {"step": "ppo_train", "run": "resumed", "predicted_gb": 10.0}
    assert check_peaks([{**row, "peak_rss_gb": [12.4]}]) == []
    assert "exceeds the memory model's 10.00 GB" in check_peaks([{**row, "peak_rss_gb": [12.6]}])[0]


def test_the_rehearsal_table_in_benchmarks_is_the_generated_one():
    """BENCHMARKS.md includes bench/results/rehearsal.md, the file the full-size rehearsal wrote, as it is."""
    generated = (ROOT / "bench" / "results" / "rehearsal.md").read_text()
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    begin, end = "<!-- bench/results/rehearsal.md -->\n", "<!-- end of bench/results/rehearsal.md -->"
    assert benchmarks[benchmarks.index(begin) + len(begin):benchmarks.index(end)] == generated
