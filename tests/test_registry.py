"""The method axis is one registry: a method added there alone (a stage module, a registry row — and, in the flow,
a step) is run, evaluated, reported, drawn and summarised with no edit to evaluate, report, the card or the
notebook; and every method of the registry appears in every report."""

import json
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT, TEST_CONFIG
from rlhf_lib import config, methods, pipeline, report


@pytest.fixture
def toy_method():
    sys.path.insert(0, str(ROOT / "tests"))
    import toy_methods

    methods.register(toy_methods.TOY)
    yield toy_methods.TOY
    methods.REGISTRY.pop("toy")


class FakeCard(list):
    def append(self, component):
        super().append(component)


def _run_data(cfg, done: dict[str, dict], eval_report: dict, **extra):
    """What a finished run's `run.data` holds, for the methods in `done` (outcomes) and skipped for the rest."""
    data = SimpleNamespace(sft_adapter_path="/x/sft/adapter", sft_merged_path="/x/merge/merged",
                           sft_checkpoint_dir="/x/sft/checkpoints", sft_metrics={"eval_loss": 1.0, "curves": {}},
                           reward_model_path="/x/reward/model", reward_checkpoint_dir="/x/reward/checkpoints",
                           reward_metrics={"eval_accuracy": 0.9, "curves": {}}, gold_reward_model_path=None,
                           gold_judge="rule", storage_root="/x", judges=pipeline.judge_costs(cfg),
                           datasets={"sft_train": {"rows": 10}}, eval_report=eval_report, eval_samples=[],
                           methods=list(done), **extra)
    for name in methods.names():
        outcome = done.get(name) or pipeline.skipped_outcome(cfg, methods.get(name))
        pipeline.store_outcome(data, name, outcome)
    return data


def test_a_method_added_to_the_registry_alone_runs_and_shows_everywhere(toy_method, tiny_policy, tmp_path):
    """The toy method's stage runs through the same path as every method's (run_method), the evaluation takes
    it as one more policy, and the report, the card and the summary show it — none of them edited for it."""
    cfg = config.validate({**config.load(TEST_CONFIG).model_dump(),
                           "run": {**config.load(TEST_CONFIG).run.model_dump(), "storage_root": str(tmp_path),
                                   "methods": ["toy"], "wandb_mode": "disabled"}})
    flow = SimpleNamespace(config=cfg.model_dump(), storage_root=str(tmp_path), sft_merged_path=tiny_policy)
    current = SimpleNamespace(run_id="5", origin_run_id=None, retry_count=0, parallel=None)
    import os

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    outcome = pipeline.run_method(flow, "toy", current)
    assert outcome["status"] == methods.DONE and outcome["metrics"] == {"toy_metric": 1.0}
    assert outcome["model_path"] == str(tmp_path / "RLHFFlow" / "5" / "toy" / "attempt-0" / "merged")

    from rlhf_lib.data import lake
    from rlhf_lib.config import DatasetSource

    prompts = lake.materialise("prompts", DatasetSource(eval_rows=4), "eval", tmp_path, seed=0, sample_rows=40)
    held = lake.materialise("sft", DatasetSource(eval_rows=4), "eval", tmp_path, seed=0, sample_rows=40)
    # evaluate takes its policies from its inputs (a toy registered in this process only is not in its config).
    eval_cfg = config.validate({**cfg.model_dump(), "run": {**cfg.run.model_dump(), "methods": ["ppo"]},
                                "eval": {**cfg.eval.model_dump(), "num_prompts": 4}})
    from rlhf_lib import launch

    result = launch.launch("evaluate", eval_cfg.to_json(), tmp_path / "evaluate", {
        "policy_sft": tiny_policy, "policy_toy": outcome["model_path"],
        "reward_function": "function:rlhf_lib.judges:rule_reward", "prompts": prompts["uri"],
        "sft_eval": held["uri"]})
    assert set(result["eval_report"]) == {"sft", "toy"}
    assert result["eval_report"]["toy"]["win_rate_vs_sft"] == 0.5  # the same model: every prompt a tie

    data = _run_data(cfg, {"toy": outcome}, result["eval_report"])
    assert "toy model" in report.summary(data)
    headers, rows = report.eval_table(data.eval_report)
    assert [r[0] for r in rows] == ["sft", "toy"]
    assert "toy" in [r[0] for r in report.stages_table(data)[1]]
    card = FakeCard()
    report.build_evaluate_card(card, data)
    tables = [c._data for c in card if hasattr(c, "_data")]
    assert ["toy"] in [[row[0]] for table in tables for row in table if row and row[0] == "toy"]
    report.plot_method("toy", data)  # its logged series, with no plot written for it


