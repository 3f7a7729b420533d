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


def test_the_rehearsal_report_prints_its_tables(tmp_path, monkeypatch, capsys):
    """report() of two finished runs (the origin and its resume), with a stage's result and the machine's peak:
    its per-stage rows and the wall-time rows (the loop once rebound the `peaks` argument: TypeError there)."""
    import datetime
    import json
    from types import SimpleNamespace

    import metaflow

    sys.path.insert(0, str(ROOT / "bench"))
    import recipe_rehearsal

    start = datetime.datetime(2026, 12, 7, 6, 0, 0)
    task = SimpleNamespace(created_at=start, finished_at=start + datetime.timedelta(seconds=12.5))
    runs = {"1": [SimpleNamespace(id="sft", task=task)], "2": [SimpleNamespace(id="ppo_train", task=task)]}
    monkeypatch.setattr(metaflow, "Run", lambda pathspec: runs[pathspec.split("/")[1]])
    monkeypatch.setattr(metaflow, "namespace", lambda _: None)
    monkeypatch.setattr(recipe_rehearsal, "ROOT", tmp_path)
    result = tmp_path / "artifacts" / "RLHFFlow" / "2" / "ppo" / "attempt-1" / "result.json"
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps({"peak_memory": {"cpu_rss_gb": 3.25}}))
    recipe_rehearsal.report("1", "2", {"first run": 100.0}, {"first run": 2 * 2**30})
    out = capsys.readouterr().out
    assert "| sft | origin | 12.5 | — |" in out and "| ppo_train | resumed | 12.5 | 3.25 |" in out
    assert "| **first run (wall)** | | **100.0** | machine peak RSS 2.00 GiB |" in out
