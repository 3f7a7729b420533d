"""The method axis is one registry: a method added there alone (a stage module, a registry row — and, in the flow,
a step) is run, evaluated, reported, drawn and summarised with no edit to evaluate, report, the card or the
notebook; and every method of the registry appears in every report."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, TEST_CONFIG, write_config
from rlhf_lib import config, methods, pipeline, preflight, report

FLOW = ROOT / "flows" / "rlhf_flow.py"


class FakeCard(list):
    def append(self, component):
        super().append(component)


def _run_data(cfg, done: dict[str, dict], eval_report: dict, **extra):
    """What a finished run's `run.data` holds, for the methods in `done` (outcomes) and skipped for the rest."""
    data = SimpleNamespace(sft_adapter_path="/x/sft/adapter", sft_merged_path="/x/merge/merged",
                           sft_checkpoint_dir="/x/sft/checkpoints", sft_metrics={"eval_loss": 1.0, "curves": {}},
                           reward_model_path="/x/reward/model", reward_checkpoint_dir="/x/reward/checkpoints",
                           reward_metrics={"eval_accuracy": 0.9, "curves": {}}, gold_reward_model_path=None,
                           gold_judge="rule", storage_root="/x", judges=preflight.judge_costs(cfg),
                           datasets={"sft_train": {"rows": 10}}, eval_report=eval_report, eval_samples=[],
                           methods=list(done), **extra)
    for name in methods.names():
        outcome = done.get(name) or pipeline.skipped_outcome(cfg, methods.get(name))
        pipeline.store_outcome(data, name, outcome)
    return data


def _flow_class(flow_file: Path = FLOW):
    """RLHFFlow as its flow file defines it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"rlhf_flow_{abs(hash(str(flow_file)))}", flow_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flow = module.RLHFFlow
    while hasattr(flow, "_flow_cls"):  # under its FlowMutators (rlhf_lib/decorators.py)
        flow = flow._flow_cls
    return flow


def test_the_flows_graph_is_the_registry():
    """Metaflow's own graph of RLHFFlow against the registry: `reward` branches into exactly the registry's methods,
    in its order; each method's step hands its own name to `pipeline.method_step`; a plain method goes on to
    `evaluate`; a gang method routes to one node or a @parallel gang and meets again in `<name>_join`; @parallel is
    exactly on the gangs' per-node steps."""
    import inspect

    from metaflow.graph import FlowGraph

    flow = _flow_class()
    graph = FlowGraph(flow)
    assert graph["reward"].out_funcs == methods.names()
    for method in methods.REGISTRY.values():
        name = method.name
        for step in method.train_steps:
            assert f'pipeline.method_step(self, "{name}", current)' in inspect.getsource(getattr(flow, step)), step
        if method.gang:
            assert graph[name].type == "split-switch"
            assert graph[name].switch_cases == {"one_node": f"{name}_train", "gang": f"{name}_gang"}
            assert graph[f"{name}_gang"].parallel_foreach
            assert graph[f"{name}_gang"].out_funcs == [f"{name}_gang_train"]
            assert graph[f"{name}_gang_train"].out_funcs == [f"{name}_gang_join"]
            assert graph[f"{name}_gang_join"].type == "join"
            assert graph[f"{name}_train"].out_funcs == graph[f"{name}_gang_join"].out_funcs == [f"{name}_join"]
        assert graph[method.last_step].out_funcs == ["evaluate"], name
    assert sorted(graph["evaluate"].in_funcs) == sorted(m.last_step for m in methods.REGISTRY.values())
    parallel = {node.name for node in graph if node.parallel_step}
    assert parallel == {f"{m.name}_gang_train" for m in methods.REGISTRY.values() if m.gang}


def test_every_method_of_the_registry_is_in_every_report():
    cfg = config.load(TEST_CONFIG)
    outcomes, rows = {}, {"sft": {"proxy_score": 0.0, "perplexity": 2.0}}
    for i, name in enumerate(methods.names()):
        outcomes[name] = {**pipeline.skipped_outcome(cfg, methods.get(name)), "status": methods.DONE,
                          "model_path": f"/x/{name}/merged", "stats": [{"step": 1, "loss": 1.0, "score_mean": 0.1,
                                                                         "kl": 0.0, "beta": 0.2,
                                                                         "response_length_mean": 3.0}],
                          "config": {"kl_target": 6.0}, "resumed_from_step": 0}
        rows[name] = {"proxy_score": 1.0 + i, "proxy_win_rate": 0.6, "gold_win_rate": 0.55,
                      "kl_per_token": 0.1, "kl_per_sequence": 2.0, "perplexity": 3.0, "over_optimised": False}
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


# ------------------------------------------------------------------ a new method, added as the next engineer would

TOY_STAGE = '''"""Toy: one more method for tests/test_registry.py. It keeps the SFT model as it is."""

import shutil

from rlhf_lib.stages import contract


def main(argv=None):
    run = contract.start("toy", argv, "sft_model")
    model = run.out / "merged"
    if not model.exists():
        shutil.copytree(run.paths[0], model)
    contract.write_result(run, model_path=str(model.resolve()), metrics={"toy_metric": 1.0},
                          stats=[{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}], resumed_from_step=0)


if __name__ == "__main__":
    main()
'''
TOY_ROW = '''

class ToySection(Section):
    keep_sft: bool = Field(True, description="Keep the SFT model as it is (the only thing the toy can do).")


def _toy_checks(cfg) -> list[str]:
    return [] if cfg.toy.keep_sft else ["toy.keep_sft = false: the toy method can only keep the SFT model"]


register(Method("toy", "Toy", ToySection, "A toy method: the SFT model as it is.", ("sft_model",),
                check=_toy_checks, plan=lambda cfg: "toy: the SFT model as it is"))
'''
TOY_STEP = '''
    @step
    def toy(self):
        """Toy: the SFT model as it is."""
        from rlhf_lib import pipeline

        pipeline.method_step(self, "toy", current)
        self.next(self.evaluate)
'''