def test_every_method_of_the_registry_is_in_every_report():
    cfg = config.load(TEST_CONFIG)
    outcomes, rows = {}, {"sft": {"mean_score": 0.0, "perplexity": 2.0}}
    for i, name in enumerate(methods.names()):
        outcomes[name] = {**pipeline.skipped_outcome(cfg, methods.get(name)), "status": methods.DONE,
                          "model_path": f"/x/{name}/merged", "stats": [{"step": 1, "loss": 1.0, "score_mean": 0.1,
                                                                         "kl": 0.0, "beta": 0.2,
                                                                         "response_length_mean": 3.0}],
                          "config": {"kl_target": 6.0}, "resumed_from_step": 0}
        rows[name] = {"mean_score": 1.0 + i, "win_rate_vs_sft": 0.6, "gold_win_rate_vs_sft": 0.55,
                      "kl_vs_sft": 0.1, "kl_vs_sft_per_sequence": 2.0, "perplexity": 3.0, "over_optimised": False}
    outcomes["rest"]["iterations"] = [{"mean_reward_all": 0.0, "mean_reward_kept": 1.0, "kept_fraction": 0.5}]
    data = _run_data(cfg, outcomes, rows)
    summary = report.summary(data)
    table = [r[0] for r in report.eval_table(rows)[1]]
    stages = [r[0] for r in report.stages_table(data)[1]]
    for name in methods.names():
        assert f"{name} model" in summary and name in table and name in stages, name
        report.plot_method(name, data)


def test_the_notebook_and_the_flows_downstream_steps_name_no_method():
    """evaluate, end, the card and the notebook loop over the registry: none of them names a method itself."""
    nb = json.loads((ROOT / "notebooks" / "inspect_run.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    for name in methods.names():
        assert f"'{name}'" not in code and f'"{name}"' not in code, name
    evaluate = (ROOT / "rlhf_lib" / "stages" / "evaluate.py").read_text()
    assert not any(f'"{name}"' in evaluate for name in methods.names())


def test_a_plot_of_a_stage_that_logged_no_curve_says_so(recwarn):
    """A run whose stages logged no steps (the toy run above) still gets its plots, saying so without a warning."""
    for fig in (report.plot_sft_loss({"curves": {}}), report.plot_reward_accuracy({"curves": {}})):
        assert [t.get_text() for t in fig.axes[0].texts] == ["no curve recorded"]
    drawn = report.plot_sft_loss({"curves": {"loss": [[1, 2.0], [2, 1.5]]}})
    assert not drawn.axes[0].texts and drawn.axes[0].get_legend() is not None
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_the_steps_that_route_or_skip_load_no_ml_library():
    """Every flow task imports the flow file and `pipeline`; a skipped method's step (four of five in the default
    run), the gangs' fan-out and `rlaif` without AI feedback do nothing more. torch alone is 2-3 s per task on two
    cores, which made each such step 5-8 s instead of ~1 s (found timing the default run)."""
    import subprocess

    code = ("import sys; sys.path.insert(0, 'flows'); import rlhf_flow; from rlhf_lib import pipeline; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'deeplake', 'datasets', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
