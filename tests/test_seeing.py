"""Seeing a run: the notebook runs clean, the evaluate card has the plots and table, W&B has every stage."""

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT
from rlhf_lib import methods, report

pytestmark = pytest.mark.slow  # whole flow runs

NOTEBOOK = ROOT / "notebooks" / "inspect_run.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_runs_top_to_bottom(flow_run, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["RLHF_RUN_ID"] = flow_run.id
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        del os.environ["RLHF_RUN_ID"]
    text = json.dumps(nb)
    assert flow_run.id in text  # it opened the run it was given
    images = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images >= 3  # SFT loss, reward accuracy, PPO panel
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    assert printed.startswith("Question: What is the capital of France?\n\nAnswer:")


def test_evaluate_card_has_plots_and_table(flow_run, tmp_path):
    out = tmp_path / "card.html"
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "rlhf_flow.py"), "card", "get",
                           f"{flow_run.id}/evaluate", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = out.read_text()
    # The card's components travel base64-encoded inside the HTML, as Metaflow's card viewer expects.
    payload = re.search(r'window\.__MF_DATA__\["[^"]+"\] = "([^"]+)"', html)
    assert payload, "no card data in the HTML"
    content = base64.b64decode(payload.group(1)).decode()
    # SFT loss, reward accuracy, the over-optimisation curve, and each method's training curves
    assert content.count("data:image/png;base64") >= 3 + len(methods.names())
    assert "proxy win-rate vs SFT" in content and "gold win-rate vs SFT" in content
    assert all(f'"{m}"' in content for m in ["sft"] + methods.names())  # side by side
    assert "Over-optimisation curve" in content and "Sample generations" in content
    # the verdicts in words: the end-of-run note and the guard's line for each online method
    texts = " ".join(_strings(json.loads(content)))
    assert report.over_optimisation_note(flow_run.data.eval_report) in texts
    assert report.guard_lines(flow_run.data.eval_report) and all(
        line in texts for line in report.guard_lines(flow_run.data.eval_report))


def _strings(node) -> list[str]:
    """Every string inside a card's JSON."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        node = list(node.values())
    return [s for child in node for s in _strings(child)] if isinstance(node, list) else []


def test_wandb_offline_files_for_every_stage(flow_run):
    wandb_dir = Path(flow_run.data.storage_root) / "wandb" / "wandb"
    runs = list(wandb_dir.glob("offline-run-*/run-*.wandb"))
    for stage in ["sft", "merge", "reward", *methods.names(), "evaluate"]:
        name = f"{stage}-{flow_run.id}".encode()
        assert any(name in r.read_bytes() for r in runs), f"no offline W&B run named {stage}-{flow_run.id}"
    # W&B's own debug logs and staging go beside its runs, not into the user's ~/.cache/wandb (docs/reliability.md: files a run
    # leaves). The fixture's HOME is the runner's, so look where they must be.
    assert list((wandb_dir.parent / "cache").rglob("core-debug-*.log")), "W&B debug logs not under the storage root"


def test_the_client_api_snippet_runs_outside_the_checkout(flow_run, tmp_path):
    """docs/inspecting.md's Client API snippet, as a user pastes it, from another directory with no rlhf_lib
    around."""
    readme = (ROOT / "docs" / "inspecting.md").read_text()
    block = readme.split("- **Client API** from any Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = "\n".join(line.removeprefix("  ") for line in block.strip("\n").splitlines())
    code = code.replace("/path/to/this/checkout", str(ROOT))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "METAFLOW_HOME",
                                                             "METAFLOW_DATASTORE_SYSROOT_LOCAL")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "proxy_win_rate" in proc.stdout and "'ppo'" in proc.stdout