def _fan_out() -> str:
    """`reward`'s fan-out as the flow writes it, from the registry: a toy method's step joins it."""
    from rlhf_lib import methods

    return "self.next(" + ", ".join(f"self.{name}" for name in methods.names()) + ")"


def _copy_of_the_project(tmp_path: Path) -> Path:
    import shutil

    tree = tmp_path / "project"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "artifacts", ".metaflow", "__pycache__",
                                                              ".pytest_cache", "*.ipynb_checkpoints"))
    return tree


def _in(tree: Path, code: str, env: dict | None = None) -> str:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=600,
                          env={**(env or os.environ), "PYTHONPATH": str(tree)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_a_new_method_is_its_module_its_row_and_one_flow_step(tmp_path):
    """In a copy of the project, a toy method gets a stage module, a registry row (settings, check, plan) and one
    flow step (with its name in `reward`'s fan-out) — nothing else is edited — and it is in the config, `start`'s
    checks, the run, the report, the card and the notebook; without its flow step the graph test fails."""
    import os
    import subprocess
    import sys

    tree = _copy_of_the_project(tmp_path)
    (tree / "rlhf_lib" / "stages" / "toy.py").write_text(TOY_STAGE)
    with open(tree / "rlhf_lib" / "methods.py", "a") as fh:
        fh.write(TOY_ROW)
    flow, fan_out = (tree / "flows" / "rlhf_flow.py").read_text(), _fan_out()
    assert fan_out in flow  # else the toy step would silently stay out of the graph
    with_step = flow.replace(fan_out, fan_out[:-1] + ", self.toy)").replace(
        "    # ---------------------------------------------------------------- judging", TOY_STEP.lstrip("\n") +
        "\n    # ---------------------------------------------------------------- judging")
    (tree / "flows" / "rlhf_flow.py").write_text(with_step)

    # The config has its section (from the row), and `start` runs its check.
    checked = _in(tree, "from rlhf_lib import config, preflight\n"
                        "cfg = config.validate({'run': {'methods': ['toy']}, 'toy': {'keep_sft': False}})\n"
                        "print(cfg.toy.keep_sft, preflight.check(cfg)[-1])")
    assert checked.strip() == "False toy.keep_sft = false: the toy method can only keep the SFT model"

    graph_test = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "tests/test_registry.py::test_the_flows_graph_is_the_registry"]
    assert subprocess.run(graph_test, cwd=tree, capture_output=True, timeout=300).returncode == 0

    # A whole run with the toy method alone: in the run, the report, the card, the end summary and the notebook.
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "toy.toml", {
        "run": {"storage_root": str(store), "methods": ["toy"], "cpu_threads": 1},
        "policy": {"tiny": {"pretrain_steps": 10}}, "sft": {"max_steps": 4, "save_steps": 4, "eval_steps": 4},
        "reward": {"max_steps": 4, "save_steps": 4, "eval_steps": 4}, "eval": {"num_prompts": 4}})
    # The copy's own Metaflow datastore: none of the settings rlhf_lib.env gave this process.
    env = {k: v for k, v in os.environ.items() if k not in ("RLHF_METAFLOW_CONFIG", "METAFLOW_HOME",
                                                            "METAFLOW_DATASTORE_SYSROOT_LOCAL", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    run = subprocess.run([sys.executable, "flows/rlhf_flow.py", "--config", "config", str(cfg), "run"], cwd=tree,
                         env=env, capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "[start] toy: the SFT model as it is" in log and "toy model" in log  # start's plan, end's summary
    shown = _in(tree, "import sys; sys.path.insert(0, '.')\n"
                      "from rlhf_lib import env; env.configure()\n"
                      "import torch\n"
                      "from metaflow import Flow\n"
                      "data = Flow('RLHFFlow').latest_run.data\n"
                      "print(sorted(data.eval_report), data.toy_status, data.toy_metrics, data.run_config['toy'])",
                env)
    assert shown.strip() == "['sft', 'toy'] done {'toy_metric': 1.0} {'keep_sft': True}"
    card = tmp_path / "card.html"
    subprocess.run([sys.executable, "flows/rlhf_flow.py", "card", "get", "evaluate", str(card)], cwd=tree, env=env,
                   check=True, capture_output=True, timeout=300)
    assert '"toy"' in _card_content(card)
    _run_notebook_shows(tree, "toy", env)

    (tree / "flows" / "rlhf_flow.py").write_text(flow.replace(_fan_out(), _fan_out()[:-1] + ", self.toy)"))
    assert subprocess.run(graph_test, cwd=tree, capture_output=True, timeout=300).returncode != 0  # no toy step


def _card_content(card: Path) -> str:
    import base64
    import re

    payload = re.search(r'window\.__MF_DATA__\["[^"]+"\] = "([^"]+)"', card.read_text())
    return base64.b64decode(payload.group(1)).decode()


def _run_notebook_shows(tree: Path, name: str, env: dict) -> None:
    import os

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(tree / "notebooks" / "inspect_run.ipynb", as_version=4)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel starts with the copy's environment
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(tree / "notebooks")}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    outputs = json.dumps([o for c in nb.cells for o in c.get("outputs", [])])
    assert f"{name}" in outputs  # its rows in the stage and evaluation tables
    # ...and its training plot (the method's title, "Toy", is drawn inside the image)
    plots = next(c for c in nb.cells if "report.plot_method(" in c.source)
    assert any("image/png" in o.get("data", {}) for o in plots.get("outputs", []))
